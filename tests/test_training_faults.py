"""Faults named where they happen (issue 10): divergence, bad data, bad recipe values, damaged checkpoints.

Each numbered case of the issue is reproduced here (case 6, inference, is tested with generate and the pipeline):
1 a diverging run, 2 invalid UTF-8 and line counts, 3 a JSONL row without a language, 4 recipe values,
5 a truncated checkpoint, 7 the label of an empty source.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from training_runs import DEMO, ENV, REPO, TINY, TRAIN, records, run
from transformers import AutoTokenizer

from hf_weaknat import WeakNATConfig, WeakNATForConditionalGeneration
from training import arguments, average_checkpoints, data, export, train
from training.checkpoints import (
    MODEL_DIR, STATE_FILE, DamagedCheckpointError, NonFiniteWeightsError, TrainState, checkpoint_name,
    checkpoint_problem, complete_checkpoints, save_checkpoint,
)
from training.model_card import export_with_card
from training.records import MetricsLog, read_records
from training.trainer import train_step


def tiny_model(seed: int = 0) -> WeakNATForConditionalGeneration:
    torch.manual_seed(seed)
    return WeakNATForConditionalGeneration(WeakNATConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16))


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values() if t.is_floating_point())


# ---------------------------------------------------------------------------------------------------------------
# 1. Divergence: skipped, counted, stopped; nothing non-finite written


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])  # bf16 has no grad scaler: the same rule applies
def test_a_diverging_run_stops_with_an_error_and_leaves_nothing_non_finite(tokenizer_dir, tmp_path, mixed_precision):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, TRAIN, DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir), "--learning_rate", "1000",
         "--warmup_steps", "1", "--max_steps", "12", "--save_steps", "1", "--eval_steps", "0", "--report_to", "none",
         "--max_consecutive_nonfinite_steps", "3", "--mixed_precision", mixed_precision, "--output_dir", str(run_dir)],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout[-3000:]
    assert "TrainingDiverged: Training diverged: 3 attempts in a row at optimizer step" in result.stderr
    assert "--max_consecutive_nonfinite_steps 3" in result.stderr and "lower --learning_rate" in result.stderr
    assert "update skipped (1 in a row" in result.stdout  # warned at the step it happened
    skipped = [r for r in records(run_dir) if r["split"] == "skipped"]
    # (an isolated bad step may come first: skipped, then training goes on)
    assert [r["in_a_row"] for r in skipped][-3:] == [1, 2, 3]
    assert [r["skipped_steps"] for r in skipped] == list(range(1, len(skipped) + 1))
    assert all(r["reason"].startswith("non-finite") for r in skipped)
    assert not any(r["split"] == "train" and r["loss"] in ("nan", "inf") for r in records(run_dir))
    # no export, no card, and every checkpoint written before the divergence holds finite weights only
    assert not (run_dir / "export").exists() and not list(run_dir.rglob("README.md"))
    assert not list(run_dir.rglob("eval_results.json"))
    checkpoints = complete_checkpoints(run_dir / "checkpoints")
    assert checkpoints and skipped[-1]["step"] == int(checkpoints[-1].name.split("-")[1]) + 1  # saved each step
    for files in [list(c.rglob("*.safetensors")) for c in checkpoints]:
        assert files and all(all_finite(f) for f in files)


class Toy(torch.nn.Module):
    """A model train_step can drive, made to fail on demand: a NaN loss, or NaN gradients under a finite loss."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.fault = None

    def forward(self, input_ids, attention_mask, labels, training_step):
        weight = self.weight.clone()
        if self.fault == "gradients":
            weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        loss = (weight * input_ids[:, :3].float()).sum() / 10
        if self.fault == "loss":  # NaN loss, yet finite gradients: only the loss check sees it
            loss = loss + torch.tensor(float("nan"))
        return SimpleNamespace(loss=loss)


def toy_training(mixed_precision="no", init_scale=4.0):
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision, step_scheduler_with_optimizer=False)
    if mixed_precision == "fp16":  # what accelerate sets up for fp16 on a GPU: a grad scaler and native AMP
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    toy = Toy()
    optimizer = torch.optim.AdamW(toy.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(toy, optimizer, scheduler)
    if mixed_precision == "fp16":
        accelerator.native_amp = True  # after prepare: the scaler's bookkeeping without CPU float16 autocast
    return accelerator, toy, model, optimizer, scheduler


def step(training, clip=0.0):
    accelerator, _, model, optimizer, scheduler = training
    return train_step(accelerator, model, optimizer, scheduler, [[{"input_ids": [1, 2, 3], "labels": [4]}]], 0,
                      clip, 0)


@pytest.mark.parametrize("fault, reason", [("loss", "non-finite loss"), ("gradients", "non-finite gradients")])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_a_non_finite_step_changes_no_weight_and_the_next_good_step_trains(fault, reason, clip):
    training = toy_training()
    toy, scheduler = training[1], training[4]
    toy.fault = fault
    totals = step(training, clip)
    assert (totals["skipped"], totals["counts_as_nonfinite"]) == (reason, True)
    assert torch.equal(toy.weight, torch.ones(3)) and toy.weight.grad is None
    assert scheduler.scheduler.last_epoch == 0  # the schedule waits for an applied update
    toy.fault = None
    totals = step(training, clip)
    assert totals["skipped"] is None and totals["grad_norm"] > 0
    assert not torch.equal(toy.weight, torch.ones(3)) and scheduler.scheduler.last_epoch == 1


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one state per process: start fp16 afresh, and leave none behind for the other tests."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_fp16_keeps_its_grad_scaler_and_counts_overflows_only_once_the_scale_is_below_one(fresh_accelerator_state):
    training = toy_training("fp16", init_scale=4.0)
    accelerator, toy = training[0], training[1]
    toy.fault = "gradients"
    seen = []
    for _ in range(4):  # the scaler halves its scale on each overflow: 2, 1, 0.5, 0.25
        totals = step(training)
        seen.append((totals["skipped"], totals["counts_as_nonfinite"], accelerator.scaler.get_scale()))
    assert seen == [("fp16 gradient overflow", False, 2.0), ("fp16 gradient overflow", False, 1.0),
                    ("fp16 gradient overflow", True, 0.5), ("fp16 gradient overflow", True, 0.25)]
    assert torch.equal(toy.weight, torch.ones(3))
    toy.fault = "loss"  # a NaN loss with finite gradients: no update, and the scaler is ready for the next step
    assert step(training)["skipped"] == "non-finite loss" and torch.equal(toy.weight, torch.ones(3))
    toy.fault = None
    assert step(training)["skipped"] is None and not torch.equal(toy.weight, torch.ones(3))


POISONED = "model.decoder.layers.1.ffn.sublayer.fc1.weight"


def poisoned(model):
    """`model` with one NaN in POISONED, a weight of its second decoder layer."""
    with torch.no_grad():
        model.get_parameter(POISONED)[0, 0] = float("nan")
    return model


def test_a_checkpoint_of_non_finite_weights_is_refused_and_nothing_is_written(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(poisoned(tiny_model()))
    with pytest.raises(NonFiniteWeightsError, match=rf"checkpoint .*step-00000007 at step 7: weight {POISONED} holds "
                                                     "NaN or infinite values"):
        save_checkpoint(accelerator, model, tmp_path / "checkpoints", TrainState(step=7), 2, 1)
    assert not (tmp_path / "checkpoints").exists()


def test_an_export_and_card_of_non_finite_weights_are_refused(tokenizer_dir, tmp_path):
    with pytest.raises(NonFiniteWeightsError, match=rf"export to .* at step 12: weight {POISONED} holds NaN"):
        export_with_card(poisoned(tiny_model()), AutoTokenizer.from_pretrained(tokenizer_dir), tmp_path / "export",
                         run_args={}, scores={}, eval_split="test", filtered={}, steps=12, example_source="Ein Hund.")
    assert not (tmp_path / "export").exists()


def test_metrics_hold_non_finite_numbers_as_strings(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"split": "skipped", "step": 3, "loss": float("nan"), "grad_norm": float("inf")})
    json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert read_records(tmp_path / "metrics.jsonl") == [{"split": "skipped", "step": 3, "loss": "nan",
                                                         "grad_norm": "inf"}]


# ---------------------------------------------------------------------------------------------------------------
# 2, 3, 7. Data errors name the file, the line or row, and what is wrong; every left-out pair has its own label


def write_two_files(directory: Path, source: bytes, target: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.de").write_bytes(source)
    (directory / "train.en").write_bytes(target)
    return directory


LINES = 400
GERMAN = b"".join(f"Ein Hund {i} rennt.\n".encode() for i in range(LINES))
ENGLISH = b"".join(f"A dog {i} runs.\n".encode() for i in range(LINES))
BROKEN = GERMAN.replace(b"Ein Hund 6 rennt.", b"Ein Hund \xff6 rennt.")  # line 7, both files of 400 lines


@pytest.mark.parametrize("streaming", [False, True])
def test_invalid_utf8_is_named_by_file_and_line_not_taken_for_a_line_count_mismatch(tmp_path, streaming):
    directory = write_two_files(tmp_path, BROKEN, ENGLISH)
    with pytest.raises(data.DataError) as failure:
        list(data.load_split(str(directory), "train", "de", "en", streaming=streaming))
    message = str(failure.value)
    assert f"{directory / 'train.de'}: line 7 is not valid UTF-8 (byte 0xff at position 10" in message
    assert "--invalid_utf8 skip" in message and "numbers of lines" not in message


def test_invalid_utf8_lines_can_be_skipped_and_counted(tmp_path, tokenizer_dir):
    directory = write_two_files(tmp_path, BROKEN, ENGLISH)
    pairs = data.load_split(str(directory), "train", "de", "en", invalid_utf8="skip")
    assert len(pairs) == LINES and pairs[6] == {"source": None, "target": None}
    assert pairs[7] == {"source": "Ein Hund 7 rennt.", "target": "A dog 7 runs."}
    assert len(list(data.training_texts(pairs))) == 2 * (LINES - 1)  # the tokenizer never sees the bad pair
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    kept, counts = data.drop_unfit_pairs(data.tokenize_pairs(pairs, tokenizer, 3, 48))
    assert counts["invalid_utf8"] == 1 and counts["kept"] == len(kept) == LINES - 1
    data_args = arguments.DataArguments(dataset=str(directory), validation_split="train", test_split=None,
                                        invalid_utf8="skip")
    assert len(data.load_evaluation_splits(data_args)["train"]) == LINES - 1  # no reference to score against


def test_a_line_count_mismatch_reports_both_counts(tmp_path):
    directory = write_two_files(tmp_path, GERMAN, ENGLISH + b"One more.\n")
    with pytest.raises(data.DataError, match=f"train.de has {LINES} lines but .*train.en has {LINES + 1}: the two "
                                             "files of a split must be aligned line by line"):
        data.load_split(str(directory), "train", "de", "en")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_jsonl_row_without_the_target_language_names_the_file_the_row_and_the_field(tmp_path, streaming):
    rows = [{"translation": {"de": f"Satz {i}", "en": f"Sentence {i}"}} for i in range(20)]
    del rows[9]["translation"]["en"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(data.DataError, match=r"train\.jsonl: row 10 has no 'en' text in its translation "
                                             r"\(\{'de': 'Satz 9'"):
        list(data.load_split(str(tmp_path), "train", "de", "en", streaming=streaming))
    with pytest.raises(data.DataError, match=r"train\.jsonl: row 1 has no 'fr' text"):
        list(data.load_split(str(tmp_path), "train", "de", "fr"))


def test_a_file_without_the_language_columns_is_named(tmp_path):
    (tmp_path / "train.tsv").write_text("de\tfr\nHund\tchien\n")
    with pytest.raises(data.DataError, match=r"train\.tsv: its header names no 'en' column \(header: de, fr\)"):
        data.load_split(str(tmp_path), "train", "de", "en")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/train.jsonl").write_text('{"de": "Hund", "en": "dog"}\n')
    with pytest.raises(data.DataError, match=r"train\.jsonl has no 'translation' column \(columns: de, en\)"):
        data.load_split(str(tmp_path / "other"), "train", "de", "en")


def test_an_empty_source_has_its_own_label(tmp_path, tokenizer_dir):
    pairs = [("Ein Hund rennt.", "A dog runs."), ("", "A man."), ("   ", "Yes."), ("Ja.", "")]
    directory = write_two_files(tmp_path, "".join(d + "\n" for d, _ in pairs).encode(),
                                "".join(e + "\n" for _, e in pairs).encode())
    tokenized = data.tokenize_pairs(data.load_split(str(directory), "train", "de", "en"),
                                    AutoTokenizer.from_pretrained(tokenizer_dir), 3, 48)
    assert tokenized["fit"] == [data.FITS, data.EMPTY_SOURCE, data.EMPTY_SOURCE, data.FITS]
    _, counts = data.drop_unfit_pairs(tokenized)
    assert counts == {"kept": 2, "source_too_long": 0, "target_does_not_fit": 0, "empty_source": 2,
                      "invalid_utf8": 0, "length_offset_out_of_range": 0}


def test_the_model_card_names_every_reason_a_pair_was_left_out():
    from training.model_card import FAMILIES, filtered_text

    counts = {"kept": 90, "source_too_long": 4, "target_does_not_fit": 3, "empty_source": 2, "invalid_utf8": 1}
    assert filtered_text(counts, WeakNATConfig(max_position_embeddings=64), FAMILIES["weaknat"]) == (
        "4 with sources over 64 tokens, 3 whose target cannot fit the CTC frames, 2 with an empty source, 1 that are "
        "not valid UTF-8 (of 100 pairs)")


# ---------------------------------------------------------------------------------------------------------------
# 4. Recipe values: checked when parsed, the same way from a recipe and from a flag, naming the field


@pytest.mark.parametrize("section, name, recipe_value, flag, message", [
    ("training", "max_steps", None, "", "max_steps must be a positive integer"),
    ("training", "max_steps", 2.5, "2.5", "max_steps must be a positive integer"),
    ("training", "max_steps", 0, "0", "max_steps must be a positive integer"),
    ("training", "save_steps", 0.5, "0.5", "save_steps must be a non-negative integer"),
    ("training", "save_steps", -1, "-1", "save_steps must be a non-negative integer"),
    ("training", "max_tokens", "many", "many", "max_tokens must be a positive integer"),
    ("training", "learning_rate", -0.1, "-0.1", "learning_rate must be a number >= 0"),
    ("training", "adam_beta2", 1.5, "1.5", "adam_beta2 must be a number in \\[0, 1\\)"),
    ("training", "mixed_precision", "fp32", "fp32", "mixed_precision must be one of no, bf16, fp16"),
    ("training", "max_consecutive_nonfinite_steps", 0, "0", "max_consecutive_nonfinite_steps must be a positive"),
    ("training", "save_total_limit", 0, "0", "save_total_limit must be a positive integer"),
    ("data", "streaming", "maybe", "maybe", "streaming must be true or false"),
    ("data", "vocab_size", 0, "0", "vocab_size must be a positive integer"),
    ("data", "max_train_samples", 1.5, "1.5", "max_train_samples must be a positive integer"),
    ("data", "invalid_utf8", "ignore", "ignore", "invalid_utf8 must be one of error, skip"),
])
def test_a_bad_value_is_refused_alike_from_a_recipe_and_from_the_command_line(section, name, recipe_value, flag,
                                                                               message, tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({section: {name: recipe_value}}))
    for argv in ([str(tmp_path / "r.yaml")], [f"--{name}", flag]):
        with pytest.raises(ValueError, match=message):
            arguments.parse_arguments(argv)


def test_recipe_values_are_converted_like_flags(tmp_path):
    # PyYAML reads 5e-4 (no dot) as a string, and a quoted number is one too: both mean what the flag would
    (tmp_path / "r.yaml").write_text("training:\n  learning_rate: 5e-4\n  max_steps: '12'\ndata:\n  streaming: 'yes'\n")
    _, data_args, train_args = arguments.parse_arguments([str(tmp_path / "r.yaml")])
    assert (train_args.learning_rate, train_args.max_steps, data_args.streaming) == (5e-4, 12, True)
    (tmp_path / "no.yaml").write_text("data:\n  source_lang: no\n")  # YAML 1.1 reads `no` as false
    with pytest.raises(ValueError, match="source_lang must be a non-empty string .* quote it"):
        arguments.parse_arguments([str(tmp_path / "no.yaml")])


def test_a_bad_value_stops_the_run_before_any_data_is_loaded(tmp_path):
    with pytest.raises(ValueError, match="max_steps must be a positive integer") as failure:
        train.main([DEMO, "--max_steps", "0", "--dataset", str(tmp_path / "no-such-corpus"),
                    "--output_dir", str(tmp_path / "run")])
    assert "glancing_anneal_steps" not in str(failure.value) and not (tmp_path / "run").exists()


def test_a_reference_model_that_does_not_exist_stops_the_run_before_training(tmp_path):
    with pytest.raises(ValueError, match="compare_with='no/such/model/here': no model there"):
        train.main([DEMO, "--compare_with", "no/such/model/here", "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. Damaged checkpoints: named with their step; resume falls back to the newest loadable one


def fake_checkpoint(root: Path, step: int, model=None) -> Path:
    path = root / checkpoint_name(step)
    (model or tiny_model(step)).save_pretrained(path / MODEL_DIR)
    TrainState(step=step, validation_bleu={str(step): float(step)}).save(path / STATE_FILE)
    return path


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_checkpoint_is_named_with_its_step(tmp_path):
    checkpoint = fake_checkpoint(tmp_path, 20)
    assert checkpoint_problem(checkpoint) is None
    truncate(checkpoint / MODEL_DIR / "model.safetensors")
    assert checkpoint_problem(checkpoint).startswith("model/model.safetensors: truncated or damaged (SafetensorError")
    (checkpoint / MODEL_DIR / "model.safetensors").write_bytes(b"")
    assert checkpoint_problem(checkpoint) == "model/model.safetensors: empty file"


def test_resume_from_a_damaged_checkpoint_names_it_and_says_how_to_continue(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 10)
    newest = fake_checkpoint(root, 20)
    truncate(newest / MODEL_DIR / "model.safetensors")
    _, _, train_args = arguments.parse_arguments(["--resume_from_checkpoint", str(newest)])
    with pytest.raises(DamagedCheckpointError, match=r"Cannot resume from checkpoint .*step-00000020 \(step 20\): it "
                                                     r"is damaged \(model/model.safetensors: truncated.*"
                                                     r"--resume_from_checkpoint latest .*step-00000010 \(step 10\)"):
        train.resume_checkpoint(tmp_path, train_args)
    warnings = []
    train_args.resume_from_checkpoint = "latest"
    assert train.resume_checkpoint(tmp_path, train_args, warnings.append).name == "step-00000010"
    assert "step-00000020 (step 20) is damaged" in warnings[0] and "resumes from" in warnings[0]
    truncate(root / "step-00000010" / STATE_FILE)
    with pytest.raises(DamagedCheckpointError, match="Every checkpoint under .* is damaged .* Move them out"):
        train.resume_checkpoint(tmp_path, train_args, warnings.append)


def test_a_checkpoint_that_fails_to_load_is_named(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(tiny_model())
    checkpoint = save_checkpoint(accelerator, model, tmp_path, TrainState(step=3), 2, 1)
    other = Accelerator(cpu=True)
    other.prepare(WeakNATForConditionalGeneration(WeakNATConfig(vocab_size=40, d_model=32, encoder_layers=1,
                                                                decoder_layers=1)))
    with pytest.raises(DamagedCheckpointError, match=r"(?s)Could not resume from checkpoint .*step-00000003 "
                                                     r"\(step 3\): RuntimeError.*size mismatch.*resume with those it "
                                                     r"was saved with"):
        train.load_training_state(other, checkpoint)


def test_resume_latest_falls_back_past_a_truncated_checkpoint_and_sets_it_aside(tokenizer_dir, tmp_path):
    common = [sys.executable, TRAIN, DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir), "--save_steps", "2",
              "--eval_steps", "0", "--report_to", "none", "--output_dir", str(tmp_path)]
    run([*common, "--max_steps", "4"])
    truncate(tmp_path / "checkpoints/step-00000004/model.safetensors")  # accelerate's copy, the one resume loads
    result = run([*common, "--max_steps", "6", "--resume_from_checkpoint", "latest"])
    assert (f"Warning: checkpoint {tmp_path / 'checkpoints/step-00000004'} (step 4) is damaged (model.safetensors: "
            "truncated or damaged") in result.stdout
    assert f"Resumed from {tmp_path / 'checkpoints/step-00000002'} (step 2," in result.stdout
    assert (tmp_path / "checkpoints/damaged-step-00000004").is_dir()  # kept for inspection, out of the rotation
    assert [c.name for c in complete_checkpoints(tmp_path / "checkpoints")] == ["step-00000004", "step-00000006"]
    assert all(checkpoint_problem(c) is None for c in complete_checkpoints(tmp_path / "checkpoints"))
    assert (tmp_path / "export/config.json").is_file()


def test_average_and_export_name_a_damaged_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    paths = [fake_checkpoint(root, step) for step in (10, 20, 30)]
    truncate(paths[1] / MODEL_DIR / "model.safetensors")
    with pytest.raises(DamagedCheckpointError, match=r"Checkpoint .*step-00000020 \(step 20\) is damaged "
                                                     r"\(model.safetensors: truncated.*pass the checkpoints to average "
                                                     r"with --checkpoints"):
        average_checkpoints.main(["--run_dir", str(tmp_path), "--last", "3"])
    assert not (root / "average-last3").exists()
    nan_model = poisoned(tiny_model())
    nan_path = fake_checkpoint(tmp_path / "nan", 40, nan_model)
    with pytest.raises(NonFiniteWeightsError, match=rf"step-00000040 \(step 40\) holds NaN .* weight {POISONED}"):
        average_checkpoints.main(["--checkpoints", str(paths[0]), str(nan_path), "--output_dir", str(tmp_path / "a")])
    (tmp_path / "run_args.json").write_text("{}")
    with pytest.raises(DamagedCheckpointError, match=r"step-00000020 \(step 20\) is damaged .* --checkpoint <path> "
                                                     r"\(the newest loadable checkpoint is .*step-00000030"):
        export.main(["--run_dir", str(tmp_path), "--checkpoint", str(paths[1])])
