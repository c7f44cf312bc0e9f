"""The benchmark and analysis scripts: quick end-to-end runs with well-formed JSON, and the analyses on hand cases."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
from conftest import tiny_config

from hf_weaknat import WeakNATForConditionalGeneration, export_for_hub

TRAINING = Path(__file__).resolve().parents[1] / "training"
sys.path.insert(0, str(TRAINING))
from analyze import bleu_by_length, repetition_rate  # noqa: E402


def start(script: str, *args) -> subprocess.Popen:
    # one thread: the JSON's shape is under test, not the speed, and a busy machine makes 2-thread runs crawl
    return subprocess.Popen([sys.executable, str(TRAINING / script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, json_path: Path) -> dict:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return json.loads(json_path.read_text())


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Both benchmarks in --quick mode, run side by side (their start-up is mostly single-threaded imports)."""
    out = tmp_path_factory.mktemp("bench")
    speed = start("benchmark_speed.py", "--quick", "--threads", 1, "--json", out / "speed.json",
                  "--plot", out / "speed.png")
    training = start("benchmark_training.py", "--quick", "--threads", 1, "--json", out / "training.json")
    return {"speed": finish(speed, out / "speed.json"), "training": finish(training, out / "training.json"),
            "plot": out / "speed.png"}


def test_speed_benchmark_reports_medians_and_ratios_of_its_own_measurements(quick_runs):
    report = quick_runs["speed"]
    assert report["environment"]["threads"] == 1 and report["environment"]["torch"] == torch.__version__
    cpu = report["results"]["cpu"]
    assert set(cpu["batch_sizes"]) == {"1", "4"}
    for entry in cpu["batch_sizes"].values():
        systems = entry["systems"]
        assert set(systems) == {"nar_greedy", "nar_beam", "ar_greedy", "ar_beam"}
        assert entry["ar_forced_steps"] > 0  # random AR weights: a forced decoding length
        for row in systems.values():
            assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
            assert row["median_s"] == pytest.approx(statistics.median(row["times_s"]))
            assert row["ms_per_sentence"] == pytest.approx(1000 * row["median_s"] / entry["sentences"])
            assert row["sentences_per_s"] == pytest.approx(entry["sentences"] / row["median_s"])
            assert row["speedup_vs_ar_greedy"] == pytest.approx(systems["ar_greedy"]["median_s"] / row["median_s"])
            assert row["speedup_vs_ar_beam"] == pytest.approx(systems["ar_beam"]["median_s"] / row["median_s"])
    assert quick_runs["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_benchmark_ratios_params_and_memory_are_consistent(quick_runs):
    variants = quick_runs["training"]["variants"]
    assert list(variants) == ["plain_ctc", "no_tricks", "sharing", "sampling", "both"]
    plain = variants["plain_ctc"]["median_step_s"]
    for row in variants.values():
        assert all(t > 0 for t in row["step_times_s"])
        assert row["median_step_s"] == pytest.approx(statistics.median(row["step_times_s"]))
        assert row["ratio_to_plain_ctc"] == pytest.approx(row["median_step_s"] / plain)
        assert row["parameters"]["export"] == variants["plain_ctc"]["parameters"]["total"]  # export = plain CTC
        assert row["memory"]["peak_rss_mb"] >= row["memory"]["rss_after_build_mb"] > 0
        assert row["paper"]["ratio"] == pytest.approx(row["paper"]["hours"] / 17.3)
    total = {name: row["parameters"]["total"] for name, row in variants.items()}
    assert total["plain_ctc"] < total["sharing"] == total["both"] < total["no_tricks"] == total["sampling"]
    target = quick_runs["training"]["target"]
    assert target["met"] == (target["measured"] <= target["target"])


def test_repetition_rate_counts_tokens_equal_to_the_previous_token_in_the_same_sentence():
    assert repetition_rate(["a a b"]) == pytest.approx(1 / 3)
    assert repetition_rate(["a a a a"]) == pytest.approx(3 / 4)
    assert repetition_rate(["a b", "b c"]) == 0.0  # no repeat across sentence boundaries
    assert repetition_rate(["the cat sat", "on on the the mat"]) == pytest.approx(2 / 8)
    assert repetition_rate(["a , , b"]) == pytest.approx(1 / 4)
    assert repetition_rate([]) == 0.0 and repetition_rate(["", "  "]) == 0.0


def test_bleu_by_length_equals_sacrebleu_on_each_bucket_subset():
    references = ["a man rides a bike", "two dogs play in the snow near a house", "a girl",
                  "people walk along the beach at sunset while a dog runs after a ball in the water"]
    hypotheses = ["a man rides a bicycle", "two dogs are playing in snow near the house", "the girl",
                  "people walk on the beach at sunset and a dog runs after a ball in water"]
    rows = bleu_by_length(hypotheses, references, buckets=((0, 5), (5, 10), (10, None), (100, 200)))
    assert [r["sentences"] for r in rows] == [2, 1, 1, 0]
    expected = [[0, 2], [1], [3]]
    for row, chosen in zip(rows, expected):
        subset = sacrebleu.corpus_bleu([hypotheses[i] for i in chosen], [[references[i] for i in chosen]])
        assert row["bleu"] == pytest.approx(subset.score)
    assert rows[3]["bleu"] is None and rows[2]["bucket"] == ">10" and rows[0]["bucket"] == "(0,5]"
    with pytest.raises(ValueError):
        bleu_by_length(hypotheses[:2], references)


def test_analyze_cli_translates_with_an_exported_model_and_scores(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(vocab_size=len(tokenizer))).eval()
    export = export_for_hub(model, tmp_path / "export", tokenizer=tokenizer)
    source, reference = tmp_path / "src.de", tmp_path / "ref.en"
    source.write_text("Ein Hund läuft.\nZwei Männer sitzen auf einer Bank im Park.\nEin Kind.\n", encoding="utf-8")
    reference.write_text("A dog runs.\nTwo men sit on a bench in the park.\nA child.\n", encoding="utf-8")
    out = tmp_path / "analysis.json"
    run = subprocess.run([sys.executable, str(TRAINING / "analyze.py"), "--model", str(export), "--source",
                          str(source), "--reference", str(reference), "--num_beams", "2", "--batch_size", "2",
                          "--json", str(out), "--output", str(tmp_path / "hyp.en")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    with torch.inference_mode():
        batch = tokenizer(source.read_text(encoding="utf-8").splitlines(), padding=True, return_tensors="pt")
        expected = tokenizer.batch_decode(model.generate(**batch, num_beams=2), skip_special_tokens=True)
    assert report["translations"] == [t.strip() for t in expected]  # the CLI's batching and sorting change nothing
    hypotheses, references = report["translations"], reference.read_text(encoding="utf-8").splitlines()
    assert report["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert report["repetition_rate"] == pytest.approx(repetition_rate(hypotheses))
    assert sum(row["sentences"] for row in report["bleu_by_length"]) == 3
    assert "BLEU" in run.stdout and "repeated tokens" in run.stdout

    rescored = subprocess.run([sys.executable, str(TRAINING / "analyze.py"), "--hypotheses", str(tmp_path / "hyp.en"),
                               "--reference", str(reference), "--json", str(tmp_path / "rescored.json")],
                              capture_output=True, text=True, timeout=300)
    assert rescored.returncode == 0, rescored.stderr
    assert json.loads((tmp_path / "rescored.json").read_text())["bleu"] == pytest.approx(report["bleu"])
    assert not math.isnan(report["chrf"])


def test_compare_runs_tabulates_and_plots_each_runs_own_validation_records(tmp_path):
    logs = {"ctc": [(100, 5.0, 800.0), (200, 12.5, 820.0)], "weak": [(100, 4.0, 600.0), (200, 13.25, 640.0)]}
    for name, points in logs.items():
        (tmp_path / name).mkdir()
        lines = [{"split": "train", "step": step, "tokens_per_s": speed} for step, _, speed in points]
        lines += [{"split": "validation", "step": step, "bleu": bleu} for step, bleu, _ in points]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = subprocess.run([sys.executable, str(TRAINING / "compare_runs.py"), f"plain CTC={tmp_path / 'ctc'}",
                          str(tmp_path / "weak"), "--plot", str(tmp_path / "curves.png"), "--json",
                          str(tmp_path / "runs.json")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| plain CTC | 5.00 | 12.50 | 12.50 | 810 |" in out.stdout
    assert "| weak | 4.00 | 13.25 | 13.25 | 620 |" in out.stdout
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "runs.json").read_text())["weak"]["validation_bleu"] == {"100": 4.0, "200": 13.25}
