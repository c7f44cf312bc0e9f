"""The run's records: one JSON line per logged step or evaluation, and the learning-curve figure drawn from them."""

import json
import math
from pathlib import Path

from matplotlib.figure import Figure  # not pyplot: no GUI backend or global figure state on training machines


class MetricsLog:
    """Append-only `metrics.jsonl`; written by the main process only."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict):
        """Append one record; a NaN or infinite number is written as the string "nan", "inf" or "-inf" (valid JSON)."""
        if self.enabled:
            record = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def drop_after(self, step: int):
        """On resume: forget what a killed run logged after the checkpoint it resumes from (it is redone)."""
        if self.enabled and self.path.is_file():
            kept = [r for r in read_records(self.path) if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_learning_curve(metrics_path: Path, image_path: Path) -> Path:
    """Training losses (left) and validation BLEU/chrF (right) against optimizer steps."""
    records = read_records(metrics_path) if Path(metrics_path).is_file() else []
    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "validation"]
    figure = Figure(figsize=(10, 3.6))
    loss_axis, score_axis = figure.subplots(1, 2)
    for key in ("loss", "ctc_loss", "token_loss", "length_loss", "ar_loss"):
        points = [(r["step"], r[key]) for r in train if _is_number(r.get(key))]
        if points:
            loss_axis.plot(*zip(*points), label=f"train {key}")
    points = [(r["step"], r["loss"]) for r in valid if _is_number(r.get("loss"))]
    if points:
        loss_axis.plot(*zip(*points), "o-", label="validation ctc_loss")
    loss_axis.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    for key in ("bleu", "chrf"):
        points = [(r["step"], r[key]) for r in valid if _is_number(r.get(key))]
        if points:
            score_axis.plot(*zip(*points), "o-", label=f"validation {key}")
    score_axis.set(xlabel="optimizer step", ylabel="score", title="Validation (greedy CTC)")
    for axis in (loss_axis, score_axis):
        if axis.has_data():
            axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(image_path, dpi=100)
    return Path(image_path)


def _is_number(value) -> bool:
    """A plottable value: not None, nor the "nan"/"inf" strings MetricsLog writes for non-finite numbers."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
