"""Parallel data through `datasets`: Hub ids or local files, one direction, tokenized with a cached batched map.

Every split comes out with two string columns, `source` and `target`, whatever the input layout:
- a Hub id (`wmt/wmt14` + config `de-en`, `wmt/wmt16` + `ro-en`, ...) with a `translation` column of
  `{lang: text}` dicts; the direction is picked by `source_lang`/`target_lang`;
- a local directory holding, per split, `<split>.<src>` + `<split>.<tgt>` (one sentence per line, aligned),
  or `<split>.jsonl` / `<split>.parquet` with a `translation` column, or `<split>.tsv` whose header names the
  two languages.
Training pairs that cannot train (empty source, source too long, target unable to fit the CTC frames or the vanilla
decoder's positions, a vanilla length offset outside the length classifier's range, and with `invalid_utf8="skip"` a
line of a two-file corpus that is not UTF-8) are dropped and counted, each under its own label.
Data that cannot be read raises a DataError naming the file, the line or row, and what is wrong.
"""

import csv
import inspect
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Features, IterableDataset, Value, load_dataset
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher
from transformers import AutoTokenizer

from hf_weaknat import train_weaknat_tokenizer
from hf_weaknat.ctc import ctc_min_frames

# Reasons a training pair is left out (stored per example in the `fit` column), and their labels in the data report
# (`data_stats.json`, the log line, the model card)
FITS, SOURCE_TOO_LONG, TARGET_DOES_NOT_FIT, EMPTY_SOURCE, INVALID_UTF8, LENGTH_OFFSET_OUT_OF_RANGE = 0, 1, 2, 3, 4, 5
REASONS = {FITS: "kept", SOURCE_TOO_LONG: "source_too_long", TARGET_DOES_NOT_FIT: "target_does_not_fit",
           EMPTY_SOURCE: "empty_source", INVALID_UTF8: "invalid_utf8",
           LENGTH_OFFSET_OUT_OF_RANGE: "length_offset_out_of_range"}
TEXT_PAIR = Features({"source": Value("string"), "target": Value("string")})
FILE_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "tsv": "csv"}


class DataError(ValueError):
    """Data that cannot be read as pairs: the message names the file, the line or row, and what is wrong."""


def load_split(path: str, split: str, source_lang: str, target_lang: str, *, config: str | None = None,
               revision: str | None = None, data_dir: str | None = None, streaming: bool = False,
               invalid_utf8: str = "error"):
    """One split as a Dataset (or IterableDataset when streaming) with `source` and `target` columns.

    Returns None when a local directory has no file for the split (e.g. a corpus without a test set).
    `invalid_utf8="skip"`: a line of a two-file corpus that is not UTF-8 makes its pair `(None, None)`, which
    tokenization marks INVALID_UTF8 (counted, left out of training) instead of raising a DataError.
    """
    if Path(path).is_dir():
        found = _load_local_split(Path(path), split, source_lang, target_lang, streaming, invalid_utf8)
        if found is None:
            return None
        raw, where = found
    else:  # a Hub id; `revision`/`data_dir` reach e.g. the parquet export of script-based datasets (README)
        raw = load_dataset(path, config, split=split, revision=revision, data_dir=data_dir, streaming=streaming)
        where = f"{path} ({f'config {config}, ' if config else ''}split {split})"
    if "source" in raw.column_names:
        return raw
    if "translation" not in raw.column_names:
        raise DataError(f"{where} has no 'translation' column (columns: {', '.join(raw.column_names)}): each row "
                        f"needs {{\"translation\": {{\"{source_lang}\": ..., \"{target_lang}\": ...}}}}")
    return raw.map(_pick_direction, fn_kwargs={"source_lang": source_lang, "target_lang": target_lang, "where": where},
                   batched=True, with_indices=True, remove_columns=raw.column_names)


def _pick_direction(batch, indices, source_lang, target_lang, where):
    """The two languages of each row's `translation`; a row without one of them is a DataError naming it."""
    sources, targets = [], []
    for index, pair in zip(indices, batch["translation"]):
        for lang, texts in ((source_lang, sources), (target_lang, targets)):
            text = pair.get(lang) if isinstance(pair, dict) else None
            if not isinstance(text, str):  # an absent field: the JSON/Parquet reader fills it with null
                shown = repr(pair) if len(repr(pair)) <= 200 else repr(pair)[:200] + "..."
                raise DataError(f"{where}: row {index + 1} has no {lang!r} text in its translation ({shown}); "
                                "--source_lang and --target_lang name the two fields every row must have")
            texts.append(text)
    return {"source": sources, "target": targets}


def _load_local_split(directory: Path, split: str, source_lang: str, target_lang: str, streaming: bool,
                      invalid_utf8: str = "error"):
    """(dataset, the file it comes from) for a split of a local corpus, or None when it has no file for the split."""
    source_file, target_file = directory / f"{split}.{source_lang}", directory / f"{split}.{target_lang}"
    if source_file.is_file() and target_file.is_file():
        generate = IterableDataset.from_generator if streaming else Dataset.from_generator
        # datasets caches generated data by its arguments: the files' size and mtime make an edited file a new entry
        # (a string: list arguments would be taken as shards)
        stamp = " ".join(f"{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in (source_file, target_file))
        try:
            return generate(read_two_files, features=TEXT_PAIR, gen_kwargs={
                "source_file": str(source_file), "target_file": str(target_file), "stamp": stamp,
                "invalid_utf8": invalid_utf8}), f"{source_file} + {target_file}"
        except DatasetGenerationError as error:  # datasets wraps what the generator raised: show ours alone
            if isinstance(error.__cause__, DataError):
                raise error.__cause__ from None
            raise
    for extension, builder in FILE_BUILDERS.items():
        data_file = directory / f"{split}.{extension}"
        if not data_file.is_file():
            continue
        if extension == "tsv":  # QUOTE_NONE and no NA parsing: quotes and words like "null" stay text
            raw = load_dataset("csv", data_files={split: str(data_file)}, split=split, delimiter="\t",
                               quoting=csv.QUOTE_NONE, keep_default_na=False, streaming=streaming)
            missing = [lang for lang in (source_lang, target_lang) if lang not in raw.column_names]
            if missing:
                raise DataError(f"{data_file}: its header names no {' and no '.join(map(repr, missing))} column "
                                f"(header: {', '.join(raw.column_names)})")
            return raw.rename_columns({source_lang: "source", target_lang: "target"}).select_columns(
                ["source", "target"]), str(data_file)
        return load_dataset(builder, data_files={split: str(data_file)}, split=split, streaming=streaming), str(
            data_file)
    return None


def read_two_files(source_file: str, target_file: str, stamp: str = "", invalid_utf8: str = "error"):
    """Yield aligned pairs from two line-aligned text files; a length mismatch is an error, not a silent cut.

    Lines end at "\n" (a "\r\n" ending is removed whole). A line that is not UTF-8 raises a DataError naming the
    file and line, or with `invalid_utf8="skip"` yields the pair as `(None, None)`, counted later as invalid_utf8.
    """
    with open(source_file, "rb") as sources, open(target_file, "rb") as targets:
        for number, (source, target) in enumerate(itertools.zip_longest(sources, targets), start=1):
            if source is None or target is None:
                raise DataError(f"{source_file} has {count_lines(source_file)} lines but {target_file} has "
                                f"{count_lines(target_file)}: the two files of a split must be aligned line by line")
            texts = [decode_line(line, path, number, invalid_utf8)
                     for line, path in ((source, source_file), (target, target_file))]
            if None in texts:
                yield {"source": None, "target": None}
            else:
                yield {"source": texts[0], "target": texts[1]}


def decode_line(line: bytes, path: str, number: int, invalid_utf8: str = "error") -> str | None:
    """One line of a text file without its ending; None for an invalid UTF-8 line when `invalid_utf8="skip"`."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        if invalid_utf8 == "skip":
            return None
        raise DataError(f"{path}: line {number} is not valid UTF-8 (byte 0x{line[error.start]:02x} at position "
                        f"{error.start + 1} of the line: {error.reason}); fix the file, or pass --invalid_utf8 skip "
                        "to leave such pairs out of training (counted as invalid_utf8)") from None
    text = text[:-1] if text.endswith("\n") else text
    return text[:-1] if text.endswith("\r") else text


def count_lines(path: str) -> int:
    """Lines as read_two_files counts them (a last line without "\n" counts too)."""
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def tokenize_pairs(dataset, tokenizer, upsample_ratio: int | None, max_source_tokens: int,
                   for_evaluation: bool = False, max_length_offset: int | None = None):
    """Add `input_ids`, `labels`, `length` (the batching cost: longer side) and `fit` (FITS or the reason the pair
    cannot train) with a batched map.

    The map is cached by `datasets` (fingerprint of data + tokenizer + arguments), so a rerun skips it.
    Training sets drop the text columns; evaluation sets keep them (references) and truncate sources to the
    model's positions instead of marking them, so every sentence gets a translation. `upsample_ratio` and
    `max_length_offset` select the fit rule (`fit_reason`).
    """
    kwargs = {}
    if isinstance(dataset, Dataset):  # a stream is tokenized lazily and never cached
        kwargs = {"desc": "Tokenizing", "new_fingerprint": Hasher.hash([
            # datasets hashes an importable function by its name, not its code: without the source, an edited
            # data.py would silently reuse the old cache
            dataset._fingerprint, inspect.getsource(_tokenize_batch), inspect.getsource(fit_reason), tokenizer,
            upsample_ratio, max_source_tokens, for_evaluation, max_length_offset])}
    return dataset.map(_tokenize_batch, batched=True, remove_columns=None if for_evaluation else ["source", "target"],
                       fn_kwargs={"tokenizer": tokenizer, "upsample_ratio": upsample_ratio,
                                  "max_source_tokens": max_source_tokens, "truncate": for_evaluation,
                                  "max_length_offset": max_length_offset}, **kwargs)


def _tokenize_batch(batch, tokenizer, upsample_ratio, max_source_tokens, truncate, max_length_offset=None):
    source_limit = {"truncation": True, "max_length": max_source_tokens} if truncate else {}
    target_limit = {"truncation": True, "max_length": (upsample_ratio or 1) * max_source_tokens} if truncate else {}
    unreadable = [s is None or t is None for s, t in zip(batch["source"], batch["target"])]  # invalid_utf8="skip"
    sources = tokenizer([s or "" for s in batch["source"]], **source_limit)["input_ids"]
    targets = tokenizer([t or "" for t in batch["target"]], **target_limit)["input_ids"]
    fit = [INVALID_UTF8 if bad else EMPTY_SOURCE if not text.strip() else fit_reason(s, t, upsample_ratio,
                                                                                      max_source_tokens,
                                                                                      max_length_offset)
           for bad, text, s, t in zip(unreadable, batch["source"], sources, targets)]
    return {"input_ids": sources, "labels": targets, "length": [max(len(s), len(t)) for s, t in zip(sources, targets)],
            "fit": fit}


def fit_reason(source_ids: list[int], target_ids: list[int], upsample_ratio: int | None,
               max_source_tokens: int, max_length_offset: int | None = None) -> int:
    """Why a pair cannot train, or FITS.

    CTC emits a target of n tokens with r adjacent repeats only if it has at least n + r frames (a blank must
    separate repeats), and the model has `upsample_ratio` frames per source token. `upsample_ratio=None` is a model
    with one decoder position per target token, `max_source_tokens` of them: the Marian baseline, or with
    `max_length_offset` a vanilla NAR, whose length classifier also needs `|tgt_len - src_len| <= max_length_offset`
    (LENGTH_OFFSET_OUT_OF_RANGE otherwise).
    """
    if len(source_ids) > max_source_tokens:
        return SOURCE_TOO_LONG
    if upsample_ratio is None:
        if len(target_ids) > max_source_tokens:
            return TARGET_DOES_NOT_FIT
        if max_length_offset is not None and abs(len(target_ids) - len(source_ids)) > max_length_offset:
            return LENGTH_OFFSET_OUT_OF_RANGE
        return FITS
    needed = ctc_min_frames(torch.tensor([target_ids]), torch.tensor([len(target_ids)])).item()
    if needed > upsample_ratio * len(source_ids):
        return TARGET_DOES_NOT_FIT
    return FITS


def drop_unfit_pairs(dataset: Dataset) -> tuple[Dataset, dict[str, int]]:
    """Filter a tokenized map-style dataset to the trainable pairs; return it with the counts of each reason."""
    counts = np.bincount(np.asarray(dataset["fit"], dtype=np.int64), minlength=len(REASONS))
    kept = dataset.filter(lambda fit: [f == FITS for f in fit], input_columns="fit", batched=True,
                          desc="Dropping unfit pairs")
    return kept, {label: int(counts[reason]) for reason, label in REASONS.items()}


class StreamFilterCounts:
    """Drops unfit pairs from a stream and counts them as they go by (a stream has no length to count upfront)."""

    def __init__(self):
        self.counts = dict.fromkeys(REASONS.values(), 0)

    def keep(self, fit: int) -> bool:
        self.counts[REASONS[fit]] += 1
        return fit == FITS

    def apply(self, stream: IterableDataset) -> IterableDataset:
        return stream.filter(self.keep, input_columns="fit")


def training_texts(dataset, max_stream_pairs: int = 1_000_000):
    """Yield the source and target lines that train the joint vocabulary (the tokenizer samples from them).

    All pairs of a map-style dataset (big corpora are often ordered by sub-corpus, so a head would be biased);
    the first `max_stream_pairs` of a stream, which cannot be read twice cheaply.
    """
    rows = dataset.iter(batch_size=1000) if isinstance(dataset, Dataset) else dataset.take(max_stream_pairs).iter(1000)
    for batch in rows:  # a pair left unread by invalid_utf8="skip" is (None, None)
        yield from (text for text in batch["source"] if text is not None)
        yield from (text for text in batch["target"] if text is not None)


def load_or_train_tokenizer(name: str | None, texts=None, *, files=None, vocab_size: int, save_directory=None,
                            **options):
    """(tokenizer, where it came from): `name` (a saved tokenizer or a Hub id) if given, else a joint SentencePiece
    trained on `texts` and/or `files` (`options`: train_weaknat_tokenizer's). Saved to `save_directory` either way."""
    if name:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if save_directory:
            tokenizer.save_pretrained(save_directory)
        return tokenizer, f"loaded from {name}"
    started = time.perf_counter()
    tokenizer = train_weaknat_tokenizer(texts, files=files, vocab_size=vocab_size, save_directory=save_directory,
                                        **options)
    lines = f" (at most {options['max_sentences']} lines)" if "max_sentences" in options else ""
    trained_on = " + ".join(Path(f).name for f in files) if files else "the training data"
    return tokenizer, (f"joint unigram SentencePiece, {vocab_size} pieces, trained on {trained_on}{lines} in "
                       f"{time.perf_counter() - started:.1f}s")


# ----------------------------------------------------------------------------------------------------------------
# From the run's arguments (arguments.DataArguments) and model config to the datasets train.py uses


def load_training_split(data_args):
    """The training split named by DataArguments (cut to `max_train_samples` when set)."""
    train = load_split(data_args.dataset, data_args.train_split, streaming=data_args.streaming,
                       **_split_options(data_args))
    if train is None:
        raise FileNotFoundError(f"No {data_args.train_split!r} split in {data_args.dataset}")
    if data_args.max_train_samples:
        train = train.take(data_args.max_train_samples) if data_args.streaming else train.select(
            range(min(data_args.max_train_samples, len(train))))
    return train


def load_evaluation_splits(data_args) -> dict:
    """Validation and test splits by name (never streamed: they are small); a local corpus may lack a test split.

    `max_eval_samples` caps only the validation split (run every `eval_steps`); the test split, whose score goes
    into the model card, is always scored in full.
    """
    splits = {}
    for name in (data_args.validation_split, data_args.test_split):
        split = load_split(data_args.dataset, name, **_split_options(data_args)) if name else None
        if split is not None:
            if data_args.invalid_utf8 == "skip":  # unreadable pairs have no reference to score against
                readable = split.filter(lambda s, t: [a is not None and b is not None for a, b in zip(s, t)],
                                        input_columns=["source", "target"], batched=True)
                if len(readable) < len(split):
                    print(f"Warning: {len(split) - len(readable)} pairs of the {name!r} split are not valid UTF-8 "
                          "and are left out of its scores (--invalid_utf8 skip)")
                split = readable
            cap = data_args.max_eval_samples if name == data_args.validation_split else None
            splits[name] = split.select(range(min(cap or len(split), len(split))))
    return splits


def _split_options(data_args) -> dict:
    return dict(source_lang=data_args.source_lang, target_lang=data_args.target_lang, config=data_args.dataset_config,
                revision=data_args.dataset_revision, data_dir=data_args.dataset_data_dir,
                invalid_utf8=data_args.invalid_utf8)


def tokenize_evaluation_splits(accelerator, splits: dict, tokenizer, config) -> dict:
    """`config`: the model's (a WeakNATConfig, or the Marian baseline's MarianConfig)."""
    with accelerator.main_process_first():  # the main process fills the map cache, the others read it
        return {name: tokenize_pairs(split, tokenizer, frames_per_token(config), config.max_position_embeddings,
                                     for_evaluation=True, max_length_offset=length_offset_range(config))
                for name, split in splits.items()}


def frames_per_token(config) -> int | None:
    """CTC frames per source token, or None for the autoregressive baseline and the vanilla NAR (no frames to fit:
    one decoder position per target token)."""
    return config.upsample_ratio if config.model_type == "weaknat" and config.nar_type == "ctc" else None


def length_offset_range(config) -> int | None:
    """The vanilla NAR's largest |tgt_len - src_len| its length classifier can name, else None."""
    return config.max_length_offset if config.model_type == "weaknat" and config.nar_type == "vanilla" else None


def tokenize_training_split(accelerator, train, tokenizer, config):
    """Tokenize, then drop (and count) pairs that are too long or whose target cannot fit the CTC frames."""
    limit = config.max_position_embeddings
    with accelerator.main_process_first():
        train = tokenize_pairs(train, tokenizer, frames_per_token(config), limit,
                               max_length_offset=length_offset_range(config))
    if not isinstance(train, Dataset):
        stream_counts = StreamFilterCounts()
        return stream_counts.apply(train), stream_counts.counts  # the counts fill up as the stream is read
    train, counts = drop_unfit_pairs(train)
    target_reason = (f"whose target cannot fit {config.upsample_ratio} frames per source token"
                     if frames_per_token(config) else f"with a target over {limit} tokens")
    if counts["kept"] == 0:  # before training starts, not as an empty epoch that never ends
        left_out = ", ".join(f"{n} {label}" for label, n in counts.items() if label != "kept" and n)
        raise DataError(f"No trainable pair left after filtering the {sum(counts.values())} training pairs "
                        f"({left_out or 'the split is empty'}). Check the data (and its languages), or raise "
                        f"max_position_embeddings / upsample_ratio if the pairs are too long for the model")
    also = "".join(f", {counts[label]} {what}" for label, what in (
        ("length_offset_out_of_range", f"whose length offset is beyond +-{length_offset_range(config)}"),
        ("empty_source", "with an empty source"), ("invalid_utf8", "with a line that is not valid UTF-8"))
        if counts[label])
    accelerator.print(f"Training pairs: {counts['kept']} kept; left out: {counts['source_too_long']} with a source "
                      f"over {limit} tokens, {counts['target_does_not_fit']} {target_reason}{also}")
    return train, counts
