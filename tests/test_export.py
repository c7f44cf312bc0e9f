"""Export for the Hub: no weak AR weights, plain-CTC parameter count, bit-identical logits, loads without the package."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from transformers import AutoModel, AutoModelForSeq2SeqLM

from hf_weaknat import (WeakNATForConditionalGeneration, WeakNATModel, export_for_hub, push_export_to_hub,
                        strip_weak_decoders)
from hf_weaknat.export import PACKAGE_DIR, REMOTE_CODE_FILES


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def exported(memorized, tokenizer, tmp_path_factory):
    model, sources, targets = memorized
    directory = export_for_hub(model, tmp_path_factory.mktemp("export"), tokenizer=tokenizer)
    return directory, model, sources, targets


def saved_keys(directory: Path) -> set[str]:
    keys = set()
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            keys.update(f.keys())
    return keys


def test_exported_checkpoint_has_no_weak_ar_weights_or_active_ar_settings(exported):
    directory, model, _, _ = exported
    assert model.weak_ar is not None  # the trained model had them
    keys = saved_keys(directory)
    assert keys and not any("weak_ar" in k for k in keys)
    config = json.loads((directory / "config.json").read_text())
    assert config["weak_ar_layers"] == 0 and config["glancing"] is False and config["weak_ar_on_encoder"] is False


def test_exported_parameter_count_equals_a_plain_ctc_model_of_the_same_size(exported):
    directory, model, _, _ = exported
    loaded = AutoModelForSeq2SeqLM.from_pretrained(directory)
    plain = WeakNATForConditionalGeneration(model.config.__class__(**{**model.config.to_dict(), "weak_ar_layers": 0}))
    assert count(loaded) == count(plain) < count(model)


@pytest.mark.parametrize("auto_class,expected", [(AutoModel, WeakNATModel),
                                                 (AutoModelForSeq2SeqLM, WeakNATForConditionalGeneration)])
def test_export_loads_through_auto_classes_without_missing_or_unexpected_keys(exported, auto_class, expected):
    loaded, info = auto_class.from_pretrained(exported[0], output_loading_info=True)
    assert type(loaded) is expected
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_exported_logits_are_bit_identical_to_the_training_models_nar_path(exported, tokenizer):
    directory, model, sources, _ = exported
    batch = tokenizer(sources, padding=True, return_tensors="pt")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(directory).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model.eval()(**batch).logits)
        assert torch.equal(strip_weak_decoders(model)(**batch).logits, model(**batch).logits)
    assert loaded.ctc_head.weight.data_ptr() == loaded.model.shared.weight.data_ptr()  # still tied after loading


def test_half_precision_weights_take_half_the_space_and_load_in_float32(exported, tokenizer, tmp_path):
    directory, model, sources, _ = exported
    half = export_for_hub(model, tmp_path / "half", tokenizer=tokenizer, weights_dtype=torch.float16)
    with safe_open(half / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}
        assert set(weights.keys()) == saved_keys(directory)  # the tied head is stored once, as in float32
    assert (half / "model.safetensors").stat().st_size < 0.55 * (directory / "model.safetensors").stat().st_size
    loaded = AutoModelForSeq2SeqLM.from_pretrained(half).eval()
    assert loaded.dtype == torch.float32 and loaded.ctc_head.weight.data_ptr() == loaded.model.shared.weight.data_ptr()
    rounded = strip_weak_decoders(model).half().float().eval()  # what float16 storage keeps of each weight
    batch = tokenizer(sources, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, rounded(**batch).logits)
    assert AutoModelForSeq2SeqLM.from_pretrained(half, dtype=torch.float16).dtype == torch.float16  # when asked


def test_export_ships_remote_code_auto_map_pipeline_and_tokenizer(exported):
    directory = exported[0]
    names = {p.name for p in directory.iterdir()}
    assert {"configuration_weaknat.py", "modeling_weaknat.py", "ctc.py", "weak_ar.py", "glancing.py",
            "pipeline_weaknat.py", "tokenizer.json", "tokenizer_config.json", "config.json"} <= names
    config = json.loads((directory / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSeq2SeqLM"}
    assert list(config["custom_pipelines"]) == ["translation"]


def test_remote_code_files_are_every_file_the_shipped_code_imports():
    """A new module imported by the model (weak_ar.py, glancing.py...) must travel with every export."""
    shipped, todo = set(), ["modeling_weaknat.py", "configuration_weaknat.py", "pipeline_weaknat.py"]
    while todo:
        name = todo.pop()
        shipped.add(name)
        tree = ast.parse((PACKAGE_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and f"{node.module}.py" not in shipped:
                todo.append(f"{node.module}.py")
    assert shipped == set(REMOTE_CODE_FILES)


NO_PACKAGE_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["hf_weaknat"] = None  # importing the package must be impossible here
    from transformers import AutoModel, AutoModelForSeq2SeqLM, pipeline
    directory, sources = sys.argv[1], json.loads(sys.argv[2])
    seq2seq = AutoModelForSeq2SeqLM.from_pretrained(directory, trust_remote_code=True)
    base = AutoModel.from_pretrained(directory, trust_remote_code=True)
    inferred = pipeline(model=directory, trust_remote_code=True)
    v4_style = pipeline("translation", model=directory, trust_remote_code=True)
    print(json.dumps({
        "classes": [type(seq2seq).__module__, type(seq2seq).__name__, type(base).__name__],
        "inferred": [r["translation_text"] for r in inferred(sources, batch_size=2)],
        "v4_style": [r["translation_text"] for r in v4_style(sources)],
    }))
""")


def test_export_translates_with_trust_remote_code_where_the_package_cannot_be_imported(exported):
    directory, _, sources, targets = exported
    result = subprocess.run([sys.executable, "-c", NO_PACKAGE_SCRIPT, str(directory), json.dumps(sources)],
                            capture_output=True, text=True, timeout=300, cwd=directory.parent,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    module, seq2seq_class, base_class = report["classes"]
    assert module.startswith("transformers_modules.")  # the shipped code, not hf_weaknat
    assert (seq2seq_class, base_class) == ("WeakNATForConditionalGeneration", "WeakNATModel")
    assert report["inferred"] == targets and report["v4_style"] == targets


def test_push_to_hub_uploads_exactly_the_export_folder(exported, monkeypatch):
    from huggingface_hub import HfApi

    directory = exported[0]
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", repo_id))

    def fake_upload(self, *, repo_id, folder_path, **kw):
        calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        calls["keys"] = saved_keys(Path(folder_path))

    monkeypatch.setattr(HfApi, "upload_folder", fake_upload)
    push_export_to_hub(directory, "someone/weaknat-tiny")
    assert calls["repo"] == "someone/weaknat-tiny"
    assert calls["files"] == sorted(p.name for p in directory.iterdir())
    assert calls["keys"] and not any("weak_ar" in k for k in calls["keys"])


def test_push_to_hub_refuses_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_for_hub"):
        push_export_to_hub(tmp_path, "someone/x")


def test_plain_ctc_model_exports_unchanged(tmp_path):
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(weak_ar_layers=0)).eval()
    loaded = AutoModelForSeq2SeqLM.from_pretrained(export_for_hub(model, tmp_path)).eval()
    ids = torch.tensor([[7, 8, 2]])
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------------------- old exports
# tests/fixtures/pre_split_* were written once by make_pre_split_export.py with the code from before weak_ar.py and
# glancing.py were split out of the modeling file. Today's code must load them and compute exactly what it did.

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "pre_split_expected.json").read_text())

REMOTE_CODE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["hf_weaknat"] = None  # the folder's own code only
    import torch
    from transformers import AutoModelForSeq2SeqLM
    directory, inputs_file, out_file = sys.argv[1:]
    model = AutoModelForSeq2SeqLM.from_pretrained(directory, trust_remote_code=True).eval()
    batch = torch.load(inputs_file)
    with torch.no_grad():
        logits = model(**batch).logits[model.frame_mask(batch["attention_mask"])]
    torch.save({"module": type(model).__module__, "valid_logits": logits, "greedy": model.generate(**batch),
                "beam4": model.generate(**batch, num_beams=4, num_return_sequences=2)}, out_file)
""")


def probe_batch():
    return {name: torch.tensor(EXPECTED[name]) for name in ("input_ids", "attention_mask")}


def translate_probe(model):
    """What make_pre_split_export.py recorded, computed by `model`."""
    batch = probe_batch()
    with torch.no_grad():
        logits = model.eval()(**batch).logits[model.frame_mask(batch["attention_mask"])]
    return {"valid_logits": logits, "greedy": model.generate(**batch),
            "beam4": model.generate(**batch, num_beams=4, num_return_sequences=2)}


def assert_matches_expected(result):
    assert result["greedy"].tolist() == EXPECTED["greedy_ids"]
    assert result["beam4"].tolist() == EXPECTED["beam4_ids"]
    logits = result["valid_logits"]
    assert list(logits.shape) == EXPECTED["valid_logits_shape"]
    torch.testing.assert_close(logits[0], torch.tensor(EXPECTED["logits_first_frame"]), atol=1e-5, rtol=1e-5)
    assert logits.double().sum().item() == pytest.approx(EXPECTED["logits_sum"], rel=1e-6)
    assert logits.double().abs().sum().item() == pytest.approx(EXPECTED["logits_abs_sum"], rel=1e-6)


def run_with_remote_code(directory: Path, tmp_path: Path):
    torch.save(probe_batch(), tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", REMOTE_CODE_SCRIPT, str(directory), str(tmp_path / "inputs.pt"),
                             str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["module"].startswith("transformers_modules.")
    return out


@pytest.fixture(scope="module")
def old_export_with_its_own_code(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("old_code")
    directory = shutil.copytree(FIXTURES / "pre_split_export", tmp_path / "pre_split_export")
    return run_with_remote_code(directory, tmp_path)


def test_export_made_before_the_split_still_translates_with_the_code_it_ships(old_export_with_its_own_code):
    assert_matches_expected(old_export_with_its_own_code)


def test_export_made_before_the_split_gives_identical_outputs_with_todays_classes(old_export_with_its_own_code):
    loaded, info = WeakNATForConditionalGeneration.from_pretrained(FIXTURES / "pre_split_export",
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    today = translate_probe(loaded)
    assert_matches_expected(today)
    for name in ("valid_logits", "greedy", "beam4"):
        assert torch.equal(today[name], old_export_with_its_own_code[name])  # old code, new code: same machine


def test_export_made_before_the_split_translates_identically_with_todays_remote_code(old_export_with_its_own_code,
                                                                                   tmp_path):
    directory = shutil.copytree(FIXTURES / "pre_split_export", tmp_path / "pre_split_export")
    for old in directory.glob("*.py"):
        old.unlink()
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(PACKAGE_DIR / name, directory / name)
    today = run_with_remote_code(directory, tmp_path)
    for name in ("valid_logits", "greedy", "beam4"):
        assert torch.equal(today[name], old_export_with_its_own_code[name])


def test_training_checkpoint_made_before_the_split_loads_every_weak_ar_key_and_gives_the_same_losses():
    model, info = WeakNATForConditionalGeneration.from_pretrained(FIXTURES / "pre_split_training",
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert len(model.weak_ar.decoders) == 3  # no sharing: one per NAR layer + the encoder's partner
    batch = {name: torch.tensor(values) for name, values in EXPECTED["training_batch"].items()}
    expected = EXPECTED["training_step"]
    model.train()
    torch.manual_seed(1234)  # the same random draws (glanced frames, sampled layers) as when it was recorded
    with torch.no_grad():
        out = model(**batch, training_step=20)
    for name in ("loss", "ctc_loss", "ar_loss"):
        assert getattr(out, name).item() == pytest.approx(expected[name], rel=1e-5), name
    assert out.num_unfit_pairs.item() == expected["num_unfit_pairs"]
    exported = strip_weak_decoders(model)
    assert_matches_expected(translate_probe(exported))


def test_refresh_remote_code_replaces_only_the_code_of_an_export(exported, tmp_path):
    directory = Path(shutil.copytree(exported[0], tmp_path / "export"))
    (directory / "modeling_weaknat.py").write_text("# an old version\n")
    (directory / "old_module.py").write_text("# a file the code no longer ships\n")
    weights = (directory / "model.safetensors").read_bytes()
    from hf_weaknat.export import refresh_remote_code

    refresh_remote_code(directory)
    assert (directory / "modeling_weaknat.py").read_text() == (PACKAGE_DIR / "modeling_weaknat.py").read_text()
    assert not (directory / "old_module.py").exists()
    assert (directory / "model.safetensors").read_bytes() == weights
