"""The training pipeline of hf_weaknat: recipes in, checkpoints, metrics and a Hub export out.

Run from a checkout, after the editable install (`pip install -e ".[train]"`), by path or as modules:

    accelerate launch training/train.py training/configs/demo.yaml
    python -m training.train training/configs/demo.yaml

The entry points are train.py, distill.py, average_checkpoints.py and export.py; evidence/ holds the tools behind
the README's Results and docs/ (benchmarks, analyses, run comparisons).
"""

from pathlib import Path

CORPORA = Path(__file__).resolve().parent / "corpora"  # corpora bundled with the repository (Multi30k)
