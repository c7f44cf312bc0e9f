"""CTranslate2's CPU settings side by side on this machine: its defaults against Intel MKL and AVX-512 kernels.

CTranslate2 picks its kernels once per process: on a CPU that is not GenuineIntel it runs oneDNN GEMMs, and it may
choose AVX2 over AVX-512 (`CT2_VERBOSE=1` prints the choice). A speed comparison against CTranslate2 is fair only at
its fastest setting on the machine, so this times its greedy decoding (int8 and float32) under each setting, each in
a process of its own, the settings taking turns in every repeat, and prints ms/sentence, the ratio to the defaults
and the kernels each process reported. Model, sentences and batches are benchmark_speed.py's: the paper's base size
with random weights, each batch forced to its longest reference + 1 decoding steps, test2016 sorted by length.

    python training/evidence/ct2_settings.py --json docs/results/ct2_settings_cpu.json
    CT2_USE_MKL=1 python training/evidence/benchmark_speed.py --ctranslate2 ...   # then benchmark at the fastest
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"default": {}, "mkl": {"CT2_USE_MKL": "1"}, "avx512": {"CT2_FORCE_CPU_ISA": "AVX512"},
            "mkl_avx512": {"CT2_USE_MKL": "1", "CT2_FORCE_CPU_ISA": "AVX512"}}
REPORTED = ("Selected ISA", "Use Intel MKL", "SGEMM backend", "GEMM_S8 backend")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {sorted(SETTINGS)}")
    p.add_argument("--compute_types", default="int8,float32")
    p.add_argument("--batch_sizes", default="1,64")
    p.add_argument("--sentences", default="1:64,8:64,64:256", help="as benchmark_speed.py's")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="rounds; in each, every setting runs once")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--quick", action="store_true", help="tiny model, a few sentences: a smoke test")
    p.add_argument("--json", help="write every number here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: time one setting on a prepared directory
    args = p.parse_args(argv)
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        p.error(f"unknown settings {sorted(unknown)}; known: {sorted(SETTINGS)}")
    return args


def prepare(args, workdir: Path) -> dict:
    """Convert benchmark_speed.py's AR model with CTranslate2's converter; write the batches (source tokens, forced
    steps) each worker reads. Returns {batch size: sentences}."""
    import torch

    from training.evidence import benchmark_speed as bench

    quick = ["--quick"] if args.quick else []
    bench_args = bench.parse_args(["--batch_sizes", args.batch_sizes, "--sentences", args.sentences, *quick])
    torch.manual_seed(bench_args.seed)
    tokenizer, _ = bench.shared_tokenizer(bench_args)
    ar = bench.build_ar(bench_args, bench.QUICK_SIZES if args.quick else bench.BASE_SIZES, tokenizer)
    bench.convert_ctranslate2(ar, tokenizer, workdir)
    batches, sentences = {}, {}
    for bs in bench_args.batch_sizes:
        sources, references = bench.test_sentences(bench_args, bs, tokenizer)
        made = bench.make_batches(tokenizer, sources, references, bs, "cpu", ar.config.max_position_embeddings)
        batches[bs] = [{"tokens": b["tokens"], "steps": b["steps"]} for b in made]
        sentences[bs] = len(sources)
    (workdir / "batches.json").write_text(json.dumps(batches))
    return sentences


def worker(directory: Path, compute_type: str, threads: int, warmup: int) -> dict:
    """In a fresh process (the settings are read from its environment): seconds for all batches of each batch size
    after `warmup` batches, and the kernels CTranslate2 chose (from its verbose log on stderr)."""
    import ctranslate2

    translator = ctranslate2.Translator(str(directory / "ctranslate2"), device="cpu", compute_type=compute_type,
                                        intra_threads=threads)
    seconds = {}
    for bs, batches in json.loads((directory / "batches.json").read_text()).items():
        def run(batch):
            translator.translate_batch(batch["tokens"], beam_size=1, min_decoding_length=batch["steps"],
                                       max_decoding_length=batch["steps"])
        for batch in batches[:warmup]:
            run(batch)
        started = time.perf_counter()
        for batch in batches:
            run(batch)
        seconds[bs] = time.perf_counter() - started
    return seconds


def run_worker(directory: Path, setting: str, compute_type: str, args) -> tuple[dict, dict]:
    env = {**os.environ, **SETTINGS[setting], "CT2_VERBOSE": "1", "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run([sys.executable, __file__, "--worker", str(directory), "--compute_types", compute_type,
                           "--threads", str(args.threads), "--warmup", str(args.warmup)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"CTranslate2 setting {setting} ({SETTINGS[setting]}) failed:\n{done.stderr[-2000:]}")
    kernels = {key: line.split(f"{key}:", 1)[1].strip() for line in done.stderr.splitlines()
               for key in REPORTED if f"{key}:" in line}
    return json.loads(done.stdout.strip().splitlines()[-1]), kernels


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(Path(args.worker), args.compute_types, args.threads, args.warmup)))
        return {}
    settings, compute_types = args.settings.split(","), args.compute_types.split(",")
    report = {"threads": args.threads, "load_average_at_start": os.getloadavg(), "settings": SETTINGS,
              "kernels": {}, "seconds": {}}
    with tempfile.TemporaryDirectory() as scratch:
        report["sentences"] = prepare(args, Path(scratch))
        for _ in range(args.repeats):  # the settings take turns, so a slow spell of the machine hits them all
            for compute_type in compute_types:
                for setting in settings:
                    seconds, kernels = run_worker(Path(scratch), setting, compute_type, args)
                    report["kernels"][setting] = kernels
                    for bs, value in seconds.items():
                        report["seconds"].setdefault(f"{compute_type}/{setting}/{bs}", []).append(value)
    report["ms_per_sentence"] = {key: 1000 * statistics.median(values) / report["sentences"][int(key.split("/")[2])]
                                 for key, values in report["seconds"].items()}
    report["load_average_at_end"] = os.getloadavg()
    print_report(report, settings, compute_types)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def print_report(report: dict, settings: list[str], compute_types: list[str]):
    print(f"CTranslate2 greedy, {report['threads']} threads, load average {report['load_average_at_start'][0]:.2f}; "
          f"ms/sentence (median of {len(next(iter(report['seconds'].values())))} rounds) and speed vs default")
    for setting in settings:
        print(f"  {setting:<11} {SETTINGS[setting] or 'no variables'}: {report['kernels'].get(setting)}")
    for compute_type in compute_types:
        for bs in report["sentences"]:
            default = report["ms_per_sentence"].get(f"{compute_type}/default/{bs}")
            cells = []
            for setting in settings:
                ms = report["ms_per_sentence"][f"{compute_type}/{setting}/{bs}"]
                cells.append(f"{setting} {ms:7.2f}" + (f" ({default / ms:.2f}x)" if default else ""))
            print(f"  {compute_type:<8} batch {bs:>3}: " + "   ".join(cells))


if __name__ == "__main__":
    main()
