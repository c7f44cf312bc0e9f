"""The training loop: optimizer steps over token batches, logging, validation, checkpoints and early stopping.

train.py builds the pieces (data, model, optimizer, schedule, accelerator) and hands them to a `Trainer`.
"""

import contextlib
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from training.batching import TrainingBatches, collate, optimizer_steps
from training.checkpoints import save_checkpoint
from training.evaluation import evaluate_split
from training.records import MetricsLog


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
                 data_args, train_args, state, resumed_from: Path | None = None):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.tokenizer, self.evaluation, self.filtered = tokenizer, evaluation, filtered
        self.config = accelerator.unwrap_model(model).config  # a WeakNATConfig, or the Marian baseline's
        self.data_args, self.args, self.state = data_args, train_args, state
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
        steps, world, nar = window["steps"], acc.num_processes, self.config.model_type == "weaknat"
        record = {"split": "train", "step": self.state.step, "epoch": self.state.epoch,
                  "loss": sums[0].item() / steps / world, "ctc_loss": sums[1].item() / steps / world if nar else None,
                  "ar_loss": sums[2].item() / steps / world if nar and self.config.weak_ar_layers else None,
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
