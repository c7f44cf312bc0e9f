"""End to end: train.py runs (tiny model, CPU, offline), survives SIGKILL, runs on 2 processes, exports and pushes."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import MULTI30K
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer
from training_runs import DEMO, ENV, REPO, TINY, TINY_MODEL, TRAIN, final_weights, records, run

from hf_weaknat import WeakNATForConditionalGeneration  # also registers the pipeline
from training import arguments, average_checkpoints, export, train
from training.checkpoints import MODEL_DIR, STATE_FILE, complete_checkpoints, resolve_checkpoint


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The main job's recipe end to end, on a tiny model: validation, checkpoints, export, learning curve, and the
    comparison with the shipped model on the same test sentences."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    result = run([sys.executable, TRAIN, DEMO, *TINY_MODEL, "--max_steps", "12", "--eval_steps", "6", "--save_steps",
                  "6", "--output_dir", str(run_dir)])
    return run_dir, result.stdout + result.stderr


def test_demo_recipe_trains_validates_checkpoints_and_records(demo_run):
    run_dir, log = demo_run
    recipe_tokenizer = REPO / "training/corpora/multi30k_distilled/tokenizer"
    assert "Tokenizer: loaded from training/corpora/multi30k_distilled/tokenizer" in log  # the teacher's vocabulary
    assert (run_dir / "tokenizer/tokenizer.json").read_bytes() == (recipe_tokenizer / "tokenizer.json").read_bytes()
    run_args = json.loads((run_dir / "run_args.json").read_text())
    # the recipe's model section with TINY's flags on top, and the config it resolved to
    assert run_args["model"] == {"model_type": "weaknat", "d_model": 32, "encoder_layers": 1, "decoder_layers": 2,
                                 "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                                 "decoder_ffn_dim": 64, "dropout": 0.1, "max_position_embeddings": 48,
                                 "upsample_ratio": 2, "weak_ar_layers": 1}
    vocabulary = len(AutoTokenizer.from_pretrained(recipe_tokenizer))
    assert run_args["model_config"]["vocab_size"] == vocabulary
    assert run_args["model_config"]["glancing_anneal_steps"] == 12
    assert "Removed shared tensor" not in log  # the tied CTC head is declared, not found by accelerate at each save
    stats = json.loads((run_dir / "data_stats.json").read_text())["train_pairs"]
    assert sum(stats.values()) == 400 and stats["kept"] > 0
    assert f"Training pairs: {stats['kept']} kept; left out: {stats['source_too_long']} with a source" in log
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step-00000006", "step-00000012"]
    logged = records(run_dir)
    train = [r for r in logged if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and r["ar_loss"] > 0 for r in train)
    # inverse-sqrt schedule in optimizer steps: linear warmup to 3e-3 at step 5, then 3e-3 * sqrt(5 / step)
    assert train[0]["lr"] == pytest.approx(3e-3 * 2 / 5) and train[-1]["lr"] == pytest.approx(3e-3 * (5 / 12) ** 0.5)
    assert [r["step"] for r in logged if r["split"] == "validation"] == [6, 12]
    assert "validation loss" in log and "tok:13a" in log  # the signature is printed
    assert list((run_dir / "logs").rglob("events.out.tfevents.*"))  # TensorBoard tracker
    assert (run_dir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first_test_source = (MULTI30K / "test.de").read_text(encoding="utf-8").splitlines()[0]
    first_prediction = (run_dir / "predictions-test.txt").read_text().splitlines()[0]
    # the export and the shipped model translate the same sentences through the pipeline, both scored
    assert f"  {first_test_source}\n    this run:  {first_prediction}\n    reference: " in log
    shipped = json.loads((REPO / "models/weaknat-multi30k-de-en/eval_results.json").read_text())
    ours = json.loads((run_dir / "export/eval_results.json").read_text())
    printed = re.search(r"test BLEU over the same 1000 sentences: this run ([\d.]+), "
                        r"models/weaknat-multi30k-de-en ([\d.]+)", log)
    assert float(printed[1]) == pytest.approx(ours["bleu"], abs=0.005)
    assert float(printed[2]) == pytest.approx(shipped["greedy"]["bleu"], abs=0.1)  # pipeline batches, not sorted ones


def test_demo_export_is_the_trained_model_without_weak_ar_and_translates(demo_run):
    from transformers import pipeline

    run_dir, _ = demo_run
    export = run_dir / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["weak_ar_layers"] == 0 and "auto_map" in config
    assert not [k for k in load_file(export / "model.safetensors") if k.startswith("weak_ar.")]
    trained = WeakNATForConditionalGeneration.from_pretrained(run_dir / "checkpoints/step-00000012" / MODEL_DIR)
    exported = WeakNATForConditionalGeneration.from_pretrained(export)
    assert trained.weak_ar is not None and exported.weak_ar is None
    batch = {"input_ids": torch.tensor([[5, 9, 30, 2], [7, 8, 2, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    torch.testing.assert_close(exported.eval()(**batch).logits, trained.eval()(**batch).logits, rtol=0, atol=0)
    sources = (MULTI30K / "test.de").read_text(encoding="utf-8").splitlines()[:6]
    translator = pipeline("weaknat-translation", model=str(export))
    translations = [t["translation_text"] for t in translator(sources)]
    assert translations == (run_dir / "predictions-test.txt").read_text().splitlines()[:6]
    card = ModelCard.load(export / "README.md")
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    scores = json.loads((export / "eval_results.json").read_text())
    assert results == {"sacrebleu": round(scores["bleu"], 2), "chrf": round(scores["chrf"], 2)}
    test_pairs = len((MULTI30K / "test.en").read_text(encoding="utf-8").splitlines())
    assert scores["split"] == "test" and scores["num_sentences"] == test_pairs  # never capped by max_eval_samples
    assert (export / "learning_curve.png").is_file() and "learning_curve.png" in card.text


def test_export_script_averages_and_pushes_exactly_the_export_folder(demo_run, tmp_path, monkeypatch):
    run_dir, _ = demo_run
    averaged = average_checkpoints.main(["--run_dir", str(run_dir), "--last", "2"])
    uploads = []

    class RecordingHfApi:  # stands in for the Hub: records what would be uploaded
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploads.append(("create_repo", repo_id))

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            uploads.append(("upload_folder", repo_id, files, (Path(folder_path) / "README.md").read_text()))

    monkeypatch.setattr("huggingface_hub.HfApi", RecordingHfApi)
    export_dir = export.main(["--run_dir", str(run_dir), "--checkpoint", str(averaged), "--push_to_hub",
                              "someone/weaknat-demo", "--output_dir", str(tmp_path / "export")])
    assert uploads[0] == ("create_repo", "someone/weaknat-demo")
    kind, repo, files, readme = uploads[1]
    assert (kind, repo) == ("upload_folder", "someone/weaknat-demo")
    for name in ("README.md", "config.json", "model.safetensors", "tokenizer.json", "modeling_weaknat.py",
                 "configuration_weaknat.py", "pipeline_weaknat.py", "ctc.py", "learning_curve.png"):
        assert name in files, name
    assert "model-index" in readme and 'pipeline(model="someone/weaknat-demo"' in readme
    exported = load_file(export_dir / "model.safetensors")
    averaged_weights = load_file(averaged / "model.safetensors")
    assert all(torch.equal(exported[k], averaged_weights[k]) for k in exported)


def test_ship_model_averages_measures_half_precision_and_writes_a_complete_folder(demo_run, tmp_path):
    from training.evidence import ship_model

    run_dir, _ = demo_run
    notes = tmp_path / "notes.md"
    notes.write_text("## Measured\n\ngreedy {greedy_bleu}, beam {beam_bleu}, float32 {float32_greedy_bleu}, "
                     "{changed_greedy} changed, steps {averaged_steps}, guard {guard_bleu}\n")
    folder = ship_model.main(["--run_dir", str(run_dir), "--last", "1", "--up_to", "6",
                              "--output_dir", str(tmp_path / "shipped"),
                              "--num_beams", "2", "--card_notes", str(notes), "--json", str(tmp_path / "m.json")])
    measured = json.loads((tmp_path / "m.json").read_text())
    results = json.loads((folder / "eval_results.json").read_text())
    assert results["averaged_steps"] == measured["averaged_steps"] == [6]  # up to update 6 of 12
    assert results["greedy"]["bleu"] == measured["float16_weights"]["greedy"]["bleu"]
    assert set(measured) >= {"float32_weights", "float16_weights", "changed_by_weights_dtype"}
    card = (folder / "README.md").read_text()
    assert f"greedy {results['greedy']['bleu']:.2f}, beam {results['beam2']['bleu']:.2f}" in card
    assert f'pipeline(model="{tmp_path / "shipped"}"' in card  # the card loads the folder by its own name
    assert "Optimisation: 6 updates," in card  # what the weights were trained for, not the run's max_steps
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "notes.md", "shipped"]  # no scratch left


def test_sigkill_then_resume_ends_where_an_uninterrupted_run_ends(tokenizer_dir, tmp_path):
    common = [sys.executable, TRAIN, DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir), "--max_steps", "60",
              "--save_steps", "10", "--eval_steps", "30", "--report_to", "none"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([*common, "--output_dir", str(killed)], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not complete_checkpoints(killed / "checkpoints") and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.kill()  # SIGKILL: no cleanup, no final save
    assert process.wait() == -9, "the run ended before it could be killed mid-training"
    resumed_from = resolve_checkpoint(killed / "checkpoints", "latest")
    step = json.loads((resumed_from / STATE_FILE).read_text())["step"]
    assert step < 60
    # interrupted saves of a later step: a temp dir, and a dir without trainer_state.json; neither is "latest"
    shutil.copytree(resumed_from, killed / "checkpoints/.tmp-step-00000070")
    shutil.copytree(resumed_from, killed / "checkpoints/step-00000080", ignore=shutil.ignore_patterns(STATE_FILE))
    assert resolve_checkpoint(killed / "checkpoints", "latest") == resumed_from

    result = run([*common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    assert f"Resumed from {resumed_from} (step {step}," in result.stdout
    final = resolve_checkpoint(killed / "checkpoints", "latest")
    assert json.loads((final / STATE_FILE).read_text())["step"] == 60 and final.name == "step-00000060"
    steps = [r["step"] for r in records(killed) if r["split"] == "train"]
    assert steps == list(range(2, 61, 2))  # what the killed run logged after its checkpoint was redone, once

    uninterrupted = tmp_path / "uninterrupted"
    run([*common, "--output_dir", str(uninterrupted)])
    expected, got = final_weights(uninterrupted), final_weights(killed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resume changed the training trajectory"


def test_streaming_run_resumes_mid_epoch_like_an_uninterrupted_run(tokenizer_dir, tmp_path):
    # also under bf16 autocast and glancing (whose ratio follows the optimizer step)
    command = [sys.executable, TRAIN, DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir), "--streaming", "true",
               "--max_steps", "12", "--save_steps", "5", "--eval_steps", "0", "--report_to", "none",
               "--mixed_precision", "bf16", "--glancing", "true"]
    full = tmp_path / "full"
    run([*command, "--output_dir", str(full)])
    stats = json.loads((full / "data_stats.json").read_text())["train_pairs"]
    assert sum(stats.values()) > 0 and stats["kept"] > 0  # counted while the stream was read
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("step-00000012", "export"))
    assert json.loads((resumed / "checkpoints/step-00000010" / STATE_FILE).read_text())["batches_in_epoch"] > 0
    result = run([*command, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert "(step 10," in result.stdout
    expected, got = final_weights(full), final_weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_fresh_run_refuses_a_directory_with_checkpoints(demo_run):
    run_dir, _ = demo_run
    _, _, train_args = arguments.parse_arguments([DEMO, "--output_dir", str(run_dir)])
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint latest"):
        train.resume_checkpoint(run_dir, train_args)
    train_args.resume_from_checkpoint = "latest"
    assert train.resume_checkpoint(run_dir, train_args).name == "step-00000012"


def test_early_stopping_ends_the_run_when_validation_bleu_stops_improving(tokenizer_dir, tmp_path):
    # a learning rate of 0: the weights never change, so no validation after the first is a new best
    run_dir = tmp_path / "run"
    result = run([sys.executable, TRAIN, DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir), "--learning_rate", "0",
                  "--max_steps", "40", "--eval_steps", "2", "--save_steps", "0", "--early_stopping_patience", "1",
                  "--test_split", "", "--report_to", "none", "--output_dir", str(run_dir)])
    assert "Validation BLEU has not improved for 1 validations: stopping at step 4" in result.stdout
    assert [r["step"] for r in records(run_dir) if r["split"] == "validation"] == [2, 4]
    assert [c.name for c in complete_checkpoints(run_dir / "checkpoints")] == ["step-00000004"]
    assert (run_dir / "export/config.json").is_file()
