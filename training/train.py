"""Train a CTC non-autoregressive translator with auxiliary weak AR decoders (Wang, Zheng and Huang, EMNLP 2022).

    accelerate launch training/train.py training/configs/demo.yaml [--max_steps 50 --output_dir runs/x ...]

A recipe (YAML or JSON, sections `model`, `data`, `training`) sets the three dataclasses of arguments.py;
command-line flags override it. The run directory gets the tokenizer, checkpoints, metrics.jsonl,
learning_curve.png and, at the end, `export/`: the Hub checkpoint without the weak AR decoders, with its card.
"""

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `training/` is a folder of scripts run from a checkout, not a package
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, get_inverse_sqrt_schedule, pipeline  # noqa: E402

from hf_weaknat import (  # noqa: E402  (also registers the weaknat Auto classes)
    WeakNATConfig, WeakNATForConditionalGeneration, push_export_to_hub, train_weaknat_tokenizer,
)
from hf_weaknat.tokenization_weaknat import blank_token_id  # noqa: E402

import data  # noqa: E402
from ar_baseline import build_marian_baseline, generation_limits  # noqa: E402
from arguments import DataArguments, ModelArguments, TrainingArguments, parse_arguments  # noqa: E402
from batching import TrainingBatches, collate, optimizer_steps  # noqa: E402
from checkpoints import (  # noqa: E402
    MODEL_DIR, STATE_FILE, TrainState, complete_checkpoints, resolve_checkpoint, save_checkpoint,
)
from evaluation import evaluate_split  # noqa: E402
from model_card import export_with_card  # noqa: E402
from records import MetricsLog, plot_learning_curve  # noqa: E402


def build_accelerator(model_args: ModelArguments, train_args: TrainingArguments) -> Accelerator:
    # Without parameter sharing only the sampled weak AR decoders run in a step: DDP must expect unused parameters
    unused = (model_args.model_type == "weaknat" and model_args.weak_ar_layers > 0
              and not model_args.weak_ar_share_parameters)
    trackers = [t for t in train_args.report_to.split(",") if t and t != "none"]
    if "tensorboard" in trackers and not _tensorboard_installed():
        trackers.remove("tensorboard")
    return Accelerator(
        mixed_precision=train_args.mixed_precision, log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=train_args.output_dir,
                                            logging_dir=str(Path(train_args.output_dir) / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
        # the schedule is written in optimizer steps: accelerate would otherwise step it once per process
        step_scheduler_with_optimizer=False,
    )


def _tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def load_or_train_tokenizer(accelerator, data_args: DataArguments, run_dir: Path, train_raw, model_max_length: int):
    """The run's tokenizer, always kept in `<run>/tokenizer` (a resumed run must reuse the same vocabulary)."""
    saved = run_dir / "tokenizer"
    if accelerator.is_main_process and not (saved / "tokenizer_config.json").is_file():
        if data_args.tokenizer_name:
            AutoTokenizer.from_pretrained(data_args.tokenizer_name).save_pretrained(saved)
        else:
            accelerator.print(f"Training a {data_args.vocab_size}-piece SentencePiece vocabulary on the training data")
            train_weaknat_tokenizer(data.training_texts(train_raw), vocab_size=data_args.vocab_size,
                                    model_max_length=model_max_length, save_directory=saved)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(saved)


def build_config(model_args: ModelArguments, tokenizer, max_steps: int) -> WeakNATConfig:
    """ModelArguments field by field, plus the tokenizer's vocabulary size and special ids (the CTC blank included)."""
    fields = {f.name: getattr(model_args, f.name) for f in dataclasses.fields(model_args) if f.name != "model_type"}
    fields["glancing_anneal_steps"] = fields["glancing_anneal_steps"] or max_steps
    return WeakNATConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         blank_token_id=blank_token_id(tokenizer), **fields)


def build_model(model_args: ModelArguments, tokenizer, max_steps: int):
    """The model to train: the WeakNAT translator, or (`model_type: marian`) the AR baseline / distillation teacher."""
    if model_args.model_type == "marian":
        return build_marian_baseline(model_args, tokenizer)
    if model_args.model_type != "weaknat":
        raise ValueError(f"Unknown model_type {model_args.model_type!r}: 'weaknat' or 'marian'")
    return WeakNATForConditionalGeneration(build_config(model_args, tokenizer, max_steps))


def new_window() -> dict:
    """Sums over the optimizer steps since the last log line."""
    return {"loss": 0.0, "ctc_loss": 0.0, "ar_loss": 0.0, "tokens": 0, "unfit_pairs": 0, "steps": 0}


def train_step(accelerator, model, optimizer, scheduler, micro_batches, step: int, max_grad_norm: float,
               pad_token_id: int) -> dict:
    """One optimizer step over a group of micro-batches; returns this process's loss terms and token count."""
    totals = new_window()
    for i, examples in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device) for k, v in collate(examples, pad_token_id).items()}
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):  # all-reduce gradients once per step
            out = model(**batch, training_step=step)
            accelerator.backward(out.loss / len(micro_batches))
        totals["loss"] += out.loss.item() / len(micro_batches)
        # the AR baseline's output has no CTC/weak-AR terms and no unfit pairs
        for key in ("ctc_loss", "ar_loss"):
            term = getattr(out, key, None)
            totals[key] += (term.item() if term is not None else 0.0) / len(micro_batches)
        totals["tokens"] += int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
        totals["unfit_pairs"] += int(getattr(out, "num_unfit_pairs", 0))
    if max_grad_norm > 0:
        totals["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


class Trainer:
    """The loop's moving parts in one place, so the loop itself reads top to bottom."""

    def __init__(self, accelerator, model, optimizer, scheduler, tokenizer, train, evaluation, filtered,
                 model_args, data_args, train_args, state, resumed_from: Path | None = None):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.tokenizer, self.evaluation, self.filtered = tokenizer, evaluation, filtered
        self.model_args, self.data_args, self.args, self.state = model_args, data_args, train_args, state
        self.run_dir = Path(train_args.output_dir)
        self.batches = TrainingBatches(train, train_args.max_tokens, train_args.seed, accelerator.process_index,
                                       accelerator.num_processes)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
        self.window, self.window_start = new_window(), time.time()
        # a resumed run starts from a saved checkpoint
        self.last_saved_step, self.last_saved_path = (state.step, resumed_from) if resumed_from else (None, None)
        self.bar = None

    def run(self):
        args, state = self.args, self.state
        self.bar = tqdm(total=args.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
                        disable=not self.accelerator.is_local_main_process)
        self.model.train()
        while state.step < args.max_steps:
            if self.data_args.streaming:  # a stream is counted as it is read: count each pass over it afresh
                self.filtered.update(dict.fromkeys(self.filtered, 0))
            batches = (b for i, b in enumerate(self.batches.epoch(state.epoch))
                       if i >= state.batches_in_epoch)  # resume mid-epoch: skip what this epoch already trained on
            for group in optimizer_steps(batches, args.gradient_accumulation_steps):
                totals = train_step(self.accelerator, self.model, self.optimizer, self.scheduler, group, state.step,
                                    args.max_grad_norm, self.tokenizer.pad_token_id)
                state.step += 1
                state.batches_in_epoch += len(group)
                self.bar.update(1)
                self.after_step(totals)
                if state.step >= args.max_steps or self.plateaued():
                    break
            else:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                continue
            break  # max_steps reached, or the validation BLEU stopped improving
        self.bar.close()
        if str(state.step) not in state.validation_bleu and self.args.eval_steps > 0:
            self.validate()
        if self.last_saved_step != state.step:
            self.save()

    def plateaued(self) -> bool:
        """Validation BLEU has not reached a new best for `early_stopping_patience` validations in a row."""
        patience, scores = self.args.early_stopping_patience, list(self.state.validation_bleu.values())
        if patience <= 0 or len(scores) <= patience:
            return False
        stale = len(scores) - 1 - max(range(len(scores)), key=scores.__getitem__)
        if stale >= patience:
            self.accelerator.print(f"\nValidation BLEU has not improved for {stale} validations: stopping at step "
                                   f"{self.state.step}")
        return stale >= patience

    def after_step(self, totals: dict):
        step, args = self.state.step, self.args
        for key in ("loss", "ctc_loss", "ar_loss", "tokens", "unfit_pairs"):
            self.window[key] += totals[key]
        self.window["steps"] += 1
        if args.logging_steps > 0 and step % args.logging_steps == 0:
            self.log_training(totals.get("grad_norm"))
        if args.eval_steps > 0 and step % args.eval_steps == 0 and step < args.max_steps:
            self.validate()
        if args.save_steps > 0 and step % args.save_steps == 0 and step < args.max_steps:
            self.save()

    def log_training(self, grad_norm):
        acc, window = self.accelerator, self.window
        # one collective for every process's window: mean losses, summed tokens
        sums = acc.reduce(torch.tensor([window["loss"], window["ctc_loss"], window["ar_loss"], window["tokens"],
                                        window["unfit_pairs"]], dtype=torch.float64, device=acc.device), "sum")
        steps, world, nar = window["steps"], acc.num_processes, self.model_args.model_type == "weaknat"
        record = {"split": "train", "step": self.state.step, "epoch": self.state.epoch,
                  "loss": sums[0].item() / steps / world, "ctc_loss": sums[1].item() / steps / world if nar else None,
                  "ar_loss": sums[2].item() / steps / world if nar and self.model_args.weak_ar_layers else None,
                  "lr": self.scheduler.get_last_lr()[0],
                  "tokens_per_s": sums[3].item() / (time.time() - self.window_start),
                  "unfit_pairs_in_batches": int(sums[4].item()), "grad_norm": grad_norm}
        if self.data_args.streaming:  # a stream's filter counts grow as it is read
            record.update({f"filtered_{k}": v for k, v in self.filtered.items()})
        self.record(record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}")
        self.window, self.window_start = new_window(), time.time()

    def record(self, record: dict):
        self.metrics.write(record)
        prefix = record["split"]
        self.accelerator.log({f"{prefix}/{k}": v for k, v in record.items()
                              if isinstance(v, (int, float)) and k not in ("split", "step")}, step=record["step"])

    def validate(self) -> dict:
        split = self.evaluation.get(self.data_args.validation_split)
        if split is None:
            return {}
        result = evaluate_split(self.accelerator, self.accelerator.unwrap_model(self.model), self.tokenizer, split,
                                self.args.max_tokens)
        self.model.train()
        self.state.validation_bleu[str(self.state.step)] = result["bleu"]
        self.record({"split": "validation", "step": self.state.step,
                     **{k: v for k, v in result.items() if k != "predictions"}})
        self.accelerator.print(f"\nstep {self.state.step}: validation loss {result['loss']:.3f}, BLEU "
                               f"{result['bleu']:.2f}, chrF {result['chrf']:.2f} ({result['bleu_signature']})")
        return result

    def save(self):
        path = save_checkpoint(self.accelerator, self.model, self.run_dir / "checkpoints", self.state,
                               self.args.save_total_limit, self.args.keep_best)
        self.last_saved_step, self.last_saved_path = self.state.step, path
        self.accelerator.print(f"\nSaved {path}")


def resume_checkpoint(run_dir: Path, train_args: TrainingArguments) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (refusing to silently mix two runs in one directory)."""
    root = run_dir / "checkpoints"
    if train_args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(root, train_args.resume_from_checkpoint)
        if checkpoint is not None and not (checkpoint / STATE_FILE).is_file():
            raise FileNotFoundError(f"{checkpoint} is not a complete training checkpoint (no {STATE_FILE})")
        return checkpoint  # None for `latest` before the first save: start from scratch
    if complete_checkpoints(root):
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume_from_checkpoint latest to "
                              "continue, or choose another --output_dir")
    return None


def save_run_description(run_dir: Path, model_args, data_args, train_args, filtered: dict):
    """What export.py needs later to rebuild data and write the card for any checkpoint of this run."""
    arguments = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args),
                 "training": dataclasses.asdict(train_args)}
    (run_dir / "run_args.json").write_text(json.dumps(arguments, indent=2))
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
    trainer.record({"split": eval_split, "step": trainer.state.step,
                    **{k: v for k, v in scores.items() if k != "predictions"}})
    (run_dir / f"predictions-{eval_split}.txt").write_text("".join(p + "\n" for p in scores["predictions"]))
    curve = plot_learning_curve(run_dir / "metrics.jsonl", run_dir / "learning_curve.png")
    model = AutoModelForSeq2SeqLM.from_pretrained(trainer.last_saved_path / MODEL_DIR)
    export_dir = export_with_card(model, trainer.tokenizer, run_dir / "export",
                                  run_args=json.loads((run_dir / "run_args.json").read_text()), scores=scores,
                                  eval_split=eval_split, filtered=trainer.filtered, steps=trainer.state.step,
                                  example_source=trainer.evaluation[eval_split][0]["source"], learning_curve=curve,
                                  repo_id=args.push_to_hub)
    acc.print(f"Exported to {export_dir}: {eval_split} BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}")
    show_translations(export_dir, trainer.evaluation[eval_split]["source"][:3], acc.print)


def show_translations(export_dir: Path, sources: list[str], print_function):
    """Translate a few sentences with the export itself, the way its users will: the pipeline for a WeakNAT,
    `generate` with beam 5 for the Marian baseline (transformers 5 has no translation pipeline)."""
    model = AutoModelForSeq2SeqLM.from_pretrained(export_dir)
    if model.config.model_type == "weaknat":
        outputs = [o["translation_text"] for o in pipeline("weaknat-translation", model=model,
                                                           tokenizer=str(export_dir))(list(sources))]
    else:
        tokenizer = AutoTokenizer.from_pretrained(export_dir)
        batch = tokenizer(list(sources), padding=True, return_tensors="pt")
        ids = model.generate(**batch, num_beams=5, **generation_limits(model, batch["input_ids"]))
        outputs = tokenizer.batch_decode(ids, skip_special_tokens=True)
    for source, output in zip(sources, outputs):
        print_function(f"  {source}\n  -> {output}")


def main(argv: list[str] | None = None):
    model_args, data_args, train_args = parse_arguments(argv)
    accelerator = build_accelerator(model_args, train_args)
    accelerator.print(f"{accelerator.num_processes} process(es), {accelerator.distributed_type}, "
                      f"mixed precision {accelerator.mixed_precision}")
    run_dir = Path(train_args.output_dir)
    checkpoint = resume_checkpoint(run_dir, train_args)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    train = data.load_training_split(data_args)
    tokenizer = load_or_train_tokenizer(accelerator, data_args, run_dir, train, model_args.max_position_embeddings)
    train, filtered = data.tokenize_training_split(accelerator, train, tokenizer, model_args)
    evaluation = data.tokenize_evaluation_splits(accelerator, data.load_evaluation_splits(data_args), tokenizer,
                                                 model_args)
    if not evaluation:
        raise FileNotFoundError(f"Neither {data_args.validation_split!r} nor {data_args.test_split!r} exists in "
                                f"{data_args.dataset}: validation and the model card need one of them")
    set_seed(train_args.seed)  # same initial weights everywhere (DDP would broadcast them anyway)
    model = build_model(model_args, tokenizer, train_args.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_args.learning_rate, weight_decay=train_args.weight_decay,
                                  betas=(train_args.adam_beta1, train_args.adam_beta2))
    scheduler = get_inverse_sqrt_schedule(optimizer, num_warmup_steps=train_args.warmup_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))  # weights, optimizer, scheduler and every process's RNG
        state = TrainState.load(checkpoint / STATE_FILE)
        accelerator.print(f"Resumed from {checkpoint} (step {state.step}, epoch {state.epoch})")
    else:
        set_seed(train_args.seed, device_specific=True)  # different dropout and layer sampling per process
    if accelerator.is_main_process:
        save_run_description(run_dir, model_args, data_args, train_args, filtered)
        MetricsLog(run_dir / "metrics.jsonl").drop_after(state.step)
    accelerator.init_trackers("weaknat", config=tracker_config(model_args, data_args, train_args))
    trainer = Trainer(accelerator, model, optimizer, scheduler, tokenizer, train, evaluation, filtered, model_args,
                      data_args, train_args, state, resumed_from=checkpoint)
    trainer.run()
    finish(trainer)
    if accelerator.is_main_process and train_args.push_to_hub:
        push_export_to_hub(run_dir / "export", train_args.push_to_hub)
    accelerator.end_training()


def tracker_config(*arguments) -> dict:
    # trackers (TensorBoard hparams) take scalars and strings only
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for a in arguments for k, v in dataclasses.asdict(a).items()}


if __name__ == "__main__":
    main()
