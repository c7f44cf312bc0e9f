"""An export loads and translates on transformers 4.57 (the last 4.x line) through its remote code only, with the ids
and texts of 5.x.

The 4.x side runs in a second virtual environment (torch, transformers 4.57.6, sentencepiece, tokenizers: no
hf_weaknat), created on first use with `python -m venv` + pip (which needs the package index) and kept under
~/.cache/hf_weaknat/ (`HF_WEAKNAT_V4_VENV` names another folder). Where pip finds the torch wheel locally, creating
it takes about 40 s with pip's download cache warm and 100 s cold (2 busy cores); later runs reuse it, and the tests
then take about 10 s. A venv that cannot be created fails the test, with pip's own output: it is never skipped.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer, pipeline

from hf_weaknat import WeakNATForConditionalGeneration
from hf_weaknat.export import REMOTE_CODE_FILES

TRANSFORMERS_V4 = "4.57.6"
# torch pinned: pip takes it from a local wheel where one is provided; unpinned, it could pull a
# multi-GB CUDA build
V4_REQUIREMENTS = ("torch==2.13.0", f"transformers=={TRANSFORMERS_V4}", "sentencepiece", "tokenizers")
V4_VENV = Path(os.environ.get("HF_WEAKNAT_V4_VENV",
                              Path.home() / ".cache" / "hf_weaknat" / f"venv-transformers-{TRANSFORMERS_V4[:4]}"))
READY_FILE = "hf_weaknat-ready.json"  # what the venv was made with, written once it is complete
CREATING_FILE = "hf_weaknat-creating"  # there while the test creates it: one left behind was interrupted
SENTENCES = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.",
             "Ein Mädchen in einem Karateanzug bricht ein Brett mit einem Tritt.", "Kinder spielen.", ""]

V4_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["hf_weaknat"] = None  # the export's own code only
    import torch
    import transformers
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline
    torch.set_num_threads(1)
    directory, sentences = sys.argv[1], json.loads(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(directory, trust_remote_code=True).eval()
    batch = tokenizer([s for s in sentences if s], padding=True, return_tensors="pt")
    translator = pipeline("translation", model=directory, trust_remote_code=True)
    print(json.dumps({
        "transformers": transformers.__version__,
        "classes": [type(tokenizer).__name__, type(model).__module__, type(model).__name__,
                    type(translator).__module__, type(translator).__name__],
        "special": [tokenizer.all_special_tokens, tokenizer.all_special_ids,
                    tokenizer.convert_tokens_to_ids("<blank>"), tokenizer.padding_side],
        "batch": {name: value.tolist() for name, value in batch.items()},
        "greedy": model.generate(**batch).tolist(),
        "beam": model.generate(**batch, num_beams=4).tolist(),
        "beam_n_best": model.generate(**batch, num_beams=4, num_return_sequences=2).tolist(),
        "pipeline": [r["translation_text"] for r in translator(sentences)],
        "pipeline_beam": [r["translation_text"] for r in translator(sentences, num_beams=4)],
        "pipeline_one": translator(sentences[0]),
    }))
""")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def clean_env(**extra) -> dict:
    """The environment without what would let the test process's packages into the venv's python."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", **extra}


def run_step(command: list, what: str, timeout: int) -> str:
    """Run one step of the venv's creation; any failure fails the test, saying what the venv needs."""
    def fail(problem: str, stdout, stderr):
        text = lambda out: (out.decode(errors="replace") if isinstance(out, bytes) else out or "")[-3000:]  # noqa: E731
        pytest.fail(f"Could not create the transformers {TRANSFORMERS_V4} venv at {V4_VENV}: {what} {problem}. This "
                    f"test needs `python -m venv` and `pip install {' '.join(V4_REQUIREMENTS)}`, which needs the "
                    f"package index (or set HF_WEAKNAT_V4_VENV to a venv that has them). Its output:\n{text(stdout)}\n"
                    f"{text(stderr)}", pytrace=False)

    try:
        result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout,
                                env=clean_env())
    except subprocess.TimeoutExpired as error:  # its output is bytes, whatever `text` says
        fail(f"did not finish in {timeout} s", error.stdout, error.stderr)
    if result.returncode != 0:
        fail(f"exited with {result.returncode}", result.stdout, result.stderr)
    return result.stdout


def ready_record() -> dict:
    return {"requirements": list(V4_REQUIREMENTS), "python": list(sys.version_info[:3]),
            "base_python": sys.executable}


def check_versions(python: Path):
    versions = run_step([python, "-c", "import torch, transformers, tokenizers, sentencepiece; "
                         "print(transformers.__version__, torch.__version__)"], "the import check", timeout=300)
    if versions.split()[:1] != [TRANSFORMERS_V4]:
        pytest.fail(f"The venv at {V4_VENV} has transformers and torch {versions.strip()}, not {TRANSFORMERS_V4}",
                    pytrace=False)


def ensure_v4_venv() -> tuple[Path, float]:
    """The venv's python and the seconds spent creating it (0 when reused).

    A venv this test made (it holds READY_FILE) is reused while its requirements and base python are the same, and
    made again otherwise, as is one whose creation was interrupted (CREATING_FILE). A folder holding neither (a venv of
    one's own, named by HF_WEAKNAT_V4_VENV) is used as it is, never deleted. A file lock keeps parallel test
    processes from creating it twice."""
    V4_VENV.parent.mkdir(parents=True, exist_ok=True)
    python, ready, creating = venv_python(V4_VENV), V4_VENV / READY_FILE, V4_VENV / CREATING_FILE
    with open(V4_VENV.parent / f"{V4_VENV.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.is_file() and python.exists() and ready.read_text() == json.dumps(ready_record()):
            return python, 0.0
        if V4_VENV.exists() and not ready.is_file() and not creating.exists():  # not made by this test
            check_versions(python)
            return python, 0.0
        start = time.perf_counter()
        shutil.rmtree(V4_VENV, ignore_errors=True)
        run_step([sys.executable, "-m", "venv", V4_VENV], "python -m venv", timeout=300)
        creating.touch()
        run_step([python, "-m", "pip", "install", "--quiet", *V4_REQUIREMENTS], "pip install", timeout=1800)
        check_versions(python)
        ready.write_text(json.dumps(ready_record()))
        creating.unlink()
        return python, time.perf_counter() - start


@pytest.fixture(scope="module")
def v4_python():
    python, seconds = ensure_v4_venv()
    if seconds:
        print(f"\ncreated the transformers {TRANSFORMERS_V4} venv at {V4_VENV} in {seconds:.0f} s")
    return python


@pytest.fixture(scope="module")
def export(random_export):
    return random_export


@pytest.fixture(scope="module")
def on_v4(v4_python, export, tmp_path_factory):
    """What the export gives on transformers 4.57 through its remote code (SENTENCES: tokenized, generated,
    translated)."""
    modules = tmp_path_factory.mktemp("v4_modules")  # 4.x's compiled remote code apart from 5.x's
    result = subprocess.run(
        [str(v4_python), "-c", V4_SCRIPT, str(export), json.dumps(SENTENCES)], capture_output=True, text=True,
        timeout=600, cwd=export.parent,
        env=clean_env(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(modules), OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def on_v5(export):
    """The same on transformers 5.x, in this process, with the package."""
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = WeakNATForConditionalGeneration.from_pretrained(export).eval()
    batch = tokenizer([s for s in SENTENCES if s], padding=True, return_tensors="pt")
    translator = pipeline("weaknat-translation", model=str(export))  # the package's registered pipeline
    return {
        "special": [tokenizer.all_special_tokens, tokenizer.all_special_ids, tokenizer.convert_tokens_to_ids("<blank>"),
                    tokenizer.padding_side],
        "batch": {name: value.tolist() for name, value in batch.items()},
        "greedy": model.generate(**batch).tolist(),
        "beam": model.generate(**batch, num_beams=4).tolist(),
        "beam_n_best": model.generate(**batch, num_beams=4, num_return_sequences=2).tolist(),
        "pipeline": [r["translation_text"] for r in translator(SENTENCES)],
        "pipeline_beam": [r["translation_text"] for r in translator(SENTENCES, num_beams=4)],
        "pipeline_one": translator(SENTENCES[0]),
    }


def test_the_export_ships_the_compatibility_module_and_a_tokenizer_config_both_versions_read(export):
    assert "transformers_compat.py" in REMOTE_CODE_FILES and (export / "transformers_compat.py").is_file()
    config = json.loads((export / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # 5.x's default, TokenizersBackend, is 5.x only
    assert config["additional_special_tokens"] == ["<blank>"] and "extra_special_tokens" not in config
    assert config["model_input_names"] == ["input_ids", "attention_mask"]  # 4.x would add token_type_ids


def test_transformers_4_57_loads_the_export_through_its_remote_code_only(on_v4):
    assert on_v4["transformers"] == TRANSFORMERS_V4
    tokenizer_class, model_module, model_class, pipeline_module, pipeline_class = on_v4["classes"]
    assert tokenizer_class == "PreTrainedTokenizerFast"
    assert model_module.startswith("transformers_modules.") and model_class == "WeakNATForConditionalGeneration"
    assert pipeline_module.startswith("transformers_modules.") and pipeline_class == "WeakNATTranslationPipeline"


def test_the_tokenizer_gives_the_same_special_tokens_and_ids_on_4_57(on_v4, on_v5):
    assert on_v4["special"] == on_v5["special"]
    assert on_v4["special"][2] == 4  # the CTC blank
    assert on_v4["batch"] == on_v5["batch"]  # input_ids and attention_mask only (no token_type_ids)


@pytest.mark.parametrize("decoding", ["greedy", "beam", "beam_n_best"])
def test_generate_gives_the_same_ids_on_4_57(on_v4, on_v5, decoding):
    assert on_v4[decoding] == on_v5[decoding]
    assert any(any(token != 0 for token in row) for row in on_v5[decoding])  # something was generated


@pytest.mark.parametrize("call", ["pipeline", "pipeline_beam", "pipeline_one"])
def test_the_v4_translation_pipeline_gives_the_same_texts(on_v4, on_v5, call):
    assert on_v4[call] == on_v5[call]
    if call != "pipeline_one":
        assert len(on_v5[call]) == len(SENTENCES) and on_v5[call][-1] == ""  # the empty sentence translates to ""


def test_the_shipped_model_translates_the_same_on_4_57(v4_python, tmp_path):
    shipped = Path(__file__).resolve().parents[1] / "models" / "weaknat-multi30k-de-en"
    result = subprocess.run(
        [str(v4_python), "-c", V4_SCRIPT, str(shipped), json.dumps(SENTENCES)], capture_output=True, text=True,
        timeout=600, cwd=tmp_path, env=clean_env(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
                                                  OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-5000:]
    on_v4 = json.loads(result.stdout.strip().splitlines()[-1])
    translator = pipeline("weaknat-translation", model=str(shipped))
    assert on_v4["pipeline"] == [r["translation_text"] for r in translator(SENTENCES)]
    assert "man" in on_v4["pipeline"][0].lower() and on_v4["pipeline"][-1] == ""
