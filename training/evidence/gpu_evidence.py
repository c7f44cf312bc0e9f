"""The GPU evidence in one command: inference speed against transformers' AR decoding, and bf16 training.

    python training/evidence/gpu_evidence.py --output docs/results/gpu      # on a CUDA GPU: under 8 minutes
    python training/evidence/gpu_evidence.py --output /tmp/gpu --quick      # a smoke test on the CPU, tiny sizes

Stages, each written to `--output` as soon as it ends (a stage that fails or runs out of its time leaves the others
and says so in `summary.json`):

1. `speed.*`: `benchmark_speed.py` on the device at the paper's base size (random weights): NAR greedy and beam 5,
   transformers AR greedy and beam 5, in fp32 at batch 1, 8, 64 and 256; in bf16 and the static-shape greedy pass
   (fp32, bf16) at batch 1 and 64, the goals' batch sizes; every ratio from medians of the same run.
2. `profile_batch1.*`: `profile_generate.py` at the base size, batch 1: the time of each stage of one `generate`
   call and the operators it dispatches.
3. `training_speed.json`: updates per second of `training/train.py`, fp32 against `mixed_precision: bf16`, for the
   study recipe (`training/configs/multi30k_distilled.yaml`, CTC + weak AR) and the same recipe at the paper's base
   size, a short run each, one after the other (no validation or saving inside the timed updates).
4. `study/bf16_pair/`: the study's `bf16_pair` grid (`study_multi30k.yaml`): the study recipe trained to the study
   budget in fp32 and in bf16 side by side on the one device, each averaged and scored on test2016 as every study
   run is (one seed: a difference under ~1 BLEU is noise).
5. `summary.md` / `summary.json`: the tables, the machine, the commands.

On a machine lent for minutes: the set-up in docs/speed.md ("On a GPU"), then this command with its output where the
machine hands files back.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from training.evidence import REPOSITORY, cpu_model
from training.evidence.study import load_grid, load_results, run_one, summarize, train_command
from training.evidence.study import markdown as study_markdown

GRID_FILE = REPOSITORY / "training/evidence/study_multi30k.yaml"
STUDY_RECIPE = "training/configs/multi30k_distilled.yaml"
BASE_SIZE = ["--d_model", "512", "--encoder_layers", "6", "--decoder_layers", "6", "--encoder_attention_heads", "8",
             "--decoder_attention_heads", "8", "--encoder_ffn_dim", "2048", "--decoder_ffn_dim", "2048"]
# --quick: the models and data of the test suite's tiny runs
TINY = ["--d_model", "32", "--encoder_layers", "1", "--decoder_layers", "2", "--encoder_attention_heads", "2",
        "--decoder_attention_heads", "2", "--encoder_ffn_dim", "64", "--decoder_ffn_dim", "64",
        "--max_train_samples", "400", "--max_eval_samples", "16", "--max_tokens", "600", "--warmup_steps", "5"]


def speed_command(args, device: str) -> list[str]:
    command = [sys.executable, "training/evidence/benchmark_speed.py", "--device", device, "--half", "bf16",
               "--static_shapes", "--json", str(args.output / "speed.json"), "--plot", str(args.output / "speed.png")]
    if args.quick:
        return command + ["--quick", "--threads", "1", "--sentences", "1:4,4:8", "--repeats", "1"]
    return command + ["--batch_sizes", "1,8,64,256", "--sentences", "1:32,8:64,64:512,256:1024", "--warmup", "1",
                      "--repeats", "3", "--extra_batch_sizes", "1,64"]  # bf16 and static: the goals' batch sizes


def run_logged(command: list[str], log: Path, timeout: float) -> dict:
    """Run `command` from the repository root with its output in `log`: {"seconds", "returncode"} (None on time out)."""
    started = time.time()
    with log.open("w") as handle:
        try:
            code = subprocess.run(command, cwd=REPOSITORY, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    return {"command": " ".join(command[1:]), "seconds": round(time.time() - started, 1), "returncode": code}


def updates_per_second(metrics: Path) -> float | None:
    """Mean updates per second over the run's training records, the first (warm-up) window left out."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    speeds = [r["updates_per_s"] for r in records if r["split"] == "train"][1:]
    return sum(speeds) / len(speeds) if speeds else None


def training_speed(args, device: str) -> dict:
    """fp32 against bf16 updates per second, study recipe and base size, one short run each, one after another."""
    steps = "8" if args.quick else "80"
    found = {}
    for size, extra in (("study_recipe", TINY if args.quick else []), ("base_size", TINY if args.quick else BASE_SIZE)):
        for precision in ("no", "bf16"):
            run_dir = args.output / "runs" / f"{size}-{precision}"
            command = [sys.executable, "training/train.py", STUDY_RECIPE, *extra, "--max_steps", steps,
                       "--logging_steps", "4" if args.quick else "20", "--eval_steps", "0", "--save_steps", "0",
                       "--mixed_precision", precision, "--report_to", "none", "--test_split", "",
                       "--max_eval_samples", "16", "--output_dir", str(run_dir)]
            outcome = run_logged(command, args.output / f"training_speed-{size}-{precision}.log", args.stage_timeout)
            found[f"{size}/{'fp32' if precision == 'no' else precision}"] = {
                **outcome, "updates_per_s": updates_per_second(run_dir / "metrics.jsonl")}
    for size in ("study_recipe", "base_size"):
        fp32, bf16 = found[f"{size}/fp32"]["updates_per_s"], found[f"{size}/bf16"]["updates_per_s"]
        found[f"{size}/bf16_speedup"] = bf16 / fp32 if fp32 and bf16 else None
    (args.output / "training_speed.json").write_text(json.dumps(found, indent=1))
    return found


def bf16_pair(args) -> dict:
    """The study's bf16_pair grid, both variants trained side by side, results under --output/study."""
    grid = load_grid(GRID_FILE, "bf16_pair")
    grid.update(results_dir=str(args.output / "study"), runs_dir=str(args.output / "runs" / "study"))
    if args.quick:  # a few updates of the tiny model, scored on a few sentences
        grid["flags"] = {"max_steps": 4, "save_steps": 2, "eval_steps": 2, "logging_steps": 2,
                         **dict(zip(TINY[::2], TINY[1::2]))}
        grid["flags"] = {k.lstrip("-"): v for k, v in grid["flags"].items()}
        grid.update(budget=4, average_last=2, test_sentences=16)
    runs = {variant: Path(grid["runs_dir"]) / grid["name"] / f"{variant}-seed1" for variant in grid["variants"]}
    children = [subprocess.Popen(train_command(grid, variant, 1, run_dir), cwd=REPOSITORY,
                                 stdout=(args.output / f"bf16_pair-{variant}.log").open("w"), stderr=subprocess.STDOUT)
                for variant, run_dir in runs.items()]  # side by side: both share the device
    deadline = time.time() + args.stage_timeout
    for child in children:
        try:
            child.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            child.terminate()  # a clean stop with a checkpoint (preemption.py); the stage reports the time out
            child.wait()
    if any(child.returncode != 0 for child in children):
        raise RuntimeError(f"training exited with {[child.returncode for child in children]} (bf16_pair-*.log)")
    for variant in grid["variants"]:
        run_one(grid, variant, 1, train=False)  # average and score as every study run
    summary = summarize(grid, load_results(grid))
    (args.output / "bf16_pair.json").write_text(json.dumps(summary, indent=1, default=str))
    return {"summary": summary, "markdown": study_markdown(grid, summary)}


def environment(device: str) -> dict:
    import transformers

    return {"device": torch.cuda.get_device_name() if device == "cuda" else cpu_model(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count()}


def speedup(row: dict, reference: str) -> str:
    return f"{row[f'speedup_vs_{reference}']:.2f}x" if f"speedup_vs_{reference}" in row else "-"


def markdown(summary: dict) -> str:
    lines = [f"# GPU evidence ({summary['environment']['device']})", "",
             f"torch {summary['environment']['torch']}, transformers {summary['environment']['transformers']}; "
             f"`python training/evidence/gpu_evidence.py {' '.join(summary['arguments'])}`, "
             f"{summary['seconds']:.0f} s in all.", ""]
    speed_file = summary.get("speed_file")
    if speed_file and Path(speed_file).is_file():
        report = json.loads(Path(speed_file).read_text())
        for device, result in report["results"].items():
            lines += [f"## Inference, {device}, ms per sentence (speed-up against transformers AR in the same dtype)",
                      "", "| batch | system | ms/sentence | x AR greedy | x AR beam |", "|---|---|---|---|---|"]
            for bs, table in result["batch_sizes"].items():
                for name, row in table["systems"].items():
                    if name.startswith("nar"):
                        suffix = next((f"_{h}" for h in ("bf16", "fp16") if name.endswith(h)), "")
                        lines.append(f"| {bs} | {name} | {row['ms_per_sentence']:.2f} | "
                                     f"{speedup(row, 'ar_greedy' + suffix)} | {speedup(row, 'ar_beam' + suffix)} |")
            lines.append("")
    profile = Path(summary.get("speed_file", "")).with_name("profile_batch1.json")
    if profile.is_file():
        found = json.loads(profile.read_text())
        lines += [f"## One call at batch 1 ({found['model']}, {found['device']}): {found['ms_per_call']:.2f} ms, "
                  f"{found['aten_operators_per_call']} operators", "", "| stage | ms |", "|---|---|"]
        lines += [f"| {name.strip()} | {ms:.3f} |" for name, ms in found["stages_ms"].items()] + [""]
    speeds = summary.get("training_speed")
    if speeds:
        lines += ["## Training, updates per second", "", "| size | fp32 | bf16 | bf16 / fp32 |", "|---|---|---|---|"]
        for size in ("study_recipe", "base_size"):
            fp32, bf16 = speeds[f"{size}/fp32"]["updates_per_s"], speeds[f"{size}/bf16"]["updates_per_s"]
            ratio = speeds[f"{size}/bf16_speedup"]
            lines.append(f"| {size} | {fp32 or 0:.2f} | {bf16 or 0:.2f} | {ratio or 0:.2f}x |")
        lines.append("")
    pair = summary.get("bf16_pair")
    if pair:
        lines += ["## bf16 against fp32 at the study budget (one seed)", "", pair["markdown"]]
    for stage, problem in summary["problems"].items():
        lines.append(f"- stage {stage}: {problem}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU: a smoke test in about a minute")
    p.add_argument("--stages", default="speed,profile,training_speed,bf16_pair")
    p.add_argument("--stage_timeout", type=float, default=300, help="seconds a stage's command may run")
    args = p.parse_args(argv)
    device = "cpu" if args.quick else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --quick for the CPU smoke test")
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    summary = {"environment": environment(device), "arguments": argv if argv is not None else sys.argv[1:],
               "problems": {}}
    stages = args.stages.split(",")
    if "speed" in stages:
        outcome = run_logged(speed_command(args, device), args.output / "speed.txt", args.stage_timeout)
        summary["speed"] = outcome
        summary["speed_file"] = str(args.output / "speed.json")
        if outcome["returncode"] != 0:
            summary["problems"]["speed"] = f"exit {outcome['returncode']} after {outcome['seconds']} s (speed.txt)"
    if "profile" in stages:  # where batch 1's time goes, per stage, and the operators one call dispatches
        outcome = run_logged([sys.executable, "training/evidence/profile_generate.py", "--model",
                              "tiny" if args.quick else "base", "--device", device, "--calls", "5" if args.quick
                              else "30", "--json", str(args.output / "profile_batch1.json")],
                             args.output / "profile_batch1.txt", args.stage_timeout)
        summary["profile"] = outcome
        if outcome["returncode"] != 0:
            summary["problems"]["profile"] = f"exit {outcome['returncode']} (profile_batch1.txt)"
    if "training_speed" in stages:
        summary["training_speed"] = training_speed(args, device)
    if "bf16_pair" in stages:
        try:
            summary["bf16_pair"] = bf16_pair(args)
        except Exception as error:  # the other stages' results still count
            summary["problems"]["bf16_pair"] = f"{type(error).__name__}: {error}"
    summary["seconds"] = time.time() - started
    (args.output / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (args.output / "summary.md").write_text(markdown(summary))
    print((args.output / "summary.md").read_text())
    return summary


if __name__ == "__main__":
    main()
