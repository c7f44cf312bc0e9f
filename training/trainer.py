"""The training loop: optimizer steps over token batches, logging, validation, checkpoints and early stopping.

train.py builds the pieces (data, model, optimizer, schedule, accelerator) and hands them to a `Trainer`.

Divergence is never silent: a step whose loss (on any process) or gradients are not finite changes no weight. Its
update is skipped with a warning and a `"split": "skipped"` record in metrics.jsonl, and after
`max_consecutive_nonfinite_steps` such steps in a row the run stops with TrainingDiverged. A skipped step does not
count as an optimizer step (the schedule and `max_steps` wait for a good one); its batches are consumed.

Preemption is never lossy: SIGTERM or SIGINT stops the run after the current update with a checkpoint
(preemption.py).
"""

import contextlib
import math
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from training.batching import TrainingBatches, collate, optimizer_steps
from training.checkpoints import save_checkpoint
from training.convergence import plateau_step
from training.data import DataError
from training.evaluation import evaluate_split
from training.preemption import StopRequests, TrainingStopped
from training.records import MetricsLog


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradients."""


# The named loss terms logged per step: CTC's, the vanilla NAR's and the weak AR decoders'
LOSS_TERMS = ("ctc_loss", "token_loss", "length_loss", "ar_loss")


def new_window() -> dict:
    """Sums over the optimizer steps since the last log line (`skipped_steps`: updates skipped meanwhile)."""
    return {"loss": 0.0, **dict.fromkeys(LOSS_TERMS, 0.0), "tokens": 0, "unfit_pairs": 0, "steps": 0,
            "skipped_steps": 0}


def train_step(accelerator, model, optimizer, scheduler, micro_batches, step: int, max_grad_norm: float,
               pad_token_id: int) -> dict:
    """One optimizer step over a group of micro-batches.

    Returns this process's loss terms and token count, the gradient norm, and `skipped`: None when the update was
    applied, else why not ("non-finite loss", "non-finite gradients", or under fp16 "fp16 gradient overflow"), with
    `counts_as_nonfinite`: whether it counts towards max_consecutive_nonfinite_steps. Every process takes the same
    decision: the loss flags are summed over processes and the gradient norm is that of the all-reduced gradients.

    fp16 keeps its grad scaler: when the gradients overflow, the scaler skips the update and lowers its scale, as it
    always does. Such a skip counts towards the limit only once the scale is below 1 (then the gradients themselves,
    not the scaling, overflow); bf16 and fp32 have no scaler, and every non-finite step counts.
    """
    totals = new_window()
    finite_loss = True
    for i, examples in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device) for k, v in collate(examples, pad_token_id).items()}
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):  # all-reduce gradients once per step
            out = model(**batch, training_step=step)
            accelerator.backward(out.loss / len(micro_batches))
        loss = out.loss.item()
        finite_loss = finite_loss and math.isfinite(loss)
        totals["loss"] += loss / len(micro_batches)
        # the AR baseline's output has no NAR/weak-AR terms and no unfit pairs
        for key in LOSS_TERMS:
            term = getattr(out, key, None)
            totals[key] += (term.item() if term is not None else 0.0) / len(micro_batches)
        totals["tokens"] += int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
        totals["unfit_pairs"] += int(getattr(out, "num_unfit_pairs", 0))
    # the norm of the (unscaled) gradients; without clipping, a limit of inf multiplies them by exactly 1
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf))
    flags = accelerator.reduce(torch.tensor([0.0 if finite_loss else 1.0], device=accelerator.device), "sum")
    scaler = accelerator.scaler  # only fp16 on an accelerator has one
    skipped, counts = None, True
    if flags.item() > 0:
        skipped = "non-finite loss"
    elif not math.isfinite(grad_norm):
        skipped = "non-finite gradients" if scaler is None else "fp16 gradient overflow"
    if skipped is None:
        optimizer.step()
        scheduler.step()
    elif scaler is not None:  # the scaler must see the step: it lowers its scale and resets for the next one
        if not math.isfinite(grad_norm):
            optimizer.step()  # finds the non-finite gradients, so it skips the update itself
        else:
            scaler.update()  # a non-finite loss with finite gradients: no update, and none by the scaler either
        counts = skipped != "fp16 gradient overflow" or scaler.get_scale() < 1
    optimizer.zero_grad(set_to_none=True)
    totals.update(grad_norm=grad_norm, skipped=skipped, counts_as_nonfinite=counts)
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
        self.nonfinite_in_a_row = 0
        self.stopped_by = None  # the signal that stopped the run

    def run(self):
        """Train to `max_steps` (or early stopping: `early_stopping_patience`, `stop_when_flat`), then validate and save. A SIGTERM or SIGINT stops
        the run after the current update with a saved checkpoint: TrainingStopped (preemption.py)."""
        with StopRequests() as stop:
            self.train_until_done(stop)
            if self.stopped_by is not None:  # signals during this save are noted, not obeyed: it completes
                if self.last_saved_step != self.state.step:
                    self.save()
                name = signal.Signals(self.stopped_by).name
                self.record({"split": "stopped", "step": self.state.step, "signal": name})
                self.accelerator.print(f"\n{name}: stopped after update {self.state.step}; the checkpoint "
                                       f"{self.last_saved_path} is complete. Continue with --resume_from_checkpoint "
                                       "latest")
                raise TrainingStopped(self.stopped_by, self.state.step, self.last_saved_path)
            if str(self.state.step) not in self.state.validation_bleu and self.args.eval_steps > 0:
                self.validate()
            if self.last_saved_step != self.state.step:
                self.save()

    def train_until_done(self, stop: StopRequests):
        args, state = self.args, self.state
        self.bar = tqdm(total=args.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
                        disable=not self.accelerator.is_local_main_process)
        self.model.train()
        while state.step < args.max_steps:
            if self.data_args.streaming:  # a stream is counted as it is read: count each pass over it afresh
                self.filtered.update(dict.fromkeys(self.filtered, 0))
            # from the epoch's position: a resumed run skips what the epoch already trained on, under any number
            # of processes (batching.Deal)
            epoch_pass = self.batches.epoch(state.epoch, state.batches_in_epoch)
            trained_in_epoch = state.batches_in_epoch > 0
            for group in optimizer_steps(epoch_pass, args.gradient_accumulation_steps):
                trained_in_epoch = True
                totals = train_step(self.accelerator, self.model, self.optimizer, self.scheduler,
                                    [examples for examples, _ in group], state.step, args.max_grad_norm,
                                    self.tokenizer.pad_token_id)
                state.batches_in_epoch = group[-1][1]
                if totals["skipped"]:
                    self.skip(totals)  # raises TrainingDiverged after too many in a row
                    continue
                self.nonfinite_in_a_row = 0
                state.step += 1
                self.bar.update(1)
                self.after_step(totals)
                self.stopped_by = stop.agreed(self.accelerator)
                if (state.step >= args.max_steps or self.plateaued() or self.flattened()
                        or self.stopped_by is not None):
                    break
            else:
                if not trained_in_epoch:  # a stream whose every pair was filtered out: stop, do not spin
                    raise DataError(f"A whole pass over the training data gave no usable batch "
                                    f"({dict(self.filtered)}, {epoch_pass.left_out} left out as fewer than the "
                                    f"{self.accelerator.num_processes} processes): check the data and the model's "
                                    "length limits")
                self.end_epoch(epoch_pass.left_out)
                continue
            break  # max_steps reached, the validation BLEU stopped improving, or a stop signal
        self.bar.close()

    def end_epoch(self, left_out: int):
        """Count the examples this epoch left out (a last batch too small to give every process a share) and move to
        the next epoch."""
        state = self.state
        if left_out:
            state.left_out_examples += left_out
            self.accelerator.print(
                f"\nEpoch {state.epoch}: its last {left_out} example(s) could not be shared by the "
                f"{self.accelerator.num_processes} processes and were left out of this epoch (the next epoch's "
                f"shuffle ends with others; {state.left_out_examples} left out in the run so far)")
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0

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

    def flattened(self) -> bool:
        """Validation BLEU has flattened by the study's plateau rule (convergence.py) with `stop_when_flat` as the
        gain, at a validation from `stop_when_flat_after` updates on. Recorded as a "stopped" record naming the
        step where the curve flattened, so a study scores the run where it ended."""
        args, state = self.args, self.state
        if (not args.stop_when_flat or state.step < args.stop_when_flat_after
                or str(state.step) not in state.validation_bleu):  # judged right after a validation only
            return False
        curve = sorted((int(step), bleu) for step, bleu in state.validation_bleu.items())
        flat_since = plateau_step(curve, args.stop_when_flat)
        if flat_since is None:
            return False
        self.record({"split": "stopped", "step": state.step, "reason": "validation BLEU flat",
                     "flat_since": flat_since, "gain": args.stop_when_flat})
        self.accelerator.print(f"\nValidation BLEU gained less than {args.stop_when_flat} since step {flat_since} "
                               f"(best {max(b for _, b in curve):.2f}): flat over the last quarter, stopping at "
                               f"step {state.step}")
        return True

    def skip(self, totals: dict):
        """Count, record and warn about an update that was not applied; stop the run after too many in a row."""
        state, limit = self.state, self.args.max_consecutive_nonfinite_steps
        state.skipped_steps += 1
        self.window["skipped_steps"] += 1
        self.nonfinite_in_a_row += 1 if totals["counts_as_nonfinite"] else 0
        self.record({"split": "skipped", "step": state.step + 1, "epoch": state.epoch, "reason": totals["skipped"],
                     "loss": totals["loss"], "grad_norm": totals["grad_norm"], "in_a_row": self.nonfinite_in_a_row,
                     "skipped_steps": state.skipped_steps})
        scale = (f" (the grad scaler lowered its scale to {self.accelerator.scaler.get_scale():g})"
                 if totals["skipped"] == "fp16 gradient overflow" else "")
        self.accelerator.print(
            f"\nWarning: step {state.step + 1}: {totals['skipped']} (loss {totals['loss']:.4g}, gradient norm "
            f"{totals['grad_norm']:.4g}){scale}; update skipped ({self.nonfinite_in_a_row} in a row, "
            f"{state.skipped_steps} in the run; the run stops at {limit} in a row)")
        if self.nonfinite_in_a_row >= limit:
            raise TrainingDiverged(self.divergence_message())

    def divergence_message(self) -> str:
        state, limit = self.state, self.args.max_consecutive_nonfinite_steps
        saved = (f"The newest checkpoint, {self.last_saved_path} (step {self.last_saved_step}), was saved before; "
                 "its weights are finite but may already be far off (see its loss in metrics.jsonl). "
                 if self.last_saved_path else "No checkpoint was saved. ")
        return (f"Training diverged: {limit} attempts in a row at optimizer step {state.step + 1} had a non-finite "
                f"loss or gradients, and each update was skipped ({state.skipped_steps} skipped in the run; "
                f"--max_consecutive_nonfinite_steps {limit}). No checkpoint, export or model card was written from "
                f"them. {saved}To fix it, lower --learning_rate, lengthen --warmup_steps or set --max_grad_norm "
                "(bf16 rather than fp16 also helps), and train again in a fresh --output_dir.")

    def after_step(self, totals: dict):
        step, args = self.state.step, self.args
        for key in ("loss", *LOSS_TERMS, "tokens", "unfit_pairs"):
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
        keys = ("loss", *LOSS_TERMS, "tokens", "unfit_pairs")
        sums = dict(zip(keys, acc.reduce(torch.tensor([window[k] for k in keys], dtype=torch.float64,
                                                      device=acc.device), "sum").tolist()))
        steps, world, nar = window["steps"], acc.num_processes, self.config.model_type == "weaknat"
        ctc, vanilla = nar and self.config.nar_type == "ctc", nar and self.config.nar_type == "vanilla"
        mean = lambda key, logged: sums[key] / steps / world if logged else None  # noqa: E731
        record = {"split": "train", "step": self.state.step, "epoch": self.state.epoch, "loss": mean("loss", True),
                  "ctc_loss": mean("ctc_loss", ctc), **({"token_loss": mean("token_loss", True),
                                                         "length_loss": mean("length_loss", True)} if vanilla else {}),
                  "ar_loss": mean("ar_loss", nar and self.config.weak_ar_layers),
                  "lr": self.scheduler.get_last_lr()[0],
                  "tokens_per_s": sums["tokens"] / (time.time() - self.window_start),
                  "updates_per_s": steps / (time.time() - self.window_start),  # validation and saving included
                  "unfit_pairs_in_batches": int(sums["unfit_pairs"]), "grad_norm": grad_norm,
                  "skipped_steps": window["skipped_steps"]}
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
