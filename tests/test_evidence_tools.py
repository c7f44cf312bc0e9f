"""The evidence tools (training/evidence/): the benchmarks' JSON is well formed and consistent with its own
measurements, the analyses match sacreBLEU on hand cases, and each tool runs on exported models as the README does."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
from conftest import MULTI30K, tiny_config
from training_runs import ENV, REPO, run
from transformers import AutoTokenizer, MarianMTModel

from hf_weaknat import WeakNATForConditionalGeneration, export_for_hub
from training.ar_baseline import MarianBaseline, export_marian, marian_config
from training.data import load_or_train_tokenizer
from training.evidence.analyze import bleu_by_length, repetition_rate

EVIDENCE = REPO / "training/evidence"
POSITIONS = 48  # of the exported models below


@pytest.fixture(scope="module")
def exports(tokenizer_dir, tmp_path_factory):
    """A tiny WeakNAT and a tiny MarianMTModel (random weights), exported as train.py exports them."""
    out = tmp_path_factory.mktemp("exports")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    nar = WeakNATForConditionalGeneration(tiny_config(vocab_size=len(tokenizer), max_position_embeddings=POSITIONS))
    export_for_hub(nar, out / "nar", tokenizer=tokenizer)
    sizes = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=POSITIONS)
    export_marian(MarianBaseline(marian_config(tokenizer, **sizes)), tokenizer, out / "ar")
    return {"nar": out / "nar", "ar": out / "ar"}


def start(script: str, *args) -> subprocess.Popen:
    # run by path, as the README does; one thread: the JSON's shape is under test, not the speed, and a busy machine
    # makes 2-thread runs crawl
    return subprocess.Popen([sys.executable, str(EVIDENCE / script), *map(str, args)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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
    result = run([sys.executable, str(EVIDENCE / "analyze.py"), "--model", str(export), "--source", str(source),
                  "--reference", str(reference), "--num_beams", "2", "--batch_size", "2", "--json", str(out),
                  "--output", str(tmp_path / "hyp.en")], timeout=300)
    report = json.loads(out.read_text())
    with torch.inference_mode():
        batch = tokenizer(source.read_text(encoding="utf-8").splitlines(), padding=True, return_tensors="pt")
        expected = tokenizer.batch_decode(model.generate(**batch, num_beams=2), skip_special_tokens=True)
    assert report["translations"] == [t.strip() for t in expected]  # the CLI's batching and sorting change nothing
    hypotheses, references = report["translations"], reference.read_text(encoding="utf-8").splitlines()
    assert report["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert report["repetition_rate"] == pytest.approx(repetition_rate(hypotheses))
    assert sum(row["sentences"] for row in report["bleu_by_length"]) == 3
    assert "BLEU" in result.stdout and "repeated tokens" in result.stdout

    run([sys.executable, "-m", "training.evidence.analyze", "--hypotheses", str(tmp_path / "hyp.en"),  # as a module
         "--reference", str(reference), "--json", str(tmp_path / "rescored.json")])
    assert json.loads((tmp_path / "rescored.json").read_text())["bleu"] == pytest.approx(report["bleu"])
    assert not math.isnan(report["chrf"])


def test_compare_runs_tabulates_and_plots_each_runs_own_validation_records(tmp_path):
    logs = {"ctc": [(100, 5.0, 800.0), (200, 12.5, 820.0)], "weak": [(100, 4.0, 600.0), (200, 13.25, 640.0)]}
    for name, points in logs.items():
        (tmp_path / name).mkdir()
        lines = [{"split": "train", "step": step, "tokens_per_s": speed} for step, _, speed in points]
        lines += [{"split": "validation", "step": step, "bleu": bleu} for step, bleu, _ in points]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = run([sys.executable, str(EVIDENCE / "compare_runs.py"), f"plain CTC={tmp_path / 'ctc'}",
               str(tmp_path / "weak"), "--plot", str(tmp_path / "curves.png"), "--json", str(tmp_path / "runs.json")],
              timeout=120)
    assert "| plain CTC | 5.00 | 12.50 | 12.50 | 810 |" in out.stdout
    assert "| weak | 4.00 | 13.25 | 13.25 | 620 |" in out.stdout
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "runs.json").read_text())["weak"]["validation_bleu"] == {"100": 4.0, "200": 13.25}


def test_analyze_scores_an_ar_export_and_keeps_its_output_within_the_positions(exports, tmp_path):
    sources = (MULTI30K / "test.de").read_text(encoding="utf-8").splitlines()[:6]
    sources.append(" ".join(sources))  # far over the model's 48 positions: cut, never an index error
    (tmp_path / "src.de").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (tmp_path / "ref.en").write_text("\n".join(["A reference ."] * len(sources)) + "\n", encoding="utf-8")
    result = run([sys.executable, str(EVIDENCE / "analyze.py"), "--model", str(exports["ar"]), "--num_beams", "2",
                  "--source", str(tmp_path / "src.de"), "--reference", str(tmp_path / "ref.en"),
                  "--json", str(tmp_path / "a.json")])
    report = json.loads((tmp_path / "a.json").read_text())
    assert len(report["translations"]) == len(sources) and "repeated tokens" in result.stdout
    model, tokenizer = MarianMTModel.from_pretrained(exports["ar"]).eval(), AutoTokenizer.from_pretrained(exports["ar"])
    batch = tokenizer(sources[:1], truncation=True, max_length=POSITIONS, return_tensors="pt")  # alone, unpadded
    limit = min(2 * batch["input_ids"].shape[1] + 10, POSITIONS - 1)
    alone = tokenizer.decode(model.generate(**batch, num_beams=2, max_new_tokens=limit)[0], skip_special_tokens=True)
    assert report["translations"][0] == alone.strip()


def test_speed_benchmark_on_exported_models_scores_every_system(exports, tmp_path):
    """`--nar/--ar` directories: each model with its own tokenizer, AR decoding to its own </s>, BLEU per system."""
    out = tmp_path / "speed.json"
    run([sys.executable, str(EVIDENCE / "benchmark_speed.py"), "--quick", "--threads", "1", "--int8",
         "--nar", str(exports["nar"]), "--ar", str(exports["ar"]), "--bleu_lines", "8", "--json", str(out)])
    result = json.loads(out.read_text())["results"]["cpu"]
    assert set(result["bleu"]) == {"nar_greedy", "nar_beam", "ar_greedy", "ar_beam", "nar_greedy_int8",
                                   "ar_greedy_int8"}
    for score in result["bleu"].values():
        assert score["sentences"] == 8 and score["signature"].startswith("nrefs:1|") and score["bleu"] >= 0
    assert all(entry["ar_forced_steps"] is None for entry in result["batch_sizes"].values())  # a given AR stops itself


def test_speed_benchmark_times_onnx_runtime_and_ctranslate2_beside_the_others(exports, tmp_path):
    """`--onnx --ctranslate2 --int8`: the NAR's ONNX graph and the AR converted by CTranslate2 on the same batches;
    the engines translate as the models they run (fp32 ONNX: the PyTorch NAR's BLEU; CTranslate2: the AR's)."""
    pytest.importorskip("ctranslate2", reason="the engines extra is not installed (pip install .[engines])")
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install .[onnx])")
    out = tmp_path / "speed.json"
    printed = run([sys.executable, str(EVIDENCE / "benchmark_speed.py"), "--quick", "--threads", "1", "--int8",
                   "--onnx", "--onnx_fused", "--ctranslate2", "--nar", str(exports["nar"]), "--ar", str(exports["ar"]),
                   "--bleu_lines", "16", "--json", str(out)]).stdout
    result = json.loads(out.read_text())["results"]["cpu"]
    engines = {"nar_onnx_greedy", "nar_onnx_greedy_int8", "nar_onnx_fused_greedy", "nar_onnx_fused_greedy_int8",
               "ct2_greedy", "ct2_beam", "ct2_greedy_int8", "ct2_beam_int8"}
    for entry in result["batch_sizes"].values():
        systems = entry["systems"]
        assert engines <= set(systems)
        for row in systems.values():
            assert row["speedup_vs_ct2_greedy_int8"] == pytest.approx(systems["ct2_greedy_int8"]["median_s"]
                                                                      / row["median_s"])
    bleu = {name: score["bleu"] for name, score in result["bleu"].items()}
    assert engines <= set(bleu)
    assert bleu["nar_onnx_greedy"] == pytest.approx(bleu["nar_greedy"], abs=1e-9)
    assert bleu["nar_onnx_fused_greedy"] == pytest.approx(bleu["nar_greedy"], abs=1e-9)  # fusion changes no token
    assert bleu["ct2_greedy"] == pytest.approx(bleu["ar_greedy"], abs=0.3)
    assert "x CT2 greedy int8" in printed


def test_ctranslate2_settings_run_in_their_own_processes_with_the_kernels_they_ask_for(tmp_path):
    """ct2_settings.py: each setting's worker reports the kernels its variables select (MKL on request, whatever
    the CPU's vendor), and every setting is timed at every batch size in every round."""
    pytest.importorskip("ctranslate2", reason="the engines extra is not installed (pip install .[engines])")
    out = tmp_path / "settings.json"
    run([sys.executable, str(EVIDENCE / "ct2_settings.py"), "--quick", "--settings", "default,mkl",
         "--compute_types", "int8", "--batch_sizes", "1,4", "--sentences", "1:4,4:8", "--repeats", "2",
         "--warmup", "1", "--threads", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["kernels"]["mkl"]["Use Intel MKL"] == "true"
    assert report["kernels"]["mkl"]["GEMM_S8 backend"].startswith("MKL")
    assert report["sentences"] == {"1": 4, "4": 8}
    for setting in ("default", "mkl"):
        for bs in (1, 4):
            seconds = report["seconds"][f"int8/{setting}/{bs}"]
            assert len(seconds) == 2 and all(s > 0 for s in seconds)
            assert report["ms_per_sentence"][f"int8/{setting}/{bs}"] == pytest.approx(
                1000 * statistics.median(seconds) / report["sentences"][str(bs)])


def test_one_tokenizer_function_loads_a_saved_tokenizer_or_trains_one(tokenizer_dir, tmp_path):
    loaded, origin = load_or_train_tokenizer(str(tokenizer_dir), vocab_size=0, save_directory=tmp_path / "copy")
    assert origin == f"loaded from {tokenizer_dir}" and (tmp_path / "copy/tokenizer.json").is_file()
    files = [MULTI30K / "valid.de", MULTI30K / "valid.en"]
    trained, origin = load_or_train_tokenizer(None, files=files, vocab_size=200, max_sentences=500, num_threads=1)
    assert len(trained) == 200 and origin.startswith(
        "joint unigram SentencePiece, 200 pieces, trained on valid.de + valid.en (at most 500 lines) in ")


def test_gpu_evidence_runs_every_stage_on_the_cpu_with_tiny_sizes(tmp_path):
    """The smoke test of the one command the lent GPU runs (training/evidence/gpu_evidence.py), on the CPU."""
    from training.evidence.gpu_evidence import main as gpu_evidence

    summary = gpu_evidence(["--output", str(tmp_path), "--quick"])
    assert summary["problems"] == {}
    speed = json.loads((tmp_path / "speed.json").read_text())["results"]["cpu"]["batch_sizes"]["1"]["systems"]
    for system in ("nar_greedy", "nar_beam", "nar_greedy_static", "nar_greedy_bf16", "nar_beam_bf16", "ar_greedy_bf16"):
        assert speed[system]["ms_per_sentence"] > 0, system
    assert speed["nar_greedy_bf16"]["speedup_vs_ar_greedy_bf16"] == pytest.approx(
        speed["ar_greedy_bf16"]["median_s"] / speed["nar_greedy_bf16"]["median_s"])
    training = json.loads((tmp_path / "training_speed.json").read_text())
    assert all(training[f"{size}/{p}"]["updates_per_s"] > 0 for size in ("study_recipe", "base_size")
               for p in ("fp32", "bf16"))
    pair = json.loads((tmp_path / "bf16_pair.json").read_text())["variants"]
    assert set(pair) == {"fp32", "bf16"} and "p_values_greedy" in pair["bf16"]
    assert (tmp_path / "study/bf16_pair/bf16-seed1.json").is_file()
    profile = json.loads((tmp_path / "profile_batch1.json").read_text())
    assert profile["aten_operators_per_call"] > 0 and profile["stages_ms"]["encoder"] > 0
    assert "| 1 | nar_greedy_bf16 |" in (tmp_path / "summary.md").read_text()
