"""Half-precision inference against float32: does a WeakNAT export translate the same in bfloat16 and float16?

    python training/evidence/half_precision.py --json docs/results/half_precision_cpu.json

Loads the model once per dtype with `WeakNATForConditionalGeneration.from_pretrained(model, dtype=...)` (the network
runs in that dtype; the decoding math, i.e. the output logits, log-softmax, CTC prefix beam scores and the length
log-probabilities, runs in float32), translates the test set greedy and with beam search, and reports per dtype and
mode: sacreBLEU and chrF against the references, the fraction of sentences whose output token ids equal float32's,
the median and largest difference of the beam scores (`sequences_scores`) on the sentences whose best hypothesis is
the same (a prefix beam's score counts only the alignments through prefixes the beam kept, so a tiny change in the
log-probabilities can drop one and move a score by far more than the log-probabilities moved), and the wall time (batches of `--batch_size` sentences sorted by length, one process; float16 matmuls on a CPU
without native float16 are slow, so its time says nothing about a GPU).
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

from hf_weaknat import WeakNATForConditionalGeneration
from training.evidence import REPOSITORY, cpu_model, recorded_path
from training.evidence.analyze import analyze, read_lines

TEST = REPOSITORY / "training" / "corpora" / "multi30k_distilled"  # test2016 with the human references
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def translate_ids(model, tokenizer, sources: list[str], num_beams: int = 1, batch_size: int = 64):
    """Translate `sources` -> (token id lists without padding, beam scores (None for greedy), seconds).

    Batches of similar lengths (sorted by characters); `sequences_scores` of beam search are the CTC prefix
    log-probabilities of the best hypotheses."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    ids, scores = [None] * len(sources), [None] * len(sources)
    device = model.device
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(order), batch_size):
            chunk = order[first:first + batch_size]
            batch = tokenizer([sources[i] for i in chunk], padding=True, truncation=True,
                              max_length=model.config.max_position_embeddings, return_tensors="pt").to(device)
            out = model.generate(**batch, num_beams=num_beams, return_dict_in_generate=True,
                                 output_scores=num_beams > 1)
            for row, i in enumerate(chunk):
                tokens = out.sequences[row]
                ids[i] = tokens[tokens != tokenizer.pad_token_id].tolist()
                if num_beams > 1:
                    scores[i] = float(out.sequences_scores[row])
    return ids, (scores if num_beams > 1 else None), time.perf_counter() - start


def compare(reference: dict, other: dict) -> dict:
    """How `other`'s translations differ from `reference`'s (same sentences, same mode)."""
    same = [a == b for a, b in zip(reference["ids"], other["ids"])]
    result = {"sentences_equal": sum(same), "fraction_equal": sum(same) / len(same)}
    if reference["scores"] is not None:
        gaps = [abs(a - b) for a, b, s in zip(reference["scores"], other["scores"], same) if s]
        result["beam_score_abs_difference_where_equal"] = (
            {"median": statistics.median(gaps), "max": max(gaps)} if gaps else None)
    return result


def measure(model_dir, sources, references, dtypes, num_beams, batch_size) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    runs = {}
    for name in dtypes:
        model = WeakNATForConditionalGeneration.from_pretrained(model_dir, dtype=DTYPES[name]).eval()
        for mode, beams in (("greedy", 1), (f"beam{num_beams}", num_beams)):
            ids, scores, seconds = translate_ids(model, tokenizer, sources, beams, batch_size)
            texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
            report = analyze(texts, references)
            runs[(name, mode)] = {"ids": ids, "scores": scores}
            row = {"bleu": report["bleu"], "chrf": report["chrf"], "seconds": round(seconds, 2),
                   "parameter_dtype": str(model.dtype)}
            if ("float32", mode) in runs and name != "float32":
                row.update(compare(runs[("float32", mode)], runs[(name, mode)]))
                row["bleu_minus_float32"] = row["bleu"] - runs[("float32", mode)]["bleu"]
            runs[(name, mode)]["bleu"] = report["bleu"]
            runs[(name, mode)]["row"] = row
            print(f"{name:>9} {mode:>7}: BLEU {row['bleu']:.2f}, chrF {row['chrf']:.2f}, {seconds:.1f} s"
                  + (f", equal to float32 on {row['sentences_equal']}/{len(sources)} sentences "
                     f"(BLEU {row['bleu_minus_float32']:+.2f})" if "sentences_equal" in row else ""), flush=True)
    results = {}
    for (name, mode), run in runs.items():
        results.setdefault(name, {})[mode] = run["row"]
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPOSITORY / "models" / "weaknat-multi30k-de-en"))
    p.add_argument("--source", default=str(TEST / "test.de"))
    p.add_argument("--reference", default=str(TEST / "test.en"))
    p.add_argument("--dtypes", default="float32,bfloat16,float16",
                   help="comma-separated, float32 first (the others are compared with it)")
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--limit", type=int, help="only the first N sentences")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    dtypes = args.dtypes.split(",")
    if dtypes[0] != "float32" or any(d not in DTYPES for d in dtypes):
        p.error(f"--dtypes must start with float32 and name only {', '.join(DTYPES)}")
    if args.num_beams < 2:
        p.error("--num_beams must be at least 2 (greedy is always measured)")
    sources, references = read_lines(args.source, args.limit), read_lines(args.reference, args.limit)
    if len(sources) != len(references):
        p.error(f"{len(sources)} source lines but {len(references)} reference lines")
    results = measure(args.model, sources, references, dtypes, args.num_beams, args.batch_size)
    if args.json:
        record = {
            "model": recorded_path(args.model), "source": recorded_path(args.source),
            "reference": recorded_path(args.reference), "sentences": len(sources),
            "load": "WeakNATForConditionalGeneration.from_pretrained(model, dtype=torch.<dtype>)",
            "device": "cpu", "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
            "batch_size": args.batch_size, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
