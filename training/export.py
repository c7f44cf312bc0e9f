"""Export any checkpoint of a run as a Hub model: weights without the weak AR decoders, tokenizer, code, model card.

    python training/export.py --run_dir runs/demo [--checkpoint best|latest|<dir>] [--push_to_hub user/repo]
        [--weights_dtype float16] [--keep_ranking_partner]

The checkpoint may also be an averaged model (training/average_checkpoints.py). It is scored on the run's test split
(validation when there is none), so the card reports this model's own sacreBLEU and chrF.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoTokenizer, HfArgumentParser

from hf_weaknat import push_export_to_hub  # also registers the weaknat Auto classes
from hf_weaknat.export import check_ranking_partner
from training.arguments import DataArguments
from training.checkpoints import (
    STATE_FILE, describe_checkpoint, load_checkpoint_model, newest_loadable_checkpoint, resolve_checkpoint,
)
from training.data import load_evaluation_splits, tokenize_evaluation_splits
from training.evaluation import evaluate_split
from training.model_card import export_with_card
from training.run_lock import own_run_folder


@dataclass
class ExportArguments:
    run_dir: str = field(metadata={"help": "The training run's output_dir."})
    checkpoint: str = field(default="best", metadata={"help": "best, latest, or a checkpoint / averaged directory."})
    output_dir: str | None = field(default=None, metadata={"help": "Default: <run_dir>/export-<checkpoint name>."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Repo id to upload the export to."})
    steps: int | None = field(default=None, metadata={
        "help": "The updates the exported weights were trained for, for the card (default: the checkpoint's; an "
                "average has none, so the run's max_steps)."})
    shown_as: str | None = field(default=None, metadata={
        "help": "The name the card loads the model by in its examples (default: --push_to_hub, else the folder)."})
    weights_dtype: str | None = field(default=None, metadata={
        "help": "float16 or bfloat16: store the weights in half precision (half the size); they still load in "
                "float32 unless the user asks for another dtype."})
    keep_ranking_partner: bool = field(default=False, metadata={
        "help": "A vanilla model trained with shared partners keeps that one weak AR decoder, to rank its length "
                "beam: generate(num_beams=5, length_beam_ranking='partner')."})


def main(argv: list[str] | None = None) -> Path:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    if args.weights_dtype not in (None, "float16", "bfloat16"):
        raise ValueError(f"weights_dtype must be float16 or bfloat16 (got {args.weights_dtype!r})")
    with own_run_folder(args.run_dir, "training/export.py"):  # not while a run trains there
        return export_checkpoint(args)


def export_checkpoint(args: ExportArguments) -> Path:
    run_dir = Path(args.run_dir)
    run_args = json.loads((run_dir / "run_args.json").read_text())
    checkpoint = resolve_checkpoint(run_dir / "checkpoints", args.checkpoint)
    if checkpoint is None:
        raise FileNotFoundError(f"No checkpoint under {run_dir / 'checkpoints'}")
    newest, _ = newest_loadable_checkpoint(run_dir / "checkpoints")
    model = load_checkpoint_model(checkpoint, "export another one with --checkpoint <path>" + (
        f" (the newest loadable checkpoint is {describe_checkpoint(newest)})" if newest and newest != checkpoint
        else ""))
    if args.keep_ranking_partner:  # before the scoring, which takes minutes
        check_ranking_partner(model.config)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    data_args = DataArguments(**run_args["data"])
    accelerator = Accelerator()
    evaluation = tokenize_evaluation_splits(accelerator, load_evaluation_splits(data_args), tokenizer, model.config)
    eval_split = data_args.test_split if data_args.test_split in evaluation else data_args.validation_split
    scores = evaluate_split(accelerator, model.to(accelerator.device), tokenizer, evaluation[eval_split],
                            run_args["training"]["max_tokens"])
    state_file = checkpoint / STATE_FILE  # an averaged model has none: it stands for the end of training
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"step": run_args["training"]["max_steps"]}
    steps, skipped_steps = args.steps or state["step"], state.get("skipped_steps", 0)
    export_dir = export_with_card(
        model.cpu(), tokenizer, Path(args.output_dir or run_dir / f"export-{checkpoint.name}"), run_args=run_args,
        scores=scores, eval_split=eval_split, steps=steps, example_source=evaluation[eval_split][0]["source"],
        filtered=json.loads((run_dir / "data_stats.json").read_text())["train_pairs"],
        learning_curve=run_dir / "learning_curve.png", repo_id=args.push_to_hub, skipped_steps=skipped_steps,
        weights_dtype=getattr(torch, args.weights_dtype) if args.weights_dtype else None, shown_as=args.shown_as,
        keep_ranking_partner=args.keep_ranking_partner)
    print(f"Exported {checkpoint} to {export_dir}: {eval_split} BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}")
    if args.push_to_hub:
        push_export_to_hub(export_dir, args.push_to_hub)
    return export_dir


if __name__ == "__main__":
    main()
