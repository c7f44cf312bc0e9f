"""Checkpoints that are either complete or invisible, the run's position in the data, and rotation.

A checkpoint `checkpoints/step-00001000/` holds accelerate's state (model, optimizer, scheduler, RNG of every
process), `model/` (a `from_pretrained` directory, for export and averaging) and `trainer_state.json`. It is written
as `.tmp-step-...` and renamed when complete, and only directories with `trainer_state.json` (written last) count,
so a run killed while saving never leaves a "latest" checkpoint that cannot be resumed.

Two guards: weights holding NaN or infinity are never written (`refuse_non_finite`: the save names the step and the
first bad tensor), and a checkpoint damaged after it was written (a truncated or emptied file) is named by
`checkpoint_problem` before anything tries to load it.
"""

import contextlib
import dataclasses
import errno
import json
import re
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"
CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")
DAMAGED_PREFIX = "damaged-"  # where resume sets a damaged checkpoint aside: invisible to latest, best and rotation


class NonFiniteWeightsError(ValueError):
    """Weights holding NaN or infinity were about to be written (a checkpoint, an average or an export)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a failed write); the message names it, the cause and the
    newest complete checkpoint. The run stops: training on without checkpoints would lose its work."""


class DamagedCheckpointError(RuntimeError):
    """A checkpoint cannot be read (a truncated or emptied file, or a failed load); the message names it."""


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of the current epoch done by all processes together (batching.Deal)
    num_processes: int | None = None  # that saved this state (None: saved before it was recorded)
    left_out_examples: int = 0  # examples of epoch tails too small to share among the processes (trainer.end_epoch)
    validation_bleu: dict[str, float] = dataclasses.field(default_factory=dict)  # str(step) -> BLEU
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradients (trainer.py), over the whole run

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


def drop_tied_copies(models, weights, output_dir):
    """`accelerator.register_save_state_pre_hook` hook: leave out of accelerate's copy of each model the parameters
    the model declares as tied (transformers' `_tied_weights_keys`, target -> source: the CTC head is the embedding)
    whenever they really share the source's storage, as `save_pretrained` does. accelerate would otherwise find the
    alias itself, drop it and warn at every save; loading (safetensors' `load_model`) ties them back the same way."""
    from accelerate.utils import extract_model_from_parallel

    for model, state in zip(models, weights):
        tied = getattr(extract_model_from_parallel(model), "_tied_weights_keys", None) or {}
        for target, source in tied.items():
            for key in [k for k in state if k == target or k.endswith("." + target)]:  # DDP's keys: module.<name>
                source_key = key[: len(key) - len(target)] + source
                if source_key in state and same_storage(state[key], state[source_key]):
                    del state[key]


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def save_checkpoint(accelerator, model, root: Path, state: TrainState, keep_last: int, keep_best: int) -> Path:
    """Write a checkpoint from every process, publish it with one rename, then rotate old ones. Returns its path.

    Refuses (NonFiniteWeightsError on every process, nothing written) when any process holds a non-finite weight.
    """
    # every process checks its own weights (its shard under FSDP), then all learn whether any found one
    unwrapped = accelerator.unwrap_model(model)
    bad = first_non_finite({**dict(unwrapped.named_parameters()), **dict(unwrapped.named_buffers())})
    found = accelerator.reduce(torch.tensor([float(bad is not None)], device=accelerator.device), "sum")
    if found.item() > 0:
        raise NonFiniteWeightsError(non_finite_message(f"checkpoint {root / checkpoint_name(state.step)}",
                                                       state.step, bad or "(on another process)"))
    final, temp = root / checkpoint_name(state.step), root / f".tmp-{checkpoint_name(state.step)}"
    if accelerator.is_main_process:
        remove_directory(temp)  # a leftover of a save that was killed
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    failure = None
    try:
        accelerator.save_state(str(temp))
        weights = accelerator.get_state_dict(model)  # on every process: FSDP gathers the full weights here
        accelerator.unwrap_model(model).save_pretrained(temp / MODEL_DIR, state_dict=weights,
                                                        save_function=accelerator.save,
                                                        is_main_process=accelerator.is_main_process)
        if accelerator.is_main_process:
            # last file written: its presence marks the checkpoint complete; it records who saved it
            dataclasses.replace(state, num_processes=accelerator.num_processes).save(temp / STATE_FILE)
    except OSError as error:  # a full disk, a quota, a vanished mount: on any process, every process stops
        failure = error
    failed = accelerator.reduce(torch.tensor([float(failure is not None)], device=accelerator.device), "sum")
    if failed.item() > 0:
        if accelerator.is_main_process:
            shutil.rmtree(temp, ignore_errors=True)
        raise CheckpointWriteError(write_failure_message(f"checkpoint {final}", failure, root))
    if accelerator.is_main_process:
        remove_directory(final)  # only when re-saving a step after resuming from an older checkpoint
        temp.rename(final)
        rotate_checkpoints(root, state, keep_last, keep_best)
    accelerator.wait_for_everyone()
    return final


def write_failure_message(what: str, error: OSError | None, root: Path) -> str:
    """What failed, where and why, and what still stands (the complete checkpoints under `root`)."""
    cause = (f"{error.strerror or error} ({errno.errorcode.get(error.errno, error.errno)})"
             f"{f' writing {error.filename}' if error.filename else ''}" if error is not None
             else "a write failed on another process")
    newest = complete_checkpoints(root)
    stands = (f"The checkpoints written before it are intact (newest: {newest[-1]}): free space or fix the cause, "
              "then continue with --resume_from_checkpoint latest" if newest else
              "No earlier checkpoint exists: free space or fix the cause and train again")
    return f"Could not write {what}: {cause}. Nothing of it was kept. {stands}."


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


@contextlib.contextmanager
def written_whole(final: Path, what: str):
    """A directory that appears complete at `final` or not at all: the block writes into the yielded temporary
    sibling, which replaces `final` (an earlier version is removed only then) when the block succeeds. A failed
    write removes the temporary directory and raises OSError naming `what`, `final` and the cause."""
    final = Path(final)
    temp = final.with_name(f".tmp-{final.name}")
    remove_directory(temp)  # a leftover of a write that was killed
    temp.mkdir(parents=True)
    try:
        yield temp
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        cause = f"{error.strerror or error}{f' writing {error.filename}' if error.filename else ''}"
        raise OSError(error.errno, f"Could not write {what} {final}: {cause}. Nothing of it was kept"
                      + (f"; the earlier {final} is untouched" if final.exists() else "")) from error
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    remove_directory(final)
    temp.rename(final)


# ----------------------------------------------------------------------------------------------------------------
# Guards: no non-finite weights written, damaged checkpoints named


def first_non_finite(tensors: dict) -> str | None:
    """Name of the first floating-point tensor holding a NaN or an infinity, or None when all are finite."""
    for name, tensor in tensors.items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP2 shard: this process's part
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return name
    return None


def non_finite_message(what: str, step, tensor: str) -> str:
    return (f"Refusing to write {what} at step {step}: weight {tensor} holds NaN or infinite values (the training "
            "diverged). Nothing was written; see metrics.jsonl for the steps that led here")


def refuse_non_finite(tensors: dict, what: str, step):
    """Raise NonFiniteWeightsError naming `what` (the thing about to be written), the step and the first bad tensor."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise NonFiniteWeightsError(non_finite_message(what, step, bad))


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint, from its name or its trainer_state.json (None for an averaged model)."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    if match:
        return int(match[1])
    try:
        return TrainState.load(Path(path) / STATE_FILE).step
    except (OSError, ValueError, TypeError):
        return None


def describe_checkpoint(path: Path) -> str:
    step = checkpoint_step(path)
    return f"{path} (step {step})" if step is not None else str(path)


def checkpoint_problem(path: Path) -> str | None:
    """What makes a checkpoint (or model) directory unreadable, or None when its files look whole.

    Cheap: it reads the safetensors headers (which say how long each file must be), the end of each zip archive
    written by torch.save (optimizer, scheduler, RNG states: a cut file has lost it) and the JSON files, never the
    tensors. A file damaged in its middle passes here and fails when loaded; callers name the checkpoint then too.
    """
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        problem = _file_problem(file)
        if problem:
            return f"{file.relative_to(path)}: {problem}"
    return None


def _file_problem(file: Path) -> str | None:
    if file.stat().st_size == 0:
        return "empty file"
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt"):
                pass
        elif file.suffix in (".bin", ".pkl", ".pt", ".pth"):
            with zipfile.ZipFile(file):  # torch.save's format: the index of its records is at the end
                pass
        elif file.suffix == ".json":
            json.loads(file.read_text(encoding="utf-8"))
    except Exception as error:  # zipfile.BadZipFile, a JSON ValueError, safetensors' SafetensorError, OSError
        return f"truncated or damaged ({type(error).__name__}: {error})"
    return None


def newest_loadable_checkpoint(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint whose files are whole, [(newer damaged checkpoint, its problem), ...])."""
    damaged = []
    for checkpoint in reversed(complete_checkpoints(root)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, damaged
        damaged.append((checkpoint, problem))
    return None, damaged


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint to `damaged-step-...` (kept for inspection, no longer a checkpoint of the run)."""
    target = checkpoint.with_name(DAMAGED_PREFIX + checkpoint.name)
    number = 1
    while target.exists():
        number += 1
        target = checkpoint.with_name(f"{DAMAGED_PREFIX}{checkpoint.name}-{number}")
    checkpoint.rename(target)
    return target


def load_checkpoint_model(checkpoint: Path, what_to_do: str = "pick another checkpoint"):
    """The model of a training checkpoint (its `model/`) or of an averaged model (a plain `from_pretrained` folder):
    a WeakNAT or (the AR baseline) a MarianMTModel. A damaged one raises DamagedCheckpointError naming it (path and
    step) and saying `what_to_do`, never a bare SafetensorError."""
    from transformers import AutoModelForSeq2SeqLM

    import hf_weaknat  # noqa: F401  (registers the weaknat Auto classes)

    checkpoint = Path(checkpoint)
    directory = checkpoint / MODEL_DIR if (checkpoint / MODEL_DIR).is_dir() else checkpoint
    problem = checkpoint_problem(directory)
    if problem:
        raise DamagedCheckpointError(f"Checkpoint {describe_checkpoint(checkpoint)} is damaged ({problem}): "
                                     f"{what_to_do}")
    try:
        return AutoModelForSeq2SeqLM.from_pretrained(directory)
    except Exception as error:
        raise DamagedCheckpointError(f"Could not load checkpoint {describe_checkpoint(checkpoint)} "
                                     f"({type(error).__name__}: {error}): {what_to_do}") from error
