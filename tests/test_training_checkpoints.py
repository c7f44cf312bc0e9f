"""training/checkpoints.py and average_checkpoints.py: only complete checkpoints count; rotation; exact averaging."""

import dataclasses
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from hf_weaknat import WeakNATConfig, WeakNATForConditionalGeneration
from training import average_checkpoints
from training.checkpoints import (
    MODEL_DIR, STATE_FILE, TrainState, checkpoint_name, complete_checkpoints, remove_directory, resolve_checkpoint,
    rotate_checkpoints, save_checkpoint,
)


def tiny_model(seed: int) -> WeakNATForConditionalGeneration:
    torch.manual_seed(seed)
    config = WeakNATConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                           max_position_embeddings=16)
    return WeakNATForConditionalGeneration(config)


def fake_checkpoint(root: Path, step: int, bleu: float | None = None, model=None) -> Path:
    """A checkpoint directory as save_checkpoint leaves it (model/ + trainer_state.json)."""
    path = root / checkpoint_name(step)
    path.mkdir(parents=True)
    if model is not None:
        model.save_pretrained(path / MODEL_DIR)
    TrainState(step=step, validation_bleu={} if bleu is None else {str(step): bleu}).save(path / STATE_FILE)
    return path


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    (tmp_path / ".tmp-step-00000030").mkdir()  # a save killed before its rename
    (tmp_path / "step-00000040").mkdir()  # a directory without trainer_state.json is not complete
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000010", "step-00000020"]
    assert resolve_checkpoint(tmp_path, "latest") == newest
    assert resolve_checkpoint(tmp_path / "nothing-yet", "latest") is None


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    scores = {10: 5.0, 20: 30.0, 30: 12.0, 40: 20.0, 50: 1.0}
    for step, bleu in scores.items():
        fake_checkpoint(tmp_path, step, bleu)
    (tmp_path / ".tmp-step-00000060").mkdir()
    state = TrainState(step=50, validation_bleu={str(s): b for s, b in scores.items()})
    rotate_checkpoints(tmp_path, state, keep_last=2, keep_best=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000020", "step-00000040", "step-00000050"]
    assert resolve_checkpoint(tmp_path, "best").name == "step-00000020"


def test_remove_directory_leaves_nothing_behind(tmp_path):
    victim = fake_checkpoint(tmp_path, 10)
    (victim / "big.bin").write_bytes(b"0" * 1000)
    remove_directory(victim)
    assert list(tmp_path.iterdir()) == []


def test_save_checkpoint_publishes_a_loadable_complete_checkpoint(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = tiny_model(0)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    (tmp_path / ".tmp-step-00000005").mkdir(parents=True)  # leftover of a killed save of the same step
    state = TrainState(step=5, epoch=1, batches_in_epoch=3, validation_bleu={"5": 1.5})
    path = save_checkpoint(accelerator, model, tmp_path, state, keep_last=1, keep_best=0)
    saved = TrainState.load(path / STATE_FILE)
    assert path.name == "step-00000005" and saved == dataclasses.replace(state, num_processes=1)  # who saved it
    assert not (tmp_path / ".tmp-step-00000005").exists()
    reloaded = WeakNATForConditionalGeneration.from_pretrained(path / MODEL_DIR)
    for name, tensor in accelerator.unwrap_model(model).state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_average_is_the_elementwise_mean_of_the_checkpoints(tmp_path):
    models = [tiny_model(seed) for seed in (1, 2, 3)]
    paths = [fake_checkpoint(tmp_path / "checkpoints", 10 * (i + 1), bleu, m)
             for i, (m, bleu) in enumerate(zip(models, (3.0, 9.0, 6.0)))]
    out = average_checkpoints.main(["--checkpoints", *map(str, paths), "--output_dir", str(tmp_path / "avg")])
    averaged = WeakNATForConditionalGeneration.from_pretrained(out).state_dict()
    states = [m.state_dict() for m in models]
    assert averaged.keys() == states[0].keys()
    for name in averaged:
        expected = (states[0][name].double() + states[1][name].double() + states[2][name].double()) / 3
        torch.testing.assert_close(averaged[name].double(), expected, rtol=0, atol=1e-6)
    assert not torch.equal(averaged["model.shared.weight"], states[0]["model.shared.weight"])
    # --best 2 picks the two highest validation BLEU: steps 20 and 30
    assert [p.name for p in average_checkpoints.select_checkpoints(tmp_path, best=2, last=0)] == [
        "step-00000020", "step-00000030"]
    assert [p.name for p in average_checkpoints.select_checkpoints(tmp_path, best=0, last=1)] == ["step-00000030"]


def test_average_refuses_different_architectures():
    small, other = tiny_model(0).state_dict(), {"x": torch.zeros(1)}
    with pytest.raises(ValueError, match="different parameter names"):
        average_checkpoints.average_state_dicts([small, other])
