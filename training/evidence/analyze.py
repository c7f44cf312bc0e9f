"""The paper's analyses as reusable code: repeated-token rate (Table 5) and BLEU by target length (Table 4).

Library:
    repetition_rate(hypotheses)              fraction of tokens equal to the token just before them
    bleu_by_length(hypotheses, references)   sacreBLEU on each reference-length bucket

CLI: translate a test set with any exported WeakNAT model (or any transformers seq2seq model, e.g. MarianMT), or
score existing outputs, then print sacreBLEU (with its signature), chrF, the repetition rate and BLEU per bucket:
    python training/evidence/analyze.py --model runs/export --source test.de --reference test.en [--num_beams 5]
    python training/evidence/analyze.py --model runs/onnx --onnx_file model_int8.onnx   # ONNX Runtime (CTC models)
    python training/evidence/analyze.py --hypotheses out.en --reference test.en
"""

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF

from training.evaluation import repetition_rate  # noqa: F401  (part of this module's library)
from training.evidence import MULTI30K, recorded_path

# (low, high] in reference tokens; None = no upper bound. The paper's Table 4 (WMT14) uses PAPER_BUCKETS; Multi30k
# references average ~12 tokens, so the default splits short sentences finer.
DEFAULT_BUCKETS = ((0, 10), (10, 20), (20, 30), (30, None))
PAPER_BUCKETS = ((0, 20), (20, 40), (40, 60), (60, None))


def bucket_name(low: int, high: int | None) -> str:
    return f"({low},{high}]" if high is not None else f">{low}"


def bleu_by_length(hypotheses: Sequence[str], references: Sequence[str], buckets=DEFAULT_BUCKETS,
                   length: Callable[[str], int] = lambda reference: len(reference.split()),
                   tokenize: str = "13a") -> list[dict]:
    """Corpus sacreBLEU on the sentences of each target-length bucket (paper Table 4 buckets by target length).

    A pair falls in bucket (low, high] when low < length(reference) <= high (whitespace tokens by default).
    Returns one dict per bucket: name, low, high, sentences (count) and bleu (None for an empty bucket).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    lengths, rows = [length(reference) for reference in references], []
    for low, high in buckets:
        chosen = [i for i, n in enumerate(lengths) if low < n and (high is None or n <= high)]
        bleu = None
        if chosen:
            bleu = BLEU(tokenize=tokenize).corpus_score([hypotheses[i] for i in chosen],
                                                        [[references[i] for i in chosen]]).score
        rows.append({"bucket": bucket_name(low, high), "low": low, "high": high, "sentences": len(chosen),
                     "bleu": bleu})
    return rows


def translate(model_dir, sources: list[str], num_beams: int = 1, batch_size: int = 64, device: str = "cpu",
              max_new_tokens: int = 256, onnx_file: str | None = None) -> list[str]:
    """Translate with a WeakNAT export (one forward pass, CTC greedy/beam) or any transformers seq2seq model; with
    `onnx_file`, with that graph of a directory written by `hf_weaknat.export_onnx`, run by ONNX Runtime."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_weaknat import WeakNATForConditionalGeneration  # registers the weaknat Auto classes
    from training.ar_baseline import generation_limits

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if onnx_file:
        from hf_weaknat.onnx_runtime import ORTWeakNATForConditionalGeneration

        model = ORTWeakNATForConditionalGeneration.from_pretrained(model_dir, file_name=onnx_file).to(device)
    else:
        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).to(device).eval()
    is_nar = isinstance(model, WeakNATForConditionalGeneration) or onnx_file is not None
    max_source_tokens = getattr(model.config, "max_position_embeddings", None)  # longer sources are cut
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))  # similar lengths batch with less padding
    translations = [""] * len(sources)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = tokenizer([sources[i] for i in chunk], padding=True, truncation=True, max_length=max_source_tokens,
                              return_tensors="pt").to(device)
            extra = {} if is_nar else {"max_new_tokens": min(  # 2 x source + 10 within the model's positions
                max_new_tokens, generation_limits(model, batch["input_ids"])["max_new_tokens"])}
            ids = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 num_beams=num_beams, **extra)
            for i, text in zip(chunk, tokenizer.batch_decode(ids, skip_special_tokens=True)):
                translations[i] = text.strip()
    return translations


def analyze(hypotheses: list[str], references: list[str], buckets=DEFAULT_BUCKETS, tokenize: str = "13a") -> dict:
    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    bleu_score, chrf_score = bleu.corpus_score(hypotheses, [references]), chrf.corpus_score(hypotheses, [references])
    return {"sentences": len(hypotheses), "bleu": bleu_score.score, "bleu_signature": str(bleu.get_signature()),
            "bleu_detail": str(bleu_score), "chrf": chrf_score.score, "chrf_signature": str(chrf.get_signature()),
            "repetition_rate": repetition_rate(hypotheses),
            "reference_repetition_rate": repetition_rate(references),
            "bleu_by_length": bleu_by_length(hypotheses, references, buckets, tokenize=tokenize)}


def read_lines(path, count: int | None = None) -> list[str]:
    """The lines of a UTF-8 text file without their newlines (the first `count` only, when given)."""
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for _, line in zip(range(count) if count else iter(int, 1), handle)]


def parse_buckets(text: str):
    """'10,20,30' -> ((0,10), (10,20), (20,30), (30,None))."""
    edges = [0] + [int(x) for x in text.split(",")]
    return tuple(zip(edges, edges[1:])) + ((edges[-1], None),)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported WeakNAT directory, or any seq2seq model directory with its tokenizer")
    p.add_argument("--onnx_file", help="with --model: translate with this ONNX graph of the directory (written by "
                                        "hf_weaknat.export_onnx, e.g. model.onnx or model_int8.onnx) in ONNX Runtime")
    p.add_argument("--hypotheses", help="score these translations (one per line) instead of translating")
    p.add_argument("--source", default=str(MULTI30K / "test.de"))
    p.add_argument("--reference", default=str(MULTI30K / "test.en"))
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=256, help="length limit for autoregressive models")
    p.add_argument("--device", default="cpu")
    p.add_argument("--buckets", default="10,20,30", help="reference-length bucket edges; 'paper' = 20,40,60")
    p.add_argument("--tokenize", default="13a", help="sacreBLEU tokenizer (13a, intl, zh, ...)")
    p.add_argument("--output", help="write the translations here")
    p.add_argument("--json", help="write the scores (and translations) here")
    args = p.parse_args(argv)
    if (args.model is None) == (args.hypotheses is None):
        p.error("pass exactly one of --model and --hypotheses")
    if args.onnx_file and not args.model:
        p.error("--onnx_file names a graph in the --model directory")
    references = read_lines(args.reference)
    if args.hypotheses:
        hypotheses = read_lines(args.hypotheses)
    else:
        sources = read_lines(args.source)
        if len(sources) != len(references):
            p.error(f"{len(sources)} source lines but {len(references)} reference lines")
        hypotheses = translate(args.model, sources, args.num_beams, args.batch_size, args.device, args.max_new_tokens,
                               args.onnx_file)
    if len(hypotheses) != len(references):
        p.error(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if args.output:
        Path(args.output).write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    buckets = PAPER_BUCKETS if args.buckets == "paper" else parse_buckets(args.buckets)
    report = analyze(hypotheses, references, buckets, args.tokenize)
    print(f"{report['bleu_detail']}\n  signature: {report['bleu_signature']}")
    print(f"chrF {report['chrf']:.2f}  ({report['chrf_signature']})")
    print(f"repeated tokens: {100 * report['repetition_rate']:.2f}% "
          f"(references: {100 * report['reference_repetition_rate']:.2f}%)")
    print("BLEU by reference length (whitespace tokens):")
    for row in report["bleu_by_length"]:
        score = f"{row['bleu']:.2f}" if row["bleu"] is not None else "-"
        print(f"  {row['bucket']:>9}  {row['sentences']:>6} sentences  BLEU {score}")
    if args.json:
        source = ({"model": args.model, "onnx_file": args.onnx_file, "num_beams": args.num_beams} if args.model
                  else {"hypotheses": args.hypotheses})
        Path(args.json).write_text(json.dumps({**source, "reference": recorded_path(args.reference), **report,
                                               "translations": hypotheses}, indent=2, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
