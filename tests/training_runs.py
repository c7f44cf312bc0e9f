"""How the tests run training scripts: a tiny version of the demo recipe, offline, one thread per process."""

import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.checkpoints import MODEL_DIR, resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "training/configs/demo.yaml")
TRAIN = str(REPO / "training/train.py")
# The demo recipe shrunk to seconds: a tiny model on 400 pairs, scored on 24 sentences (TINY: and not compared with the
# shipped model at the end, which translates the whole test set)
TINY_MODEL = ["--d_model", "32", "--encoder_layers", "1", "--decoder_layers", "2", "--encoder_attention_heads", "2",
        "--decoder_attention_heads", "2", "--encoder_ffn_dim", "64", "--decoder_ffn_dim", "64",
        "--max_position_embeddings", "48", "--max_train_samples", "400", "--max_eval_samples", "24",
        "--max_tokens", "600", "--warmup_steps", "5", "--learning_rate", "3e-3", "--logging_steps", "2"]
TINY = [*TINY_MODEL, "--compare_with", ""]
# One thread per process: tiny matrices gain nothing from two, and a busy machine stalls OpenMP thread teams badly
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(command, timeout=240) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of the run's newest checkpoint."""
    return load_file(resolve_checkpoint(run_dir / "checkpoints", "latest") / MODEL_DIR / "model.safetensors")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
