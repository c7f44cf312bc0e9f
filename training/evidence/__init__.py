"""The tools behind the README's Results and docs/results/: inference speed, training cost, the paper's analyses
and run comparisons (README.md here lists the command that produced each result file)."""

from pathlib import Path

from training import CORPORA

MULTI30K = CORPORA / "multi30k"  # the default test and training text of the tools
REPOSITORY = CORPORA.parents[1]


def recorded_path(path) -> str:
    """A path as a result file records it: relative to the repository when inside it, so that no machine's
    layout ends up in docs/results."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPOSITORY)) if resolved.is_relative_to(REPOSITORY) else str(path)
