"""Sequence-level knowledge distillation: translate a training set's sources with an AR teacher.

    accelerate launch training/distill.py --teacher runs/multi30k_ar/export --dataset training/corpora/multi30k \
        --source_lang de --target_lang en --output_dir data/multi30k_distilled --keep_splits valid,test
    accelerate launch training/train.py training/configs/multi30k_de_en.yaml \
        --dataset data/multi30k_distilled --distilled true

The teacher is any seq2seq checkpoint, local or on the Hub, with its tokenizer (e.g. `train.py --model_type marian`'s
export, or a Helsinki-NLP opus-mt model). Sources are cut into shards of `--shard_size` sentences; the processes take
shards in turn, translate each one in length-sorted batches of at most `--max_tokens` source tokens with beam search,
and write it atomically. A rerun (after a crash or a kill) skips the shards already written: the work is resumable by
shard. Shards are the same whatever the number of processes, and so is the output. At the end, the main process joins
the shards into `<train_split>.<src>` + `<train_split>.<tgt>`, the two-file layout train.py reads, and copies the
`--keep_splits` (validation/test) with their ORIGINAL references, since models are scored against human translations.
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, HfArgumentParser

import hf_weaknat  # noqa: F401  (registers the weaknat Auto classes: a WeakNAT can be a teacher too)
from training.ar_baseline import generation_limits
from training.batching import pack_by_tokens
from training.data import load_split

SHARD_DIR = "shards"


@dataclass
class DistillArguments:
    teacher: str = field(metadata={"help": "Seq2seq teacher: a local directory or a Hub id (with its tokenizer)."})
    output_dir: str = field(metadata={"help": "Where the distilled corpus (two-file layout) is written."})
    dataset: str = field(default="training/corpora/multi30k", metadata={"help": "Hub id or local directory."})
    dataset_config: str | None = None
    dataset_revision: str | None = None
    dataset_data_dir: str | None = None
    source_lang: str = "de"
    target_lang: str = "en"
    train_split: str = "train"
    keep_splits: str = field(default="", metadata={
        "help": "Comma-separated splits copied with their original references (e.g. valid,test)."})
    max_samples: int | None = field(default=None, metadata={"help": "Distil only the first N training pairs."})
    num_beams: int = 5
    max_tokens: int = field(default=4096, metadata={"help": "Padded source tokens per batch."})
    max_source_tokens: int = field(default=256, metadata={
        "help": "Longer sources are cut (and counted); at most the teacher's max_position_embeddings."})
    max_new_tokens_ratio: float = field(default=2.0, metadata={"help": "Output limit: ratio x source + 10."})
    shard_size: int = field(default=2000, metadata={"help": "Sentences per shard (the unit of resumption)."})
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16 (GPU)."})
    engine: str = field(default="transformers", metadata={
        "help": "transformers (the teacher's `generate`) or ctranslate2 (the teacher converted by CTranslate2's own "
                "converter; several times faster on CPU, needs `pip install ctranslate2`)."})


def shard_ranges(num_sentences: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, num_sentences)) for start in range(0, num_sentences, shard_size)]


def shard_path(output_dir: Path, index: int) -> Path:
    return output_dir / SHARD_DIR / f"shard-{index:05d}.jsonl"


def done_shards(output_dir: Path, num_shards: int) -> set[int]:
    return {i for i in range(num_shards) if shard_path(output_dir, i).is_file()}


def write_atomically(path: Path, text: str):
    """Write `path` through a temporary file and a rename: a killed run never leaves a half shard behind."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def source_limit(model, max_source_tokens: int) -> int:
    """Source tokens the teacher takes: `max_source_tokens`, or fewer if its position table is shorter."""
    return min(max_source_tokens, getattr(model.config, "max_position_embeddings", None) or max_source_tokens)


class CTranslate2Teacher:
    """The teacher as a CTranslate2 model (a Marian-layout MarianMTModel converts as is), decoding like `generate`:
    the same beam size and output limit (ratio x source + 10, within the positions). Its beam search breaks near-ties
    slightly differently, so a few percent of sentences may differ from transformers' output."""

    def __init__(self, teacher: str, converted: Path, device: str):
        import ctranslate2
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(teacher)
        self.translator = ctranslate2.Translator(str(converted), device="cuda" if device.startswith("cuda") else "cpu",
                                                 intra_threads=torch.get_num_threads())

    @staticmethod
    def convert(teacher: str, converted: Path):
        from ctranslate2.converters import TransformersConverter

        if not (converted / "model.bin").is_file():
            TransformersConverter(teacher).convert(str(converted), force=True)

    def translate(self, tokenizer, rows: list[list[int]], args: DistillArguments) -> list[str]:
        limit = min(int(args.max_new_tokens_ratio * max(len(r) for r in rows)) + 10,
                    self.config.max_position_embeddings - 1)
        # transformers' limit counts the end token it forces at the limit; CTranslate2's does not
        results = self.translator.translate_batch([tokenizer.convert_ids_to_tokens(r) for r in rows],
                                                  beam_size=args.num_beams, max_decoding_length=limit - 1)
        return [tokenizer.decode(tokenizer.convert_tokens_to_ids(r.hypotheses[0]), skip_special_tokens=True)
                for r in results]


@torch.inference_mode()
def translate(model, tokenizer, sources: list[str], args: DistillArguments, device) -> tuple[list[str], list[bool]]:
    """Translations of `sources` in their order, and for each whether its source was cut to `max_source_tokens`."""
    limit = source_limit(model, args.max_source_tokens)
    encoded = tokenizer(sources, truncation=False)["input_ids"]
    cut = [len(ids) > limit for ids in encoded]
    encoded = [ids[:limit - 1] + ids[-1:] if len(ids) > limit else ids for ids in encoded]  # keep the final </s>
    lengths = [len(ids) for ids in encoded]
    order = sorted(range(len(sources)), key=lengths.__getitem__)  # little padding, deterministic
    translations = [""] * len(sources)
    for batch in pack_by_tokens(order, lengths, args.max_tokens):
        if isinstance(model, CTranslate2Teacher):
            texts = model.translate(tokenizer, [encoded[i] for i in batch], args)
        else:
            padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(device)
            ids = model.generate(**padded, num_beams=args.num_beams,
                                 **generation_limits(model, padded["input_ids"], args.max_new_tokens_ratio))
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        for i, text in zip(batch, texts):
            translations[i] = text.strip()
    return translations, cut


def write_two_files(path_prefix: Path, source_lang: str, target_lang: str, pairs):
    """`<prefix>.<src>` + `<prefix>.<tgt>`, line-aligned, each written atomically."""
    pairs = list(pairs)
    for lang, column in ((source_lang, 0), (target_lang, 1)):
        write_atomically(path_prefix.with_name(f"{path_prefix.name}.{lang}"),
                         "".join(pair[column].replace("\n", " ") + "\n" for pair in pairs))


def join_shards(output_dir: Path, args: DistillArguments, num_shards: int) -> dict:
    """Concatenate the shards, in order, into the training split; return counts for the record."""
    rows = []
    for index in range(num_shards):
        with open(shard_path(output_dir, index), encoding="utf-8") as handle:
            rows += [json.loads(line) for line in handle]
    write_two_files(output_dir / args.train_split, args.source_lang, args.target_lang,
                    ((row["source"], row["translation"]) for row in rows))
    return {"pairs": len(rows), "empty_translations": sum(not row["translation"] for row in rows),
            "sources_cut": sum(row["cut"] for row in rows)}


def copy_kept_splits(output_dir: Path, args: DistillArguments, options: dict) -> list[str]:
    copied = []
    for split in filter(None, (s.strip() for s in args.keep_splits.split(","))):
        data = load_split(args.dataset, split, **options)
        if data is None:
            raise FileNotFoundError(f"No {split!r} split in {args.dataset} to keep")
        write_two_files(output_dir / split, args.source_lang, args.target_lang, zip(data["source"], data["target"]))
        copied.append(split)
    return copied


def main(argv: list[str] | None = None) -> Path:
    (args,) = HfArgumentParser(DistillArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        (output_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    options = dict(source_lang=args.source_lang, target_lang=args.target_lang, config=args.dataset_config,
                   revision=args.dataset_revision, data_dir=args.dataset_data_dir)
    train = load_split(args.dataset, args.train_split, **options)
    if train is None:
        raise FileNotFoundError(f"No {args.train_split!r} split in {args.dataset}")
    if args.max_samples:
        train = train.select(range(min(args.max_samples, len(train))))
    sources = list(train["source"])
    shards = shard_ranges(len(sources), args.shard_size)
    setup_file = output_dir / "distillation_setup.json"
    setup = {"teacher": args.teacher, "dataset": args.dataset, "dataset_config": args.dataset_config,
             "split": args.train_split, "direction": f"{args.source_lang}-{args.target_lang}", "num_beams":
             args.num_beams, "max_source_tokens": args.max_source_tokens, "sentences": len(sources),
             "shard_size": args.shard_size, "engine": args.engine}
    if setup_file.is_file() and json.loads(setup_file.read_text()) != setup:
        raise ValueError(f"{output_dir} holds shards of another distillation ({setup_file}): choose another "
                         "--output_dir, or delete it to start over")
    accelerator.wait_for_everyone()  # every process compared the old setup before the main one writes it
    if accelerator.is_main_process:
        write_atomically(setup_file, json.dumps(setup, indent=2))

    done = done_shards(output_dir, len(shards))
    mine = [i for i in range(len(shards)) if i % accelerator.num_processes == accelerator.process_index
            and i not in done]
    accelerator.print(f"{len(sources)} sentences in {len(shards)} shards: {len(done)} already done, "
                      f"{len(shards) - len(done)} to translate on {accelerator.num_processes} process(es)")
    if args.engine not in ("transformers", "ctranslate2"):
        raise ValueError(f"--engine must be transformers or ctranslate2, got {args.engine!r}")
    converted = output_dir / "ctranslate2_teacher"
    if args.engine == "ctranslate2" and len(done) < len(shards) and accelerator.is_main_process:
        CTranslate2Teacher.convert(args.teacher, converted)
    accelerator.wait_for_everyone()
    if mine:
        tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        model = (CTranslate2Teacher(args.teacher, converted, str(accelerator.device)) if args.engine == "ctranslate2"
                 else AutoModelForSeq2SeqLM.from_pretrained(args.teacher).to(accelerator.device).eval())
    # the bar counts this process's sentences (every process gets about the same share)
    bar = tqdm(total=sum(len(shards[i]) for i in mine), desc="distil", unit="sent", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    started = time.time()
    for index in mine:
        shard_sources = [sources[i] for i in shards[index]]
        with accelerator.autocast():
            translations, cut = translate(model, tokenizer, shard_sources, args, accelerator.device)
        lines = [json.dumps({"source": s, "translation": t, "cut": c}, ensure_ascii=False)
                 for s, t, c in zip(shard_sources, translations, cut)]
        write_atomically(shard_path(output_dir, index), "".join(line + "\n" for line in lines))
        bar.update(len(shard_sources))
        bar.set_postfix(sent_s=f"{bar.n / max(time.time() - started, 1e-9):.1f}")
    bar.close()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        missing = set(range(len(shards))) - done_shards(output_dir, len(shards))
        if missing:
            raise RuntimeError(f"Shards {sorted(missing)} were not written; rerun to translate them")
        counts = join_shards(output_dir, args, len(shards))
        kept = copy_kept_splits(output_dir, args, options)
        record = {**setup, **counts, "kept_splits": kept, "arguments": asdict(args)}
        write_atomically(output_dir / "distillation.json", json.dumps(record, indent=2))
        accelerator.print(f"Wrote {counts['pairs']} distilled pairs to {output_dir / args.train_split}."
                          f"{{{args.source_lang},{args.target_lang}}} ({counts['empty_translations']} empty, "
                          f"{counts['sources_cut']} sources cut to fit the teacher)"
                          + (f"; kept {', '.join(kept)} with original references" if kept else ""))
    accelerator.wait_for_everyone()
    return output_dir


if __name__ == "__main__":
    main()
