"""The study runner (training/evidence/study.py): a grid of runs trained, averaged, scored, skipped when done, reported."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from training.evidence import study
from training_runs import DEMO, ENV, REPO

# the tests' tiny demo model, for four updates, checkpoints every two
TINY_FLAGS = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "encoder_attention_heads": 2,
              "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
              "max_position_embeddings": 48, "max_train_samples": 200, "max_eval_samples": 16, "max_tokens": 600,
              "warmup_steps": 2, "learning_rate": 3e-3, "logging_steps": 2, "max_steps": 4, "eval_steps": 2,
              "save_steps": 2, "save_total_limit": 2, "report_to": "none", "compare_with": ""}


@pytest.fixture
def grid_file(tmp_path, monkeypatch, tokenizer_dir):
    monkeypatch.chdir(REPO)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, ENV[name])
    spec = {"recipe": DEMO, "results_dir": str(tmp_path / "results"), "runs_dir": str(tmp_path / "runs"),
            "average_last": 2, "num_beams": 2, "test_sentences": 40,
            "grids": {"tiny": {"baseline": "ctc", "flags": {**TINY_FLAGS, "tokenizer_name": str(tokenizer_dir)},
                               "seeds": [1],
                               "variants": {"ctc": {"weak_ar_layers": 0}, "weak_ar": {}}}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_grid_runs_each_variant_once_and_reports_means_and_paired_p_values(grid_file, tmp_path, monkeypatch):
    summary = study.main([str(grid_file), "--grid", "tiny"])
    results = tmp_path / "results" / "tiny"
    for variant in ("ctc", "weak_ar"):
        result = json.loads((results / f"{variant}-seed1.json").read_text())
        assert result["test"]["averaged_steps"] == [2, 4]  # the last two checkpoints, averaged
        for decoding in ("greedy", "beam2"):
            assert len(result["test"][decoding]["translations"]) == 40
            assert result["test"][decoding]["bleu_signature"].startswith("nrefs:1|")
        assert [r["step"] for r in result["validation"]] == [2, 4]
        assert all(0.0 <= r["repetition_rate"] <= 1.0 for r in result["validation"])  # repetition over training
        assert result["machine"]["processor"] not in ("", "x86_64")  # the CPU model: wall times depend on it
        # the partner-dependence diagnostic is logged at every validation, only where there are partners
        assert all(("partner_gap" in r) == (variant == "weak_ar") for r in result["validation"])
    row = summary["variants"]["weak_ar"]
    assert 0.0 <= row["p_values_greedy"][1] <= 1.0
    assert row["greedy_bleu_difference"] == pytest.approx(row["greedy_bleu"][0]
                                                          - summary["variants"]["ctc"]["greedy_bleu"][0])
    # the validation BLEU difference to the baseline, same seed, at every validation step (plotted under the gap)
    ctc_curve, weak_curve = ({r["step"]: r["bleu"] for r in json.loads((results / f"{v}-seed1.json").read_text())
                              ["validation"]} for v in ("ctc", "weak_ar"))
    assert summary["validation_bleu_difference"]["weak_ar"][1] == [(s, weak_curve[s] - ctc_curve[s]) for s in (2, 4)]
    table = (results / "README.md").read_text()
    assert "| ctc | 1 |" in table and "| weak_ar | 1 |" in table
    # one seed has no spread: the mean alone, never a "± 0.00" that reads like a measured standard deviation
    assert row["greedy_bleu"][1] is None
    assert all("±" not in line for line in table.splitlines() if line.startswith("| weak_ar"))
    for figure in ("learning_curves.png", "repetition_curves.png", "partner_dependence.png"):
        assert (results / figure).is_file()

    # a second call finds every result file and trains nothing
    monkeypatch.setattr(study, "train_in_child", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = study.main([str(grid_file), "--grid", "tiny"])
    assert again["variants"]["weak_ar"]["greedy_bleu"] == row["greedy_bleu"]
    # a variant declared the same run as another grid's (`same_as`) is read from there, not trained again
    spec = yaml.safe_load(grid_file.read_text())
    spec["grids"]["reuse"] = {**spec["grids"]["tiny"], "variants": {"ctc": {"same_as": "tiny/ctc"},
                                                                    "weak_ar": {"same_as": "tiny/weak_ar"}}}
    grid_file.write_text(yaml.safe_dump(spec))
    assert study.main([str(grid_file), "--grid", "reuse"])["variants"]["weak_ar"]["greedy_bleu"] == row["greedy_bleu"]

    # a smaller budget rescores the same runs from their checkpoints up to it, without training
    spec = yaml.safe_load(grid_file.read_text())
    spec["grids"]["tiny"]["budget"] = 2
    grid_file.write_text(yaml.safe_dump(spec))
    study.main([str(grid_file), "--grid", "tiny", "--score_only"])
    result = json.loads((results / "weak_ar-seed1.json").read_text())
    assert result["budget"] == 2 and result["test"]["averaged_steps"] == [2]
    assert [r["step"] for r in result["validation"]] == [2, 4]  # the whole curve stays, for the plateau
    spec["grids"]["tiny"]["budget"] = 3  # no checkpoint there: the run cannot be scored at that budget
    grid_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(RuntimeError, match="no checkpoint at the budget of 3 updates"):
        study.main([str(grid_file), "--grid", "tiny", "--score_only"])


def test_plateau_is_where_the_best_bleu_stops_gaining_until_the_end_of_the_run():
    curve = [{"step": s, "bleu": b} for s, b in [(100, 10.0), (200, 20.0), (300, 25.0), (400, 25.1), (500, 27.0),
                                                 (600, 28.0), (700, 28.1), (800, 28.2), (900, 28.1), (1000, 28.25)]]
    # from 600 (best 28.0) to the end (28.25): +0.25 < 0.3, over more than the last quarter; the pause at 300-400
    # is not a plateau, as the run gained 3 BLEU after it
    assert study.plateau_step(curve) == 600
    assert study.plateau_step(curve[:7]) is None  # flat only at the very end: still climbing as far as we know
    assert study.flat_at(None) == "not flat" and study.flat_at(600) == "600"  # as the table prints them


def test_a_run_stops_itself_once_flat_and_is_scored_where_it_stopped(grid_file, tmp_path):
    # a learning rate of 0: validation BLEU never moves, so the curve is flat from its first validation (step 2);
    # the rule holds from step 4 on, but the run waits for `stop_when_flat_after`
    spec = yaml.safe_load(grid_file.read_text())
    spec["grids"]["tiny"]["flags"].update(learning_rate=0, max_steps=12, stop_when_flat=0.3, stop_when_flat_after=6)
    grid_file.write_text(yaml.safe_dump(spec))
    summary = study.main([str(grid_file), "--grid", "tiny", "--variants", "ctc"])
    run_records = [json.loads(line) for line in (tmp_path / "runs/tiny/ctc-seed1/metrics.jsonl").open()]
    stop = [r for r in run_records if r["split"] == "stopped"]
    assert stop == [{"split": "stopped", "step": 6, "reason": "validation BLEU flat", "flat_since": 2, "gain": 0.3}]
    assert max(r["step"] for r in run_records) == 6
    result = json.loads((tmp_path / "results/tiny/ctc-seed1.json").read_text())
    assert result["budget"] == 6 and result["test"]["averaged_steps"] == [4, 6]  # its own end, not max_steps
    assert summary["variants"]["ctc"]["updates"] == [6]
    assert "up to 12 updates per run, each stopping once its validation BLEU is flat" in \
        (tmp_path / "results/tiny/README.md").read_text()


@pytest.mark.parametrize("records, resumed", [
    ([("train", 2), ("train", 4)], False),
    ([("train", 2), ("stopped", 3), ("train", 4)], True),  # a stop signal, then `--resume_from_checkpoint latest`
    ([("train", 2), ("train", 4), ("train", 4)], True),  # killed after update 4, resumed from its checkpoint at 2
])
def test_a_resumed_run_reports_no_wall_time_and_the_table_says_so(records, resumed, tmp_path):
    # a resume rewrites run_args.json, and the parts of a resumed run trained under different loads
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"split": split, "step": step, **({"signal": "SIGTERM"} if split == "stopped" else {})}) + "\n"
        for split, step in records))
    assert study.was_resumed(tmp_path) == resumed
    if resumed:
        assert study.wall_time_to_budget({}, tmp_path) is None
        row = {"seeds": [1], "plateau_step": {1: None}, "updates": [4], "train_wall_time_min": [None],
               **{f"{d}_{m}": (1.0, None) for d in ("greedy", "beam2") for m in ("bleu", "chrf", "repetition_rate")}}
        table = study.markdown({"name": "g", "num_beams": 2, "flags": {"max_steps": 4}, "recipe": "r",
                                "average_last": 2, "baseline": "a"}, {"variants": {"a": row}})
        assert table.splitlines()[-1].endswith("| 4 | resumed |")


def test_a_stopped_study_stops_its_training_run_too(tmp_path):
    # a training child left running after its study is killed would keep writing into the run directory
    pid_file = tmp_path / "child.pid"
    child_code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    study_code = (f"import sys; from training.evidence.study import train_in_child; "
                  f"train_in_child([sys.executable, '-c', {child_code!r}])")
    parent = subprocess.Popen([sys.executable, "-c", study_code], cwd=REPO, env=ENV)
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()):
        assert time.monotonic() < deadline and parent.poll() is None, "the training child never started"
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)


def test_a_failed_training_run_fails_the_study():
    with pytest.raises(subprocess.CalledProcessError):
        study.train_in_child([sys.executable, "-c", "raise SystemExit(3)"])


def test_an_unknown_grid_or_variant_is_named(grid_file):
    with pytest.raises(ValueError, match="no grid 'nope'"):
        study.main([str(grid_file), "--grid", "nope"])
    with pytest.raises(SystemExit):
        study.main([str(grid_file), "--grid", "tiny", "--variants", "glancing"])
