"""Train a non-autoregressive translator (CTC, or vanilla with `--nar_type vanilla`) with auxiliary weak AR decoders
(Wang, Zheng and Huang, EMNLP 2022).

    accelerate launch training/train.py training/configs/demo.yaml [--max_steps 50 --output_dir runs/x ...]
    python -m training.train training/configs/demo.yaml ...            # the same, as a module

A recipe (YAML or JSON, sections `model`, `data`, `training`: see arguments.py) says what to train; command-line
flags override it. The run directory gets the tokenizer, checkpoints, metrics.jsonl, learning_curve.png and, at the
end, `export/`: the Hub checkpoint without the weak AR decoders, with its card.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs, FullyShardedDataParallelPlugin, ProjectConfiguration, set_seed,
)
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, get_inverse_sqrt_schedule, pipeline

from hf_weaknat import WeakNATForConditionalGeneration, push_export_to_hub  # also registers the weaknat Auto classes
from hf_weaknat.tokenization_weaknat import blank_token_id
from training import data
from training.ar_baseline import build_marian_baseline, generation_limits
from training.arguments import DataArguments, ModelSection, TrainingArguments, parse_arguments, weaknat_config
from training.checkpoints import (
    MODEL_DIR, STATE_FILE, DamagedCheckpointError, TrainState, checkpoint_problem, checkpoint_step,
    complete_checkpoints, describe_checkpoint, drop_tied_copies, newest_loadable_checkpoint, resolve_checkpoint,
    set_aside,
)
from training.evaluation import evaluate_split, score_translations
from training.model_card import export_with_card
from training.preemption import TrainingStopped
from training.records import MetricsLog, plot_learning_curve
from training.run_lock import RunFolderBusy, RunFolderOwner
from training.trainer import Trainer


def build_accelerator(model: ModelSection, train_args: TrainingArguments) -> Accelerator:
    # Parameters some steps leave unused, which DDP must be told of: without sharing, only the sampled weak AR
    # decoders run in a step; with a warm-in, no partner runs before it ends
    config = model.resolved
    unused = (model.model_type == "weaknat" and config.weak_ar_layers > 0
              and (not config.weak_ar_share_parameters or config.weak_ar_warmup_steps > 0))
    trackers = [t for t in train_args.report_to.split(",") if t and t != "none"]
    if "tensorboard" in trackers and not _tensorboard_installed():
        trackers.remove("tensorboard")
    accelerator = Accelerator(
        mixed_precision=train_args.mixed_precision, log_with=trackers or None, fsdp_plugin=fsdp_plugin(train_args),
        project_config=ProjectConfiguration(project_dir=train_args.output_dir,
                                            logging_dir=str(Path(train_args.output_dir) / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
        # the schedule is written in optimizer steps: accelerate would otherwise step it once per process
        step_scheduler_with_optimizer=False,
    )
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        raise ValueError("mixed_precision fp16 needs a GPU: on the CPU accelerate trains in fp32 without autocast or "
                         "grad scaler, and says nothing. Use mixed_precision bf16 (or no) on the CPU")
    accelerator.register_save_state_pre_hook(drop_tied_copies)
    return accelerator


def fsdp_plugin(train_args: TrainingArguments) -> FullyShardedDataParallelPlugin | None:
    """Under an FSDP launch (`accelerate launch --config_file training/configs/accelerate_fsdp.yaml`): the plugin the
    launch configures, with an explicit mixed-precision policy: parameters computed in the recipe's half dtype,
    gradients reduced (summed over processes and accumulated) in fp32, as DDP does. Accelerate's own default
    reduces them in the half dtype. None otherwise."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train_args.mixed_precision)
    plugin = FullyShardedDataParallelPlugin()  # every other setting from the launch's FSDP_* variables
    if compute is not None:
        policy = {"param_dtype": compute, "reduce_dtype": torch.float32}
        if plugin.fsdp_version == 1:
            policy["buffer_dtype"] = torch.float32
        plugin.mixed_precision_policy = policy
        plugin.set_mixed_precision(train_args.mixed_precision)  # validates the dict into torch's policy class
    return plugin


def _tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def run_tokenizer(accelerator, data_args: DataArguments, run_dir: Path, train_raw, model_max_length: int):
    """The run's tokenizer, always kept in `<run>/tokenizer` (a resumed run must reuse the same vocabulary)."""
    saved = run_dir / "tokenizer"
    if accelerator.is_main_process and not (saved / "tokenizer_config.json").is_file():
        _, origin = data.load_or_train_tokenizer(data_args.tokenizer_name, data.training_texts(train_raw),
                                                 vocab_size=data_args.vocab_size, save_directory=saved,
                                                 model_max_length=model_max_length)
        accelerator.print(f"Tokenizer: {origin}")
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(saved)


def build_config(model: ModelSection, tokenizer, max_steps: int):
    """The WeakNATConfig of the recipe's model fields, with the tokenizer's vocabulary size and special ids (the CTC
    blank included) and the glancing schedule over the whole run unless the recipe sets `glancing_anneal_steps`."""
    from_tokenizer = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          blank_token_id=blank_token_id(tokenizer))
    return weaknat_config(**{"glancing_anneal_steps": max_steps, **model.fields, **from_tokenizer})


def build_model(model: ModelSection, tokenizer, max_steps: int):
    """The model to train: the WeakNAT translator, or (`model_type: marian`) the AR baseline / distillation teacher."""
    if model.model_type == "marian":
        return build_marian_baseline(model.fields, tokenizer)
    return WeakNATForConditionalGeneration(build_config(model, tokenizer, max_steps))


def resume_checkpoint(run_dir: Path, train_args: TrainingArguments, print_function=print) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (refusing to silently mix two runs in one directory).

    A damaged checkpoint (a truncated or emptied file: checkpoints.checkpoint_problem) is named with its step.
    `latest` then falls back to the newest loadable one with a warning (`set_aside_damaged` moves the damaged ones
    out of the way); an explicit path or `best` stops with a DamagedCheckpointError that says how to continue.
    """
    root = run_dir / "checkpoints"
    which = train_args.resume_from_checkpoint
    if which == "latest":
        checkpoint, damaged = newest_loadable_checkpoint(root)
        for path, problem in damaged:
            print_function(f"Warning: checkpoint {describe_checkpoint(path)} is damaged ({problem}); it is set aside "
                           f"as {path.parent / ('damaged-' + path.name)} and the run resumes from "
                           f"{describe_checkpoint(checkpoint) if checkpoint else 'nothing'}")
        if checkpoint is None and damaged:
            raise DamagedCheckpointError(
                f"Every checkpoint under {root} is damaged (newest: {describe_checkpoint(damaged[0][0])}: "
                f"{damaged[0][1]}), so there is nothing to resume from. Move them out of {root} to train again from "
                "scratch in this directory, or choose another --output_dir")
        return checkpoint  # None before the first save: start from scratch
    if which:
        checkpoint = resolve_checkpoint(root, which)
        if not (checkpoint / STATE_FILE).is_file():
            raise FileNotFoundError(f"{checkpoint} is not a complete training checkpoint (no {STATE_FILE})")
        problem = checkpoint_problem(checkpoint)
        if problem:
            newest, _ = newest_loadable_checkpoint(root)
            alternative = f" (now {describe_checkpoint(newest)})" if newest else ""
            raise DamagedCheckpointError(
                f"Cannot resume from checkpoint {describe_checkpoint(checkpoint)}: it is damaged ({problem}). Resume "
                f"from another one: --resume_from_checkpoint latest takes the newest loadable checkpoint"
                f"{alternative}, or pass a checkpoint path")
        return checkpoint
    if complete_checkpoints(root):
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume_from_checkpoint latest to "
                              "continue, or choose another --output_dir")
    return None


def set_aside_damaged(run_dir: Path, checkpoint: Path | None):
    """After `latest` fell back to `checkpoint`: rename the newer (damaged) checkpoints to `damaged-step-...`, so
    that neither rotation, `latest`, averaging nor export ever takes one of them for a checkpoint of the run."""
    resumed_step = checkpoint_step(checkpoint) if checkpoint is not None else -1
    for path in complete_checkpoints(run_dir / "checkpoints"):
        if checkpoint_step(path) > resumed_step:
            set_aside(path)


def load_training_state(accelerator, checkpoint: Path) -> TrainState:
    """Weights, optimizer, scheduler and every process's RNG from `checkpoint`; a failure names the checkpoint."""
    try:
        accelerator.load_state(str(checkpoint))
        return TrainState.load(checkpoint / STATE_FILE)
    except Exception as error:
        raise DamagedCheckpointError(
            f"Could not resume from checkpoint {describe_checkpoint(checkpoint)}: {type(error).__name__}: {error}. "
            "If the model settings or the number of processes changed since it was saved, resume with those it was "
            f"saved with; if the checkpoint is damaged, move it out of {checkpoint.parent} and resume with "
            "--resume_from_checkpoint latest (the newest loadable one)") from error


def adapt_to_processes(accelerator, state: TrainState, train_args: TrainingArguments):
    """A checkpoint saved by another number of processes: the data continues at the epoch's position (positions
    count the batches of the epoch's list, which does not depend on the number of processes: batching.Deal), and
    every process gets a random state of its own, as the saved ones were one per old process."""
    saved, now = state.num_processes, accelerator.num_processes
    if saved is None:  # saved before positions were global: they counted one process's batches
        if now > 1 and state.batches_in_epoch:
            state.batches_in_epoch *= now
            accelerator.print(f"Warning: this checkpoint predates global data positions; epoch {state.epoch} "
                              f"continues at batch {state.batches_in_epoch} of its list, assuming {now} processes "
                              "saved it (exact for one process only)")
        return
    if saved == now:
        return
    set_seed(train_args.seed + state.step, device_specific=True)
    accumulation = train_args.gradient_accumulation_steps
    same_update = accumulation * saved / now
    advice = (f"; to keep its size, resume with --gradient_accumulation_steps {same_update:g} --allow_recipe_change "
              "gradient_accumulation_steps" if same_update == int(same_update) else "")
    accelerator.print(
        f"The checkpoint was saved by {saved} process(es); resuming with {now}. Epoch {state.epoch} continues at "
        f"batch {state.batches_in_epoch} of its list, with the examples the {saved}-process run would have taken "
        f"next. Dropout and layer sampling draw from new random states. An update now averages {now} x "
        f"{accumulation} micro-batches instead of {saved} x {accumulation}{advice}.")


def run_description(model: ModelSection, data_args, train_args, config) -> dict:
    """The recipe as given (a valid recipe itself: `model`, `data`, `training`) and the model config it resolved to."""
    return {"model": model.as_recipe(), "data": dataclasses.asdict(data_args),
            "training": dataclasses.asdict(train_args), "model_config": config.to_dict()}


# What a resumed run may change freely: when it stops, how often it logs, validates and saves, where it reports.
# Every other field (the model, the data, the optimisation, the seed) changes what the run computes.
BOOKKEEPING_FIELDS = {
    "data": {"validation_split", "test_split", "max_eval_samples"},
    "training": {"output_dir", "max_steps", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                 "keep_best", "early_stopping_patience", "stop_when_flat", "stop_when_flat_after",
                 "max_consecutive_nonfinite_steps", "resume_from_checkpoint",
                 "report_to", "push_to_hub", "compare_with", "allow_recipe_change"},
    "model_config": {"transformers_version", "architectures", "_name_or_path", "dtype"},
}


def recipe_changes(saved: dict, given: dict) -> dict[str, tuple]:
    """{section.field: (saved value, given value)} for each field that differs and is not bookkeeping."""
    changes = {}
    for section in ("model_config", "data", "training"):
        old, new = saved.get(section, {}), given[section]
        ignored = BOOKKEEPING_FIELDS.get(section, set())
        if section == "model_config" and not new.get("glancing"):  # follows max_steps, read only when glancing
            ignored = ignored | {"glancing_anneal_steps"}
        for name in sorted(set(old) | set(new)):
            if name not in ignored and old.get(name) != new.get(name):
                changes[f"{section.replace('model_config', 'model')}.{name}"] = (old.get(name), new.get(name))
    return changes


def check_recipe_unchanged(run_dir: Path, given: dict, allowed: str | None):
    """Refuse to resume with a recipe whose model, data or optimisation fields differ from the run's (naming each),
    unless `--allow_recipe_change` lists them. Shapes that differ cannot load whatever is allowed."""
    saved_path = run_dir / "run_args.json"
    if not saved_path.is_file():
        return
    allowed = {name.strip() for name in (allowed or "").split(",") if name.strip()}
    given = json.loads(json.dumps(given))  # as run_args.json holds it (keys become strings)
    changes = recipe_changes(json.loads(saved_path.read_text()), given)
    refused = {k: v for k, v in changes.items() if k.split(".", 1)[1] not in allowed and k not in allowed}
    if refused:
        listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in refused.items())
        raise ValueError(
            f"Cannot resume {run_dir} with a different recipe: {listed}. Resume with the recipe it was trained with "
            f"({saved_path}), or, to change the run on purpose from here, pass --allow_recipe_change "
            f"{','.join(k.split('.', 1)[1] for k in refused)} (fields that change parameter shapes still cannot "
            "load). Stopping, logging, validation and saving settings can change freely.")


def save_run_description(run_dir: Path, description: dict, filtered: dict):
    """What export.py needs later to rebuild data and write the card for any checkpoint of this run."""
    (run_dir / "run_args.json").write_text(json.dumps(description, indent=2))
    (run_dir / "data_stats.json").write_text(json.dumps({"train_pairs": filtered}, indent=2))


def finish(trainer: Trainer):
    """Score the final model on the test split (or validation), draw the learning curve, export with a model card.

    The export is read back from the final checkpoint's `model/` (full weights even when training sharded them).
    """
    acc, args, data_args = trainer.accelerator, trainer.args, trainer.data_args
    eval_split = data_args.test_split if data_args.test_split in trainer.evaluation else data_args.validation_split
    scores = evaluate_split(acc, acc.unwrap_model(trainer.model), trainer.tokenizer, trainer.evaluation[eval_split],
                            args.max_tokens)
    if not acc.is_main_process:
        return
    run_dir = trainer.run_dir
    (run_dir / "data_stats.json").write_text(json.dumps({"train_pairs": trainer.filtered}, indent=2))  # stream: final
    skipped = trainer.state.skipped_steps
    trainer.record({"split": eval_split, "step": trainer.state.step, "skipped_steps": skipped,
                    **{k: v for k, v in scores.items() if k != "predictions"}})
    (run_dir / f"predictions-{eval_split}.txt").write_text("".join(p + "\n" for p in scores["predictions"]))
    curve = plot_learning_curve(run_dir / "metrics.jsonl", run_dir / "learning_curve.png")
    model = AutoModelForSeq2SeqLM.from_pretrained(trainer.last_saved_path / MODEL_DIR)
    export_dir = export_with_card(model, trainer.tokenizer, run_dir / "export",
                                  run_args=json.loads((run_dir / "run_args.json").read_text()), scores=scores,
                                  eval_split=eval_split, filtered=trainer.filtered, steps=trainer.state.step,
                                  example_source=trainer.evaluation[eval_split][0]["source"], learning_curve=curve,
                                  repo_id=args.push_to_hub, skipped_steps=skipped)
    acc.print(f"Exported to {export_dir}: {eval_split} BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}")
    if skipped:
        acc.print(f"Warning: {skipped} update(s) of this run were skipped for a non-finite loss or gradients (the "
                  "'skipped' records of metrics.jsonl say when and why)")
    examples = trainer.evaluation[eval_split]
    if args.compare_with:
        try:
            compare_with_reference(export_dir, args.compare_with, examples, scores, eval_split, acc.print)
        except (OSError, ValueError) as error:  # the run's own export is complete: say so, not a traceback
            acc.print(f"Warning: the comparison with {args.compare_with} failed ({error}); the export is complete")
    else:
        show_translations(export_dir, examples["source"][:3], acc.print)


def translate_with(model_dir, sources: list[str]) -> list[str]:
    """Translate with a saved model the way its users will: the pipeline for a WeakNAT, `generate` with beam 5 for
    the Marian baseline (transformers 5 has no translation pipeline)."""
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    if model.config.model_type == "weaknat":
        translator = pipeline("weaknat-translation", model=model, tokenizer=str(model_dir))
        return [o["translation_text"] for o in translator(list(sources), batch_size=64)]
    tokenizer, outputs = AutoTokenizer.from_pretrained(model_dir), []
    for start in range(0, len(sources), 64):
        batch = tokenizer(list(sources[start:start + 64]), padding=True, return_tensors="pt")
        ids = model.generate(**batch, num_beams=5, **generation_limits(model, batch["input_ids"]))
        outputs += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return outputs


def show_translations(export_dir: Path, sources: list[str], print_function):
    for source, output in zip(sources, translate_with(export_dir, sources)):
        print_function(f"  {source}\n  -> {output}")


def compare_with_reference(export_dir: Path, reference: str, examples, scores: dict, split: str, print_function,
                           shown: int = 3):
    """The run's export against a reference model (`compare_with`, e.g. the shipped one) on the same split: both
    BLEU scores, and the first `shown` sentences as each translates them."""
    sources = list(examples["source"])
    reference_output = translate_with(reference, sources)
    reference_scores = score_translations(reference_output, list(examples["target"]))
    print_function(f"{split} BLEU over the same {len(sources)} sentences: this run {scores['bleu']:.2f}, "
                   f"{reference} {reference_scores['bleu']:.2f}")
    for source, ours, theirs in zip(sources[:shown], translate_with(export_dir, sources[:shown]),
                                    reference_output[:shown]):
        print_function(f"  {source}\n    this run:  {ours}\n    reference: {theirs}")


def check_reference(reference: str | None):
    """A `compare_with` model that cannot be found fails before training, not after it."""
    if reference:
        try:
            AutoConfig.from_pretrained(reference)
        except (OSError, ValueError) as error:
            raise ValueError(f"compare_with={reference!r}: no model there ({error})") from error


def own_run_folder_everywhere(accelerator, run_dir: Path) -> RunFolderOwner | None:
    """The main process takes the run folder (run_lock.py); every process learns whether it could, so that none
    trains when the folder belongs to another run."""
    owner, refusal = None, None
    if accelerator.is_main_process:
        try:
            owner = RunFolderOwner(run_dir, "training/train.py", accelerator.print).acquire()
        except RunFolderBusy as error:
            refusal = error
    if accelerator.num_processes > 1:
        refused = accelerator.reduce(torch.tensor([float(refusal is not None)], device=accelerator.device), "sum")
        if refused.item() > 0 and refusal is None:
            refusal = RunFolderBusy(f"{run_dir} is in use by another run (the main process's error names it)")
    if refusal is not None:
        raise refusal
    return owner


def main(argv: list[str] | None = None):
    model_section, data_args, train_args = parse_arguments(argv)
    check_reference(train_args.compare_with)
    accelerator = build_accelerator(model_section, train_args)
    accelerator.print(f"{accelerator.num_processes} process(es), {accelerator.distributed_type}, "
                      f"mixed precision {accelerator.mixed_precision}")
    owner = own_run_folder_everywhere(accelerator, Path(train_args.output_dir))
    try:
        train_and_export(accelerator, model_section, data_args, train_args)
    finally:
        if owner is not None:
            owner.release()


def train_and_export(accelerator, model_section: ModelSection, data_args: DataArguments,
                     train_args: TrainingArguments):
    run_dir = Path(train_args.output_dir)
    checkpoint = resume_checkpoint(run_dir, train_args, accelerator.print)
    accelerator.wait_for_everyone()  # every process chose its checkpoint before damaged ones are set aside
    if accelerator.is_main_process:
        if train_args.resume_from_checkpoint == "latest":
            set_aside_damaged(run_dir, checkpoint)
        run_dir.mkdir(parents=True, exist_ok=True)
    train = data.load_training_split(data_args)
    tokenizer = run_tokenizer(accelerator, data_args, run_dir, train, model_section.resolved.max_position_embeddings)
    set_seed(train_args.seed)  # same initial weights everywhere (DDP would broadcast them anyway)
    model = build_model(model_section, tokenizer, train_args.max_steps)
    if checkpoint is not None:  # the recipe it was trained with, against the one given now
        check_recipe_unchanged(run_dir, run_description(model_section, data_args, train_args, model.config),
                               train_args.allow_recipe_change)
    train, filtered = data.tokenize_training_split(accelerator, train, tokenizer, model.config)
    evaluation = data.tokenize_evaluation_splits(accelerator, data.load_evaluation_splits(data_args), tokenizer,
                                                 model.config)
    if not evaluation:
        raise FileNotFoundError(f"Neither {data_args.validation_split!r} nor {data_args.test_split!r} exists in "
                                f"{data_args.dataset}: validation and the model card need one of them")
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_args.learning_rate, weight_decay=train_args.weight_decay,
                                  betas=(train_args.adam_beta1, train_args.adam_beta2))
    scheduler = get_inverse_sqrt_schedule(optimizer, num_warmup_steps=train_args.warmup_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    if checkpoint is not None:
        state = load_training_state(accelerator, checkpoint)
        accelerator.print(f"Resumed from {checkpoint} (step {state.step}, epoch {state.epoch})")
        adapt_to_processes(accelerator, state, train_args)
    else:
        set_seed(train_args.seed, device_specific=True)  # different dropout and layer sampling per process
    description = run_description(model_section, data_args, train_args, accelerator.unwrap_model(model).config)
    if accelerator.is_main_process:
        save_run_description(run_dir, description, filtered)
        MetricsLog(run_dir / "metrics.jsonl").drop_after(state.step)
    accelerator.init_trackers("weaknat", config=tracker_config(description))
    trainer = Trainer(accelerator, model, optimizer, scheduler, tokenizer, train, evaluation, filtered, data_args,
                      train_args, state, resumed_from=checkpoint)
    try:
        trainer.run()
    except TrainingStopped:  # a signal: the checkpoint is saved, the run is not finished (no test score, no export)
        accelerator.end_training()
        raise
    finish(trainer)
    if accelerator.is_main_process and train_args.push_to_hub:
        push_export_to_hub(run_dir / "export", train_args.push_to_hub)
    accelerator.end_training()


def tracker_config(description: dict) -> dict:
    """The run's data and training arguments and its resolved model config, flat; trackers (TensorBoard hparams) take
    scalars and strings only."""
    values = {**{f"model.{k}": v for k, v in description["model_config"].items()}, **description["data"],
              **description["training"]}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


if __name__ == "__main__":
    try:
        main()
    except TrainingStopped as stopped:  # SIGTERM / SIGINT, after the checkpoint: 143 / 130
        sys.exit(stopped.exit_status)
