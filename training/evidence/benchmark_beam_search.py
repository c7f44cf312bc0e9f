"""Milliseconds per sentence of the CTC prefix beam searches (hf_weaknat/ctc.py), the numbers behind
`ctc.choose_beam_search_backend`.

    python training/evidence/benchmark_beam_search.py                 # random log-probs and the shipped model
    python training/evidence/benchmark_beam_search.py --old HEAD~1    # also the batched search of a git revision
    python training/evidence/benchmark_beam_search.py --device cuda   # log-probs on a GPU (the Python search: CPU)

Searches, all with beam 5 and 10 candidate tokens per frame (the generate default, 2 * num_beams):
  batched      ctc_prefix_beam_search on the log-probs' device (the CPU here)
  pruned_cpu   ctc_prefix_beam_search_pruned on CPU logits: one top-k, then the plain-Python search
  pruned_copy  the same as on an accelerator (copy_table=True): one top-k and a table of the candidates' log probs
               (`prune`, the device's part, with the copy), then the plain-Python search over them (`search`)
  batched_pruned_vocab  the batched search over a vocabulary the size of the pruned table (1 + frames * 10): what a
               vectorised torch search over the pruned frames on the CPU would cost
  old          the batched search of --old's hf_weaknat/ctc.py
  greedy       ctc_greedy_decode on the same log-probs, for scale
Random log-probs are peaky like a trained CTC model's (blank-dominated frames); the shipped model's are its
test2016 frames. Each number is the best of 5 interleaved rounds; the machine's load average is printed with them.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hf_weaknat.ctc import (  # noqa: E402
    _pruned_search_one,
    ctc_greedy_decode,
    ctc_prefix_beam_search,
    ctc_prefix_beam_search_pruned,
    pruned_frames_to_cpu,
)

BEAM, CANDIDATES = 5, 10


def old_search(revision):
    source = subprocess.run(["git", "show", f"{revision}:hf_weaknat/ctc.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "ctc_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ctc_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ctc_prefix_beam_search


def best_ms(runs: dict, rounds=5, min_seconds=0.2, device="cpu") -> dict:
    """Best milliseconds per call of each function; the rounds interleave the functions, so that a machine whose
    load changes (shared cores) slows them alike. On a GPU each call ends with a synchronisation."""
    if torch.device(device).type == "cuda":
        runs = {name: (lambda fn=fn: (fn(), torch.cuda.synchronize())) for name, fn in runs.items()}
    for fn in runs.values():
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, fn in runs.items():
            start, n = time.perf_counter(), 0
            while n == 0 or time.perf_counter() - start < min_seconds:
                fn()
                n += 1
            best[name] = min(best[name], (time.perf_counter() - start) / n)
    return {name: 1000 * seconds for name, seconds in best.items()}


def python_search_only(log_probs, lengths, blank):
    cand, lp_cand, columns, table, n = pruned_frames_to_cpu(log_probs, lengths, blank, CANDIDATES)
    rows = list(zip(cand.tolist(), lp_cand.double().tolist(), columns.tolist(), table.double().numpy(), n.tolist()))
    return lambda: [_pruned_search_one(*row, BEAM) for row in rows]


def time_searches(log_probs, lengths, blank, old, device="cpu"):
    log_probs, lengths = log_probs.to(device), lengths.to(device)
    batch, frames, _ = log_probs.shape
    pruned_vocab = torch.randn(batch, frames, 1 + frames * CANDIDATES).log_softmax(-1)
    runs = {
        "batched": lambda: ctc_prefix_beam_search(log_probs, lengths, blank, 0, BEAM, CANDIDATES),
        "pruned_cpu": lambda: ctc_prefix_beam_search_pruned(log_probs, lengths, blank, 0, BEAM, CANDIDATES),
        "pruned_copy": lambda: ctc_prefix_beam_search_pruned(log_probs, lengths, blank, 0, BEAM, CANDIDATES,
                                                             copy_table=True),
        "prune": lambda: pruned_frames_to_cpu(log_probs, lengths, blank, CANDIDATES),
        "search": python_search_only(log_probs, lengths, blank),
        "batched_pruned_vocab": lambda: ctc_prefix_beam_search(pruned_vocab, lengths, 0, 0, BEAM, CANDIDATES),
    }
    if old is not None:
        runs["old"] = lambda: old(log_probs, lengths, blank, 0, BEAM, CANDIDATES)
    mask = torch.arange(frames, device=device) < lengths[:, None]
    runs["greedy"] = lambda: ctc_greedy_decode(log_probs, mask, blank, 0)
    return {name: ms / batch for name, ms in best_ms(runs, device=device).items()}


def print_row(label, row):
    load = os.getloadavg()[0]
    print(f"{label:<28} " + "  ".join(f"{k} {v:6.2f}" for k, v in row.items()) + f"   (load {load:.1f})",
          flush=True)


def random_log_probs(batch, frames, vocab, blank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, frames, vocab, generator=gen)
    logits[:, :, blank] += 6 * torch.rand(batch, frames, generator=gen)  # blank-dominated frames, as after training
    lengths = torch.randint(frames * 2 // 3, frames + 1, (batch,), generator=gen)
    lengths[0] = frames
    return logits.log_softmax(-1), lengths


def shipped_log_probs(sentences, batch):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    directory = REPO / "models" / "weaknat-multi30k-de-en"
    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)
    out = []
    for i in range(0, len(sentences), batch):
        source = tokenizer(sentences[i:i + batch], padding=True, return_tensors="pt")
        with torch.no_grad():
            output = model(**source)
        lengths = model.frame_mask(source["attention_mask"]).sum(1)
        out.append((output.logits.float().log_softmax(-1), lengths))
    return out, model.config.blank_token_id


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", help="a git revision whose batched search to time too")
    parser.add_argument("--vocab", type=int, nargs="+", default=[10000, 40000])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--sentences", type=int, default=64, help="shipped model: test2016 sentences per batch size")
    parser.add_argument("--device", default="cpu", help="where the log-probs are (the searches run there)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    old = old_search(args.old) if args.old else None
    print(f"ms per sentence, beam {BEAM}, {CANDIDATES} candidates, {torch.get_num_threads()} thread(s), {args.device}")
    for vocab in args.vocab:
        for batch in args.batch:
            log_probs, lengths = random_log_probs(batch, args.frames, vocab, blank=4)
            row = time_searches(log_probs, lengths, 4, old, args.device)
            print_row(f"random V={vocab} T={args.frames} B={batch}", row)
    sentences = (REPO / "training" / "corpora" / "multi30k_distilled" / "test.de").read_text().splitlines()
    for batch in args.batch:
        chunks, blank = shipped_log_probs(sentences[: max(batch, args.sentences)], batch)
        chunk, lengths = chunks[0]
        label = f"shipped V={chunk.shape[2]} T={chunk.shape[1]} B={batch}"
        print_row(label, time_searches(chunk, lengths, blank, old, args.device))


if __name__ == "__main__":
    main()
