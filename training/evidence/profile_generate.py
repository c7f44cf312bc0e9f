"""Where one `generate()` call's time goes: argument handling, the encoder, the upsampler and decoder, the output
head, the decoding, transformers' output; and how many operators the pass dispatches (what bounds batch 1 on a GPU).

    python training/evidence/profile_generate.py --model base --batch_size 1                # paper base size, random
    python training/evidence/profile_generate.py --model models/weaknat-multi30k-de-en --device cuda

Each stage is timed by wrapping its function (on CUDA with a synchronisation before and after, which removes the
overlap of host and device work: the stages then add up to the synchronous time, not the call's own, which is
printed beside them). Sources: random ids of 8-24 tokens, one of them 24. `--json` writes every number.
"""

import argparse
import collections
import contextlib
import functools
import json
import time
from pathlib import Path
from unittest import mock

import torch

import hf_weaknat.ctc_generation as ctc_generation
import hf_weaknat.generation as generation
import hf_weaknat.modeling_weaknat as modeling
from hf_weaknat import WeakNATConfig, WeakNATForConditionalGeneration

SIZES = {"tiny": dict(vocab_size=64, d_model=16, heads=2, ffn=64),  # no arithmetic to speak of: overhead alone
         "base": dict(vocab_size=10000, d_model=512, heads=8, ffn=2048)}


def build_model(name: str, device: str):
    if name in SIZES:
        size = SIZES[name]
        config = WeakNATConfig(vocab_size=size["vocab_size"], d_model=size["d_model"], encoder_layers=6,
                               decoder_layers=6, encoder_attention_heads=size["heads"],
                               decoder_attention_heads=size["heads"], encoder_ffn_dim=size["ffn"],
                               decoder_ffn_dim=size["ffn"], weak_ar_layers=0, attn_implementation="sdpa")
        return WeakNATForConditionalGeneration(config).eval().to(device)
    return WeakNATForConditionalGeneration.from_pretrained(name, attn_implementation="sdpa").eval().to(device)


def random_batch(vocab_size: int, batch_size: int, device: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 25, (batch_size,), generator=generator)
    lengths[0] = 24
    ids = torch.randint(5, vocab_size, (batch_size, 24), generator=generator)
    mask = (torch.arange(24) < lengths[:, None]).long()
    return {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)}


@contextlib.contextmanager
def stage_timers(model, device: str):
    """Within the block, the stages of `generate` add their seconds to the dict yielded; restored after."""
    seconds = collections.defaultdict(float)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            sync()
            start = time.perf_counter()
            result = function(*args, **kwargs)
            sync()
            seconds[name] += time.perf_counter() - start
            return result
        return wrapper

    stages = [(modeling, "prepare_generation", "arguments (prepare_generation)"),
              (generation.GenerationMixin, "_prepare_generation_config", "  of which transformers' config merge"),
              (model.model, "encode", "encoder"), (model.model, "forward", "upsampler + decoder"),
              (model, "decoding_logits", "output head"), (ctc_generation, "ctc_decode", "decoding"),
              (ctc_generation, "finish_generation", "output (finish_generation)")]
    with contextlib.ExitStack() as stack:
        for owner, attribute, name in stages:
            stack.enter_context(mock.patch.object(owner, attribute, timed(name, getattr(owner, attribute))))
        yield seconds


def operator_count(model, batch) -> int:
    """Operators one call dispatches (torch.profiler's CPU-side events), the per-call launch cost on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        model.generate(**batch)
    return sum(event.count for event in profiler.key_averages() if event.key.startswith("aten::"))


@torch.inference_mode()
def measure(model, batch, device: str, calls: int) -> dict:
    for _ in range(3):
        model.generate(**batch)
    operators = operator_count(model, batch)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        model.generate(**batch)
    sync()
    plain = (time.perf_counter() - start) / calls
    with stage_timers(model, device) as seconds:
        for _ in range(calls):
            model.generate(**batch)
    stages = {name: value / calls * 1000 for name, value in seconds.items()}
    return {"ms_per_call": plain * 1000, "stages_ms": stages, "aten_operators_per_call": operators}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base", help="tiny, base (random weights, 6+6 layers) or a model folder")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, args.device)
    batch = random_batch(model.config.vocab_size, args.batch_size, args.device)
    result = {"model": args.model, "batch_size": args.batch_size, "device": args.device,
              "torch_threads": torch.get_num_threads(), **measure(model, batch, args.device, args.calls)}
    print(f"{args.model}, batch {args.batch_size}, {args.device}: {result['ms_per_call']:.2f} ms per call, "
          f"{result['aten_operators_per_call']} aten operators per call")
    for name, ms in result["stages_ms"].items():
        print(f"  {name:38s} {ms:8.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
