"""Checkpoints that are either complete or invisible, the run's position in the data, and rotation.

A checkpoint `checkpoints/step-00001000/` holds accelerate's state (model, optimizer, scheduler, RNG of every
process), `model/` (a `from_pretrained` directory, for export and averaging) and `trainer_state.json`. It is written
as `.tmp-step-...` and renamed when complete, and only directories with `trainer_state.json` (written last) count,
so a run killed while saving never leaves a "latest" checkpoint that cannot be resumed.
"""

import dataclasses
import json
import re
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"
CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch done by each process (skipped on resume)
    validation_bleu: dict[str, float] = dataclasses.field(default_factory=dict)  # str(step) -> BLEU

    def save(self, path: Path):
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "TrainState":
        return cls(**json.loads(path.read_text()))


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temp and half-deleted directories are never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name)[1]))


def resolve_checkpoint(root: Path, which: str) -> Path | None:
    """`latest` (None when there is none yet), `best` (highest validation BLEU) or an explicit path."""
    if which == "latest":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    if which == "best":
        scored = [(p, best_score(p)) for p in complete_checkpoints(root)]
        scored = [(p, s) for p, s in scored if s is not None]
        if not scored:
            raise FileNotFoundError(f"No evaluated checkpoint under {root}")
        return max(scored, key=lambda ps: ps[1])[0]
    path = Path(which)
    if not path.is_dir():
        raise FileNotFoundError(f"No checkpoint directory {path}")
    return path


def best_score(checkpoint: Path) -> float | None:
    state = TrainState.load(checkpoint / STATE_FILE)
    return state.validation_bleu.get(str(state.step))


def save_checkpoint(accelerator, model, root: Path, state: TrainState, keep_last: int, keep_best: int) -> Path:
    """Write a checkpoint from every process, publish it with one rename, then rotate old ones. Returns its path."""
    final, temp = root / checkpoint_name(state.step), root / f".tmp-{checkpoint_name(state.step)}"
    if accelerator.is_main_process:
        remove_directory(temp)  # a leftover of a save that was killed
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    weights = accelerator.get_state_dict(model)  # on every process: FSDP gathers the full weights here
    accelerator.unwrap_model(model).save_pretrained(temp / MODEL_DIR, state_dict=weights,
                                                    save_function=accelerator.save,
                                                    is_main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(temp / STATE_FILE)  # last file written: its presence marks the checkpoint complete
        remove_directory(final)  # only when re-saving a step after resuming from an older checkpoint
        temp.rename(final)
        rotate_checkpoints(root, state, keep_last, keep_best)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(root: Path, state: TrainState, keep_last: int, keep_best: int):
    """Keep the `keep_last` newest checkpoints and the `keep_best` best by validation BLEU; delete the rest."""
    checkpoints = complete_checkpoints(root)
    steps = {p: int(CHECKPOINT_NAME.match(p.name)[1]) for p in checkpoints}
    scored = [p for p in checkpoints if str(steps[p]) in state.validation_bleu]
    best = sorted(scored, key=lambda p: state.validation_bleu[str(steps[p])], reverse=True)[:keep_best]
    keep = set(checkpoints[-keep_last:] if keep_last > 0 else []) | set(best)
    for path in checkpoints:
        if path not in keep:
            remove_directory(path)
    for leftover in root.glob(".t*-step-*"):  # temp saves and trash of killed runs
        remove_directory(leftover)


def remove_directory(path: Path):
    """Delete a directory so that a kill halfway never leaves a damaged checkpoint under a valid name."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name.removeprefix('.tmp-').removeprefix('.trash-')}")
    if trash != path:
        shutil.rmtree(trash, ignore_errors=True)
        path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
