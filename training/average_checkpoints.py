"""Average the weights of several checkpoints (the paper averages the 5 best) into one `from_pretrained` folder.

    python training/average_checkpoints.py --run_dir runs/x --best 5 [--output_dir runs/x/checkpoints/average-best5]
    python training/average_checkpoints.py --checkpoints runs/x/checkpoints/step-00001000 ... --output_dir out

Then `python training/export.py --run_dir runs/x --checkpoint <output_dir>` scores and exports the average.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from training.checkpoints import (
    CHECKPOINT_NAME, NonFiniteWeightsError, best_score, complete_checkpoints, describe_checkpoint,
    first_non_finite, load_checkpoint_model, written_whole,
)
from training.run_lock import own_run_folder


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors (accumulated in float64); other tensors must agree and are kept."""
    keys = state_dicts[0].keys()
    if any(sd.keys() != keys for sd in state_dicts):
        raise ValueError("Checkpoints have different parameter names: not the same architecture")
    averaged = {}
    for key in keys:
        tensors = [sd[key] for sd in state_dicts]
        if tensors[0].is_floating_point():
            averaged[key] = (sum(t.double() for t in tensors) / len(tensors)).to(tensors[0].dtype)
        elif all(torch.equal(tensors[0], t) for t in tensors):
            averaged[key] = tensors[0]
        else:
            raise ValueError(f"Non-float tensor {key} differs between checkpoints: cannot average it")
    return averaged


def average_checkpoints(checkpoints: list[Path], output_dir: Path) -> Path:
    """Load each checkpoint's model, average, and save with the first one's config.

    A damaged checkpoint (DamagedCheckpointError) or one holding NaN/inf weights (NonFiniteWeightsError) is named,
    and nothing is written: average the others by passing them with --checkpoints.
    """
    others = "leave it out: pass the checkpoints to average with --checkpoints"
    models = [load_checkpoint_model(c, others) for c in checkpoints]
    for checkpoint, model in zip(checkpoints, models):
        bad = first_non_finite(model.state_dict())
        if bad is not None:
            raise NonFiniteWeightsError(f"Checkpoint {describe_checkpoint(checkpoint)} holds NaN or infinite values "
                                        f"in weight {bad}: {others}")
    averaged = average_state_dicts([m.state_dict() for m in models])  # the mean of finite weights is finite
    models[0].load_state_dict(averaged)
    with written_whole(output_dir, "the averaged model") as folder:  # complete, or not there at all
        models[0].save_pretrained(folder)
    return Path(output_dir)


def select_checkpoints(run_dir: Path, best: int, last: int) -> list[Path]:
    """The `best` highest-BLEU or the `last` newest complete checkpoints of a run."""
    found = complete_checkpoints(run_dir / "checkpoints")
    if best:
        scored = [(c, best_score(c)) for c in found]
        return [c for c, s in sorted((cs for cs in scored if cs[1] is not None), key=lambda cs: -cs[1])[:best]]
    return found[-last:]


@dataclass
class AverageArguments:
    checkpoints: list[str] = field(default_factory=list, metadata={"help": "Checkpoint directories to average."})
    run_dir: str | None = field(default=None, metadata={"help": "Pick checkpoints of this run (with --best/--last)."})
    best: int = field(default=0, metadata={"help": "Average the N best by validation BLEU."})
    last: int = field(default=0, metadata={"help": "Average the N newest."})
    output_dir: str | None = field(default=None, metadata={"help": "Default: <run_dir>/checkpoints/average-..."})


def main(argv: list[str] | None = None) -> Path:
    (args,) = HfArgumentParser(AverageArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    # a run's checkpoints are chosen and read while no run writes (or rotates them) there
    with own_run_folder(args.run_dir, "training/average_checkpoints.py", enabled=bool(args.run_dir)):
        return average_chosen(args)


def average_chosen(args: AverageArguments) -> Path:
    if args.checkpoints:
        checkpoints = [Path(c) for c in args.checkpoints]
    elif args.run_dir and (args.best or args.last):
        checkpoints = select_checkpoints(Path(args.run_dir), args.best, args.last)
    else:
        raise ValueError("Pass --checkpoints, or --run_dir with --best N or --last N")
    if not checkpoints:
        raise FileNotFoundError("No checkpoint selected")
    name = f"average-{'best' if args.best else 'last'}{len(checkpoints)}"
    default_dir = Path(args.run_dir) / "checkpoints" / name if args.run_dir else checkpoints[0].parent / name
    output_dir = Path(args.output_dir or default_dir)
    steps = [int(m[1]) for c in checkpoints if (m := CHECKPOINT_NAME.match(c.name))]
    print(f"Averaging {len(checkpoints)} checkpoints (steps {steps}) into {output_dir}")
    return average_checkpoints(checkpoints, output_dir)


if __name__ == "__main__":
    main()
