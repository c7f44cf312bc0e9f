"""Joint SentencePiece vocabulary for WeakNAT, served as a `tokenizers`-backed fast tokenizer.

Training needs `sentencepiece` and `protobuf` (imported lazily); a saved tokenizer is plain
`tokenizer.json` + `tokenizer_config.json`, so loading it with `AutoTokenizer` needs neither.
The CTC blank gets a fixed id at training time, so models can rely on `BLANK_ID` across vocabularies.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace

from tokenizers import processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BLANK_TOKEN = "<blank>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID, BLANK_ID = 0, 1, 2, 3, 4
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
# Kept next to tokenizer.json for parity checks. Deliberately not `tokenizer.model`/`spiece.model`:
# AutoTokenizer never looks at this name, so the directory always loads from tokenizer.json.
SENTENCEPIECE_FILENAME = "sentencepiece.model"
_SUPPORTED_MODEL_TYPES = ("unigram", "bpe")  # the only SPM types SpmConverter can convert
# The class name of a tokenizer.json-backed tokenizer that transformers 4.x and 5.x both load (5.x: an alias of the
# `TokenizersBackend` it saves by default, a name 4.x does not know)
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
PORTABLE_MODEL_INPUT_NAMES = ("input_ids", "attention_mask")


def _iter_lines(texts: Iterable[str] | str | None, files: list[str | Path] | None) -> Iterator[str]:
    """Yield the raw lines of `texts`, then of each of `files` (blank lines are dropped later)."""
    if isinstance(texts, str):  # a bare string would otherwise be iterated character by character
        texts = [texts]
    for text in texts or []:
        yield from str(text).splitlines()
    for path in files or []:
        with open(path, encoding="utf-8") as handle:
            yield from handle


def _sample_lines(lines: Iterable[str], max_sentences: int, seed: int) -> list[str]:
    """Seeded reservoir sample of at most `max_sentences` non-blank lines, shuffled.

    Done here rather than by SentencePiece because its own sampler (sentencepiece 0.2.x) ignores
    `set_random_generator_seed` and picks a different sample in every process.
    """
    rng = random.Random(seed)
    sample: list[str] = []
    for seen, line in enumerate(line for line in (raw.strip() for raw in lines) if line):
        if len(sample) < max_sentences:
            sample.append(line)
        elif (slot := rng.randrange(seen + 1)) < max_sentences:
            sample[slot] = line
    rng.shuffle(sample)
    return sample


def train_weaknat_tokenizer(
    texts: Iterable[str] | None = None,
    *,
    files: list[str | Path] | None = None,
    vocab_size: int = 40000,
    model_type: str = "unigram",
    max_sentences: int = 2_000_000,
    model_max_length: int = 512,
    seed: int = 0,
    save_directory: str | Path | None = None,
    num_threads: int = 16,
) -> PreTrainedTokenizerFast:
    """Train one joint SentencePiece vocabulary on both sides of a parallel corpus.

    Pass source and target lines together via `texts` and/or `files` (e.g. `train.de`, `train.en`).
    Special ids are fixed: `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3, `<blank>`=4 (CTC blank, special).
    Encoding appends `</s>` (`$A </s>`, pair `$A </s> $B </s>`). A seeded sample of at most
    `max_sentences` non-blank lines, shuffled, is used. The vocabulary is a function of the data,
    `seed` and `num_threads` (SentencePiece splits its work by thread count, not by CPU count), so
    keep `num_threads` fixed to reproduce a vocabulary. With `save_directory`, the tokenizer is saved
    there with the raw SentencePiece model as `sentencepiece.model` (reference only).
    """
    if texts is None and not files:
        raise ValueError("No training text given: pass `texts` and/or `files`.")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {_SUPPORTED_MODEL_TYPES}, got {model_type!r}.")
    if vocab_size <= BLANK_ID + 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no room beyond the {BLANK_ID + 1} special tokens.")
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be positive, got {max_sentences}.")
    sentences = _sample_lines(_iter_lines(texts, files), max_sentences, seed)
    if not sentences:
        raise ValueError("Training text is empty (no non-blank lines).")

    backend = _train_sentencepiece(sentences, vocab_size, model_type, num_threads, save_directory)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, EOS_ID)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN, extra_special_tokens=[BLANK_TOKEN], model_max_length=model_max_length,
        padding_side="right",
    )
    blank_token_id(tokenizer)  # fail loudly here rather than in a model if the blank went missing
    if save_directory is not None:
        tokenizer.save_pretrained(save_directory)
    return tokenizer


def _train_sentencepiece(sentences: list[str], vocab_size: int, model_type: str, num_threads: int,
                         save_directory: str | Path | None):
    """Train SentencePiece with the fixed special ids and return it as a `tokenizers` backend.

    SentencePiece's opaque size errors become ValueErrors that say what to change. With `save_directory`, the raw
    model is kept there as `sentencepiece.model`.
    """
    import sentencepiece as spm  # build-time only dependency
    from transformers.convert_slow_tokenizer import SpmConverter  # needs protobuf

    with tempfile.TemporaryDirectory(prefix="weaknat_spm_") as tmp:
        model_prefix = str(Path(tmp) / "spm")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), input_sentence_size=0,  # use all: sampled above
                model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
                character_coverage=1.0, byte_fallback=False,  # SpmConverter cannot express byte fallback
                pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
                pad_piece=PAD_TOKEN, bos_piece=BOS_TOKEN, eos_piece=EOS_TOKEN, unk_piece=UNK_TOKEN,
                control_symbols=[BLANK_TOKEN],  # the first free id after the four above: 4
                num_threads=num_threads, minloglevel=2,
            )
        except RuntimeError as error:  # SentencePiece reports bad sizes as opaque INTERNAL errors
            message = str(error)
            too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", message)
            if too_high:
                raise ValueError(f"vocab_size={too_high[1]} is too large for this text; "
                                 f"the maximum allowed is {too_high[2]}.") from error
            too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
            if too_small:
                raise ValueError(f"vocab_size={too_small[1]} is too small for this text; it needs at least "
                                 f"{too_small[2]} (all characters plus special tokens).") from error
            raise
        model_file = model_prefix + ".model"
        backend = SpmConverter(SimpleNamespace(vocab_file=model_file, add_prefix_space=True, legacy=False)).converted()
        if save_directory is not None:
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_file, Path(save_directory) / SENTENCEPIECE_FILENAME)
    return backend


def make_tokenizer_config_portable(directory: str | Path) -> None:
    """Rewrite the `tokenizer_config.json` that transformers 5.x saved in `directory` so that 4.x (>= 4.57) loads it
    too, with the same class behaviour, special tokens and ids (all of them live in `tokenizer.json`, which both read).

    5.x writes `tokenizer_class: "TokenizersBackend"` and the extra special tokens (`<blank>`) as a list under
    `extra_special_tokens`; 4.x knows neither (it reads `extra_special_tokens` as a dict of named tokens). The file
    gets `"PreTrainedTokenizerFast"` and `additional_special_tokens`, which 5.x reads as its extra special tokens,
    `model_input_names` when unset (5.x's default, `input_ids` and `attention_mask`: 4.x's would add `token_type_ids`,
    which the model does not take), and loses 5.x's record of how it was loaded (`is_local`, `local_files_only`).
    Another class name is kept as it is.
    """
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        known = list(config.get("additional_special_tokens") or [])
        config["additional_special_tokens"] = known + [token for token in extra if token not in known]
    config.setdefault("model_input_names", list(PORTABLE_MODEL_INPUT_NAMES))
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def blank_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Return the id of the CTC blank token `<blank>` in `tokenizer`."""
    # Not convert_tokens_to_ids alone: for a missing token it quietly returns the <unk> id.
    token_id = tokenizer.get_vocab().get(BLANK_TOKEN)
    if token_id is None:
        raise ValueError(f"Tokenizer has no {BLANK_TOKEN!r} token; train it with train_weaknat_tokenizer().")
    return token_id
