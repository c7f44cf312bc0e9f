"""Tests for the joint SentencePiece -> fast tokenizer route (CPU, offline)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hf_weaknat.tokenization_weaknat import (
    BLANK_ID,
    BLANK_TOKEN,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    blank_token_id,
    train_weaknat_tokenizer,
)

DATA_DIR = Path(__file__).resolve().parents[1] / "training/corpora/multi30k"
N_TRAIN_LINES = 3000
VOCAB_SIZE = 1000


def read_lines(name: str, limit: int | None = None) -> list[str]:
    return (DATA_DIR / name).read_text(encoding="utf-8").splitlines()[:limit]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train once per module; returns (in-memory tokenizer, save directory)."""
    save_dir = tmp_path_factory.mktemp("weaknat_tok")
    texts = read_lines("train.de", N_TRAIN_LINES) + read_lines("train.en", N_TRAIN_LINES)
    tok = train_weaknat_tokenizer(texts, vocab_size=VOCAB_SIZE, save_directory=save_dir)
    return tok, save_dir


@pytest.fixture(scope="module")
def heldout_lines():
    return read_lines("valid.de") + read_lines("valid.en")


def test_special_ids_are_fixed_and_blank_is_special(trained):
    tok, _ = trained
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID)
    assert tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<unk>", BLANK_TOKEN]) == [0, 1, 2, 3, 4]
    assert blank_token_id(tok) == BLANK_ID == 4
    assert BLANK_TOKEN in tok.all_special_tokens
    assert len(tok) == VOCAB_SIZE  # <blank> is part of the SentencePiece vocab, not appended after it
    word_ids = tok("Ein Hund", add_special_tokens=False)["input_ids"]
    with_blanks = [BLANK_ID, word_ids[0], BLANK_ID, BLANK_ID, *word_ids[1:], BLANK_ID, EOS_ID, PAD_ID]
    assert tok.decode(with_blanks, skip_special_tokens=True) == "Ein Hund"
    assert BLANK_TOKEN in tok.decode(with_blanks)


def test_encoding_appends_eos_and_text_target_gives_labels(trained):
    tok, _ = trained
    src, tgt = "Ein Hund rennt.", "A dog runs."
    out = tok(src, text_target=tgt)
    assert out["input_ids"][-1] == EOS_ID and out["labels"][-1] == EOS_ID
    assert out["labels"] == tok(tgt)["input_ids"]
    pair = tok(src, tgt)["input_ids"]
    assert pair == tok(src)["input_ids"] + tok(tgt)["input_ids"]  # $A </s> $B </s>
    assert BOS_ID not in pair


def test_saved_directory_loads_offline_with_same_ids(trained, heldout_lines, monkeypatch):
    tok, save_dir = trained
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoTokenizer.from_pretrained(save_dir)
    assert loaded.is_fast
    assert blank_token_id(loaded) == BLANK_ID and BLANK_TOKEN in loaded.all_special_tokens
    sample = heldout_lines[:300]
    assert loaded(sample)["input_ids"] == tok(sample)["input_ids"]
    assert loaded.model_max_length == 512 and loaded.padding_side == "right"


def test_ids_equal_sentencepiece_on_heldout_lines(trained, heldout_lines):
    # Exact id equality on every held-out line (2028, de+en). Compare ids, not strings: the pieces
    # differ only in how <unk> is rendered ("⁇" vs "<unk>"), and the ids are what the model sees.
    # Known, deliberate difference not exercised here: a literal "</s>" or "<blank>" typed in the text
    # is matched as that special token by the fast tokenizer, while SentencePiece spells it out.
    spm = pytest.importorskip("sentencepiece")
    tok, save_dir = trained
    sp = spm.SentencePieceProcessor(model_file=str(save_dir / "sentencepiece.model"))
    assert sp.get_piece_size() == len(tok) and sp.piece_to_id(BLANK_TOKEN) == BLANK_ID
    lines = heldout_lines + ["  extra   spaces  ", "Unbekannt: 中文 ½ ﬁ ①", "Tab\tin text"]
    expected = [sp.encode(line) + [EOS_ID] for line in lines]
    actual = tok(lines)["input_ids"]
    mismatches = [line for line, a, e in zip(lines, actual, expected) if a != e]
    assert mismatches == []
    assert any(UNK_ID in ids for ids in expected)  # the sample really exercises <unk>


def test_loads_without_sentencepiece_or_protobuf(trained):
    _, save_dir = trained
    # `None` in sys.modules is how a missing package looks to both `import` (ImportError) and
    # transformers' availability probe (find_spec -> None); a finder that raises would crash the probe.
    script = textwrap.dedent(
        f"""
        import sys
        for name in ("sentencepiece", "google.protobuf"):
            sys.modules[name] = None
        from transformers import AutoTokenizer
        from transformers.utils import is_protobuf_available, is_sentencepiece_available
        assert not is_sentencepiece_available() and not is_protobuf_available()
        tok = AutoTokenizer.from_pretrained({str(save_dir)!r})
        ids = tok("Ein Mann schläft.")["input_ids"]
        assert ids[-1] == 2 and tok.convert_tokens_to_ids("<blank>") == 4
        print(type(tok).__name__, ids)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("TokenizersBackend [")


def test_decode_round_trips_lines_the_normalizer_leaves_unchanged(trained, heldout_lines):
    spm = pytest.importorskip("sentencepiece")
    tok, save_dir = trained
    sp = spm.SentencePieceProcessor(model_file=str(save_dir / "sentencepiece.model"))
    # nmt_nfkc rewrites e.g. a no-break space to a plain space; such lines can't round-trip by design.
    unchanged = [line for line in heldout_lines if sp.normalize(line).replace("▁", " ").strip() == line]
    assert len(unchanged) > 0.95 * len(heldout_lines)
    decoded = tok.batch_decode(tok(unchanged)["input_ids"], skip_special_tokens=True)
    assert [d for d, line in zip(decoded, unchanged) if d != line] == []


def test_batch_pads_right_with_pad_id_and_attention_mask(trained):
    tok, _ = trained
    batch = tok(["a b", "c d e f"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    short_len = int(mask[0].sum())
    assert ids.shape == mask.shape and ids.shape[0] == 2 and short_len < ids.shape[1]
    assert ids[0, short_len - 1].item() == EOS_ID
    assert (ids[0, short_len:] == PAD_ID).all() and (mask[0, short_len:] == 0).all()
    assert (mask[0, :short_len] == 1).all() and (mask[1] == 1).all()


def test_training_is_reproducible_across_processes_and_uses_the_seed():
    # Checked across processes because that is where SentencePiece's own sampler was not
    # reproducible. max_sentences < number of lines, so the seeded subsampling is exercised.
    texts = read_lines("train.en", 2000)
    kwargs = dict(vocab_size=500, max_sentences=1500)
    module_path = Path(__file__).resolve().parents[1] / "hf_weaknat/tokenization_weaknat.py"
    # Load the module file directly: the package __init__ imports torch and the model (slow).
    script = textwrap.dedent(
        f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("tokenization_weaknat", {str(module_path)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        texts = open({str(DATA_DIR / "train.en")!r}, encoding="utf-8").read().splitlines()[:2000]
        tok = module.train_weaknat_tokenizer(texts, seed=7, **{kwargs!r})
        print(tok.backend_tokenizer.to_str(), end="")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    seed_7 = train_weaknat_tokenizer(texts, seed=7, **kwargs).backend_tokenizer.to_str()
    seed_8 = train_weaknat_tokenizer(texts, seed=8, **kwargs).backend_tokenizer.to_str()
    assert run.stdout == seed_7
    assert seed_8 != seed_7


def test_training_from_files_matches_training_from_lines(tmp_path):
    files, lines = [], []
    for name in ("train.de", "train.en"):
        side = read_lines(name, N_TRAIN_LINES)
        (tmp_path / name).write_text("\n".join(side) + "\n", encoding="utf-8")
        files.append(tmp_path / name)
        lines += side
    from_files = train_weaknat_tokenizer(files=files, vocab_size=VOCAB_SIZE)
    from_lines = train_weaknat_tokenizer(lines, vocab_size=VOCAB_SIZE)
    assert from_files.get_vocab() == from_lines.get_vocab()


@pytest.mark.parametrize("texts", [[], ["", "   "], ""])
def test_empty_text_raises_clear_value_error(texts):
    with pytest.raises(ValueError, match="empty"):
        train_weaknat_tokenizer(texts, vocab_size=100)


def test_no_text_raises_clear_value_error():
    with pytest.raises(ValueError, match="No training text"):
        train_weaknat_tokenizer(vocab_size=100)


def test_absurd_vocab_size_raises_clear_value_error():
    texts = read_lines("train.en", 200)
    with pytest.raises(ValueError, match=r"too large.*maximum allowed is \d+"):
        train_weaknat_tokenizer(texts, vocab_size=10_000_000)
    with pytest.raises(ValueError, match=r"too small.*at least \d+"):
        train_weaknat_tokenizer(texts, vocab_size=20)
    with pytest.raises(ValueError, match="special tokens"):
        train_weaknat_tokenizer(texts, vocab_size=0)


def test_blank_token_id_rejects_tokenizer_without_blank(trained):
    from tokenizers import Tokenizer, models

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    with pytest.raises(ValueError, match="<blank>"):
        blank_token_id(plain)
