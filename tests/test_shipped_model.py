"""The shipped model (models/weaknat-multi30k-de-en): what push_export_to_hub would publish, loadable through every
surface, and still as good as its card says (a quality guard that runs in seconds)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from sacrebleu.metrics import BLEU
from test_export import NO_PACKAGE_SCRIPT
from training_runs import REPO
from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

from hf_weaknat import WeakNATForConditionalGeneration
from hf_weaknat.export import PACKAGE_DIR, REMOTE_CODE_FILES
from hf_weaknat.translate import main as translate_command

SHIPPED = REPO / "models" / "weaknat-multi30k-de-en"
TEST = REPO / "training" / "corpora" / "multi30k_distilled"  # test2016, with the human references
GUARD = 200  # sentences


def first_test_lines(language: str) -> list[str]:
    return (TEST / f"test.{language}").read_text(encoding="utf-8").splitlines()[:GUARD]


@pytest.fixture(scope="module")
def measured():
    return json.loads((SHIPPED / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def model():
    return AutoModelForSeq2SeqLM.from_pretrained(SHIPPED).eval()


@pytest.fixture(scope="module")
def guard_translations(model):
    """The first 200 test2016 sentences as the pipeline translates them (greedy)."""
    translator = pipeline("weaknat-translation", model=model, tokenizer=str(SHIPPED))
    return [t["translation_text"] for t in translator(first_test_lines("de"), batch_size=64)]


def test_the_folder_is_an_export_with_card_results_and_the_packages_current_code():
    names = {p.name for p in SHIPPED.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "README.md", "eval_results.json", "learning_curve.png", *REMOTE_CODE_FILES}
    assert names == expected
    for name in REMOTE_CODE_FILES:  # the remote code is what the package runs today, not an old copy
        assert (SHIPPED / name).read_text() == (PACKAGE_DIR / name).read_text(), (
            f"{name} changed: python -c 'from hf_weaknat.export import refresh_remote_code; "
            f"refresh_remote_code(\"{SHIPPED.relative_to(REPO)}\")'")
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["weak_ar_layers"] == 0 and config["auto_map"] and config["custom_pipelines"]
    card = (SHIPPED / "README.md").read_text()
    assert "model-index" in card and "## Measured" in card and "## Limitations" in card
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 20 * 2**20


def test_weights_are_stored_in_half_precision_without_weak_ar_and_load_in_float32(model):
    with safe_open(SHIPPED / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}
        assert not [k for k in weights.keys() if k.startswith("weak_ar.")]
    assert isinstance(model, WeakNATForConditionalGeneration) and model.dtype == torch.float32
    assert model.ctc_head.weight.data_ptr() == model.model.shared.weight.data_ptr()  # tied, as trained
    assert type(AutoModel.from_pretrained(SHIPPED)).__name__ == "WeakNATModel"


def test_first_200_test_sentences_score_at_least_the_measured_bleu_minus_one(guard_translations, measured):
    bleu = BLEU().corpus_score(guard_translations, [first_test_lines("en")]).score
    assert bleu >= measured[f"greedy_first{GUARD}_bleu"] - 1.0, (bleu, measured[f"greedy_first{GUARD}_bleu"])


def test_generate_and_pipeline_agree(model, guard_translations):
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    batch = tokenizer(first_test_lines("de")[:8], padding=True, return_tensors="pt")
    texts = tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True)
    assert [t.strip() for t in texts] == [t.strip() for t in guard_translations[:8]]


def test_onnx_int8_path_keeps_the_quality(tmp_path, measured):
    pytest.importorskip("onnxruntime")
    from hf_weaknat import ORTWeakNATForConditionalGeneration, export_onnx

    directory = export_onnx(str(SHIPPED), tmp_path / "onnx", quantize=True)
    int8 = ORTWeakNATForConditionalGeneration.from_pretrained(directory, file_name="model_int8.onnx")
    translator = pipeline("weaknat-translation", model=int8, tokenizer=str(SHIPPED))
    texts = [t["translation_text"] for t in translator(first_test_lines("de"), batch_size=64)]
    bleu = BLEU().corpus_score(texts, [first_test_lines("en")]).score
    assert bleu >= measured[f"greedy_first{GUARD}_bleu"] - 1.0


def test_remote_code_translates_without_the_package(guard_translations):
    sources = first_test_lines("de")[:4]
    result = subprocess.run([sys.executable, "-c", NO_PACKAGE_SCRIPT, str(SHIPPED), json.dumps(sources)],
                            capture_output=True, text=True, timeout=300, cwd=SHIPPED.parent,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["classes"][0].startswith("transformers_modules.")
    assert report["inferred"] == report["v4_style"] == guard_translations[:4]


def test_the_translate_command_translates_a_sentence(tmp_path, capsys, guard_translations):
    source = tmp_path / "in.de"
    source.write_text("Ein Mann fährt Fahrrad.\n\n" + first_test_lines("de")[0] + "\n")
    assert translate_command([str(SHIPPED), str(source), "-o", str(tmp_path / "out.en")]) == 0
    first, empty, third = (tmp_path / "out.en").read_text().split("\n")[:3]
    assert "man" in first.lower() and ("bike" in first.lower() or "bicycle" in first.lower()), first
    assert empty == "" and third == guard_translations[0].strip()
