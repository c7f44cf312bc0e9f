"""Training cost of the weak AR decoders: the paper's Table 3 as ratios measured in one run.

Variants (paper Table 3 rows), all at the same size, trained on IDENTICAL batches:
    plain CTC       weak_ar_layers=0
    no tricks       one weak AR decoder per NAR layer, every layer every step (share False, sample ratio 1.0)
    sharing only    one weak AR decoder for all layers, every layer every step (share True, ratio 1.0)
    sampling only   one decoder per layer, a random half of the layers per step (share False, ratio 0.5)
    both            sharing + sampling: the package default (share True, ratio 0.5)

A step is `zero_grad` + forward (CTC + weak AR losses) + backward + AdamW step. Batches are real Multi30k training
pairs (seeded shuffle), packed up to `--max_tokens` the way fairseq counts them (sentences x longest side); repeat r
gives every variant the same batch r, and the same seed before the step (same sampled layers where sampling is on).
After `--warmup` steps per variant, `--repeats` repeats run every variant once in an order rotated by one each
repeat; step time is the median over repeats and each ratio is that median over plain CTC's median.
CPU time (all threads) is recorded beside wall time: on a machine shared with other jobs the CPU-time ratio is the
steadier one. The paper's hours include everything a real run does (data, validation, fp16 on GPUs); ours are the
step alone.
Peak memory: on CPU, before any timing, each variant runs `--memory_steps` steps in a fresh subprocess, which reports
its resident size after imports + model + optimizer and its peak resident size (VmHWM, reset after the build) over
the steps; the difference is what training adds (including ~150 MB of lazily loaded kernels, the same in every
variant). On CUDA: torch.cuda.max_memory_allocated over the timed steps. Parameters: the training model's total, and
what the export keeps (the training model minus `weak_ar.*`: exactly a plain CTC model of the same size). The paper's
83.8M for "no tricks" matches 7 weak AR decoders (one per NAR layer plus one on the encoder, as its released code
does): `--weak_ar_on_encoder` reproduces that.

Examples:
    python training/evidence/benchmark_training.py                  # base size, CPU, 2k-token batches
    python training/evidence/benchmark_training.py --quick --json out.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from hf_weaknat import WeakNATConfig, WeakNATForConditionalGeneration
from training.data import load_or_train_tokenizer
from training.evidence import MULTI30K
from training.evidence.analyze import read_lines
from training.evidence import cpu_model

BASE_SIZES = dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                  decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048)
QUICK_SIZES = dict(d_model=64, encoder_layers=2, decoder_layers=4, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)
# name: (config overrides, label, paper Table 3 (IWSLT14 De-En): training hours, parameters in millions)
VARIANTS = {
    "plain_ctc": (dict(weak_ar_layers=0), "plain CTC", 17.3, 50.6),
    "no_tricks": (dict(weak_ar_share_parameters=False, weak_ar_layer_sample_ratio=1.0), "no tricks", 31.2, 83.8),
    "sharing": (dict(weak_ar_share_parameters=True, weak_ar_layer_sample_ratio=1.0), "sharing only", 31.0, 55.3),
    "sampling": (dict(weak_ar_share_parameters=False, weak_ar_layer_sample_ratio=0.5), "sampling only", 20.3, 83.8),
    "both": (dict(weak_ar_share_parameters=True, weak_ar_layer_sample_ratio=0.5), "both (default)", 19.4, 55.3),
}
TARGET_BOTH_RATIO = 1.10  # the project's target for "both" against plain CTC (paper: 19.4h / 17.3h = 1.12)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(MULTI30K / "train.de"), help="training sources, one per line")
    p.add_argument("--target", default=str(MULTI30K / "train.en"), help="training targets, one per line")
    p.add_argument("--tokenizer", help="tokenizer directory (default: train a joint SentencePiece on --source/--target)")
    p.add_argument("--vocab_size", type=int, default=10000, help="vocabulary of the trained tokenizer")
    p.add_argument("--max_tokens", type=int, default=2048,
                   help="batch budget, sentences x longest side (2048 keeps the default run near 10 min on 2 cores)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed steps per variant (median reported)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--weak_ar_on_encoder", action="store_true",
                   help="also attach a weak AR decoder to the encoder (the released code; 7 decoders without sharing)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--memory_steps", type=int, default=2, help="steps per CPU memory subprocess (0: skip memory)")
    p.add_argument("--memory_jobs", type=int, default=1, help="memory subprocesses at a time (--quick: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny model, small batches: a smoke test in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every number and the environment here")
    p.add_argument("--memory_child", help=argparse.SUPPRESS)  # internal: "VARIANT:BATCHES_FILE"
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly still win
        p.set_defaults(vocab_size=500, max_tokens=256, repeats=2, memory_jobs=len(VARIANTS))
        args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",")]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or "plain_ctc" not in args.variants:
        raise SystemExit(f"--variants must include plain_ctc and only names from {list(VARIANTS)}; got {args.variants}")
    return args


def training_batches(args, count: int):
    """`count` batches of real pairs, packed to `--max_tokens` (sentences x longest side), from a seeded shuffle."""
    sources, targets = read_lines(args.source), read_lines(args.target)
    tokenizer, origin = load_or_train_tokenizer(args.tokenizer, files=[args.source, args.target],
                                                vocab_size=args.vocab_size, num_threads=1,
                                                max_sentences=4000 if args.quick else 2_000_000)
    order = torch.randperm(len(sources), generator=torch.Generator().manual_seed(args.seed)).tolist()
    batches, pairs, longest = [], [], 0
    for index in order:
        source, target = sources[index], targets[index]
        length = max(len(tokenizer(source)["input_ids"]), len(tokenizer(target)["input_ids"]))
        if pairs and (len(pairs) + 1) * max(longest, length) > args.max_tokens:
            batches.append(tokenizer([s for s, _ in pairs], text_target=[t for _, t in pairs], padding=True,
                                     return_tensors="pt").data)
            pairs, longest = [], 0
            if len(batches) == count:
                break
        pairs.append((source, target))
        longest = max(longest, length)
    for batch in batches:
        batch["labels"] = batch["labels"].masked_fill(batch["labels"] == tokenizer.pad_token_id, -100)
    return batches, len(tokenizer), origin


def variant_config(args, name: str, vocab_size: int) -> WeakNATConfig:
    sizes = QUICK_SIZES if args.quick else BASE_SIZES
    overrides = dict(VARIANTS[name][0])
    if name != "plain_ctc":
        overrides["weak_ar_on_encoder"] = args.weak_ar_on_encoder
    return WeakNATConfig(vocab_size=vocab_size, dropout=args.dropout, attn_implementation="sdpa", **sizes, **overrides)


def build(args, name: str, vocab_size: int, device: str):
    torch.manual_seed(args.seed)  # the NAR part starts from the same weights in every variant
    model = WeakNATForConditionalGeneration(variant_config(args, name, vocab_size)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), weight_decay=0.01)
    return model, optimizer


def train_step(model, optimizer, batch, seed: int, step: int):
    torch.manual_seed(seed + step)  # same sampled weak AR layers for every variant that samples
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch, training_step=step).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients while the other variants step
    return loss.detach()


def count_parameters(model) -> dict:
    named = dict(model.named_parameters())  # tied weights once
    total = sum(p.numel() for p in named.values())
    weak_ar = sum(p.numel() for name, p in named.items() if name.startswith("weak_ar."))
    return {"total": total, "weak_ar": weak_ar, "export": total - weak_ar}


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_variants(args, batches, vocab_size) -> tuple[dict, dict, dict]:
    """Build every variant, warm up, then interleaved timed steps.

    Returns ({variant: {"wall": [...], "cpu": [...]}} seconds per timed step, parameters, CUDA peak bytes). CPU time
    (all threads of this process) beside wall time shows whether other jobs on the machine starved the run.
    """
    device = args.device
    models = {name: build(args, name, vocab_size, device) for name in args.variants}
    params = {name: count_parameters(model) for name, (model, _) in models.items()}
    on_device = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    for name, (model, optimizer) in models.items():
        for step in range(args.warmup):
            train_step(model, optimizer, on_device[step], args.seed, step)
    times, peaks, names = {name: {"wall": [], "cpu": []} for name in args.variants}, {}, list(args.variants)
    for repeat in range(args.repeats):
        step = args.warmup + repeat
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            train_step(*models[name], on_device[step], args.seed, step)
            synchronize(device)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
            if device == "cuda":
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
    return times, params, peaks


def memory_status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc (Linux)."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":")) / 1024


def memory_child(args):
    """Subprocess body: one variant's peak RSS after building, and after `--memory_steps` training steps."""
    name, batches_file = args.memory_child.split(":", 1)
    saved = torch.load(batches_file)
    model, optimizer = build(args, name, saved["vocab_size"], "cpu")
    built = memory_status_mb("VmRSS")  # imports + model + optimizer (its state is allocated by the first step)
    try:  # forget the peak reached while importing, so the peak below is the training steps' (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    for step in range(args.memory_steps):
        train_step(model, optimizer, saved["batches"][step], args.seed, step)
    # VmHWM, not getrusage's ru_maxrss: after fork + exec Linux starts ru_maxrss at the PARENT's resident size
    print(json.dumps({"rss_after_build_mb": built, "peak_rss_mb": memory_status_mb("VmHWM"),
                      "peak_reset_after_build": reset}))


def cpu_memory(args, batches, vocab_size) -> dict:
    """Each variant's peak RSS, measured in a fresh process; `--memory_jobs` processes at a time."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="weaknat_mem_") as tmp:
        batches_file = Path(tmp) / "batches.pt"
        torch.save({"batches": batches[:args.memory_steps], "vocab_size": vocab_size}, batches_file)
        pending, running = list(args.variants), {}
        while pending or running:
            while pending and len(running) < args.memory_jobs:
                name = pending.pop(0)
                command = [sys.executable, "-m", "training.evidence.benchmark_training",
                           "--memory_child", f"{name}:{batches_file}", "--memory_steps", str(args.memory_steps),
                           "--threads", str(args.threads), "--dropout", str(args.dropout), "--seed", str(args.seed)]
                command += ["--quick"] * args.quick + ["--weak_ar_on_encoder"] * args.weak_ar_on_encoder
                running[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            name = next(iter(running))
            stdout, stderr = running.pop(name).communicate()
            if not stdout.strip():
                raise RuntimeError(f"memory measurement of {name} failed:\n{stderr}")
            row = json.loads(stdout.strip().splitlines()[-1])
            row["training_added_mb"] = row["peak_rss_mb"] - row["rss_after_build_mb"]
            results[name] = row
    return results


def print_table(rows: dict):
    print(f"\n{'variant':<16}{'step s':>8}{'x CTC':>7}{'cpu x':>7}{'params M':>10}{'export M':>10}{'peak MB':>9}"
          f"{'+train MB':>11}   paper: {'hours':>5}{'x CTC':>7}{'params M':>10}   repeats (s)")
    fmt = lambda value, width: f"{value:>{width}.0f}" if value is not None else f"{'-':>{width}}"
    for row in rows.values():
        memory = row["memory"] or {}
        peak = memory.get("peak_rss_mb", memory.get("cuda_max_allocated_mb"))
        print(f"{row['label']:<16}{row['median_step_s']:>8.2f}{row['ratio_to_plain_ctc']:>7.2f}"
              f"{row['cpu_ratio_to_plain_ctc']:>7.2f}{row['parameters']['total'] / 1e6:>10.1f}"
              f"{row['parameters']['export'] / 1e6:>10.1f}{fmt(peak, 9)}{fmt(memory.get('training_added_mb'), 11)}"
              f"          {row['paper']['hours']:>5.1f}{row['paper']['ratio']:>7.2f}{row['paper']['params_m']:>10.1f}"
              f"   {' '.join(f'{t:.2f}' for t in row['step_times_s'])}")


def table_rows(args, times, params, memory) -> dict:
    """One row per variant: medians, ratios to plain CTC (wall and CPU time), parameters, memory, the paper's row."""
    plain = {kind: statistics.median(times["plain_ctc"][kind]) for kind in ("wall", "cpu")}
    rows = {}
    for name in args.variants:
        overrides, label, hours, params_m = VARIANTS[name]
        median, cpu_median = statistics.median(times[name]["wall"]), statistics.median(times[name]["cpu"])
        rows[name] = {"label": label, "config": overrides, "step_times_s": times[name]["wall"],
                      "step_cpu_times_s": times[name]["cpu"], "median_step_s": median,
                      "ratio_to_plain_ctc": median / plain["wall"], "median_step_cpu_s": cpu_median,
                      "cpu_ratio_to_plain_ctc": cpu_median / plain["cpu"], "parameters": params[name],
                      "memory": memory.get(name),
                      "paper": {"hours": hours, "ratio": hours / VARIANTS["plain_ctc"][2], "params_m": params_m}}
    return rows


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    started, load_at_start = time.perf_counter(), os.getloadavg()
    batches, vocab_size, tokenizer_origin = training_batches(args, args.warmup + args.repeats)
    if len(batches) < args.warmup + args.repeats:
        raise SystemExit(f"only {len(batches)} batches of {args.max_tokens} tokens in the data")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.device}, {args.threads} threads, "
          f"load average {load_at_start[0]:.2f}")
    print(f"vocabulary: {tokenizer_origin}; batches (sentences x source len -> target len): "
          + ", ".join(f"{b['input_ids'].shape[0]}x{b['input_ids'].shape[1]}->{b['labels'].shape[1]}" for b in batches))
    # memory first, in subprocesses, while this process holds no model
    memory = cpu_memory(args, batches, vocab_size) if args.device == "cpu" and args.memory_steps else {}
    times, params, cuda_peaks = time_variants(args, batches, vocab_size)
    memory.update({name: {"cuda_max_allocated_mb": peak / 2**20} for name, peak in cuda_peaks.items()})
    rows = table_rows(args, times, params, memory)
    print_table(rows)
    target = None
    if "both" in rows:
        ratio = rows["both"]["ratio_to_plain_ctc"]
        target = {"target": TARGET_BOTH_RATIO, "measured": ratio, "met": ratio <= TARGET_BOTH_RATIO}
        print(f"\ntarget: both tricks <= {TARGET_BOTH_RATIO:.2f}x plain CTC step time: measured {ratio:.2f}x -> "
              f"{'met' if target['met'] else 'NOT met'} (paper: {rows['both']['paper']['ratio']:.2f}x)")
    wall = time.perf_counter() - started
    print(f"wall time {wall:.0f}s, load average at the end {os.getloadavg()[0]:.2f}")
    report = {
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "device": args.device, "threads": args.threads,
                        "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                        "cuda_device": torch.cuda.get_device_name() if args.device == "cuda" else None,
                        "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "setup": {"sizes": QUICK_SIZES if args.quick else BASE_SIZES, "vocab_size": vocab_size,
                  "tokenizer": tokenizer_origin, "max_tokens": args.max_tokens, "dropout": args.dropout,
                  "weak_ar_on_encoder": args.weak_ar_on_encoder, "warmup": args.warmup, "repeats": args.repeats,
                  "batch_shapes": [{k: list(v.shape) for k, v in b.items()} for b in batches],
                  "step": "zero_grad + forward + backward + AdamW step; median over interleaved repeats",
                  "memory": ("one subprocess per variant: RSS after imports + model + optimizer, then peak RSS "
                             f"(VmHWM, reset after the build) over {args.memory_steps} training steps"
                             if args.device == "cpu" else "torch.cuda.max_memory_allocated over the timed steps")},
        "variants": rows, "target": target, "wall_s": wall,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
