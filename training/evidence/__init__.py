"""The tools behind the README's Results and docs/results/: inference speed, training cost, the paper's analyses
and run comparisons (README.md here lists the command that produced each result file)."""

import platform
from pathlib import Path

from training import CORPORA

MULTI30K = CORPORA / "multi30k"  # the default test and training text of the tools
REPOSITORY = CORPORA.parents[1]


def recorded_path(path) -> str:
    """A path as a result file records it: relative to the repository when inside it, so that no machine's
    layout ends up in docs/results."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPOSITORY)) if resolved.is_relative_to(REPOSITORY) else str(path)


def cpu_model() -> str:
    """The CPU's model name, for result files: speed and wall times compare only between hosts of one kind (Linux
    reports just the architecture through `platform.processor()`)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"
