"""Compare training runs side by side: validation BLEU over steps and training speed.

    python training/evidence/compare_runs.py "plain CTC=runs/m30k_ctc" "CTC + weak AR=runs/m30k_weakar" \
        --plot docs/results/multi30k_validation_bleu.png --json docs/results/multi30k_runs.json

Each run is `LABEL=RUN_DIR` (or just RUN_DIR). Everything comes from the run's own `metrics.jsonl`: the validation
records (greedy BLEU every `eval_steps`) and the training records' tokens/s (the median over logging windows, so
validation pauses do not count). Prints a Markdown table; `--plot` draws the validation BLEU curves in one figure.
Test-set scores and the paper's analyses come from `analyze.py` on each run's export.
"""

import argparse
import json
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from training.records import read_records


def summarize_run(run_dir: Path) -> dict:
    records = read_records(Path(run_dir) / "metrics.jsonl")
    validation = [r for r in records if r["split"] == "validation"]
    speeds = [r["tokens_per_s"] for r in records if r["split"] == "train" and r.get("tokens_per_s")]
    return {
        "run_dir": str(run_dir),
        "steps": max((r["step"] for r in records), default=0),
        "validation_bleu": {r["step"]: r["bleu"] for r in validation},
        "best_validation_bleu": max((r["bleu"] for r in validation), default=None),
        "median_tokens_per_s": statistics.median(speeds) if speeds else None,
    }


def parse_run(text: str) -> tuple[str, Path]:
    label, _, path = text.rpartition("=")
    return (label or Path(path).name), Path(path)


def markdown_table(summaries: dict[str, dict]) -> str:
    steps = sorted({step for s in summaries.values() for step in s["validation_bleu"]})
    header = ["run", *[f"valid BLEU @{step}" for step in steps], "best", "train tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, s in summaries.items():
        cells = [label, *[_number(s["validation_bleu"].get(step)) for step in steps],
                 _number(s["best_validation_bleu"]), _number(s["median_tokens_per_s"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot_validation_bleu(summaries: dict[str, dict], image_path: Path) -> Path:
    figure = Figure(figsize=(6.4, 4))
    axis = figure.subplots()
    for label, s in summaries.items():
        points = sorted(s["validation_bleu"].items())
        if points:
            axis.plot(*zip(*points), "o-", label=label)
    axis.set(xlabel="optimizer step", ylabel="validation sacreBLEU (greedy)", title="Validation BLEU")
    axis.grid(alpha=0.3)
    if axis.has_data():
        axis.legend(fontsize=8)
    figure.tight_layout()
    Path(image_path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(image_path, dpi=110)
    return Path(image_path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR or RUN_DIR")
    p.add_argument("--plot", help="PNG of validation BLEU against steps")
    p.add_argument("--json", help="write the summaries here")
    args = p.parse_args(argv)
    summaries = {}
    for label, path in map(parse_run, args.runs):
        if not (path / "metrics.jsonl").is_file():
            p.error(f"{path} has no metrics.jsonl: not a train.py run directory")
        summaries[label] = summarize_run(path)
    print(markdown_table(summaries))
    if args.plot:
        print(f"wrote {plot_validation_bleu(summaries, Path(args.plot))}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summaries, indent=2))
    return summaries


if __name__ == "__main__":
    main()
