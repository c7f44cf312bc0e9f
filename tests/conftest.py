"""Shared fixtures: tiny configs, a small SentencePiece tokenizer and a tiny model that memorised a few real pairs."""

import os
from pathlib import Path

import pytest

# Defaults set before torch and huggingface_hub are imported, since both read them once, at import
if "HF_HUB_OFFLINE" not in os.environ:  # tests never touch the network
    os.environ["HF_HUB_OFFLINE"] = "1"
if "OMP_NUM_THREADS" not in os.environ:  # tiny models gain nothing from a second thread, and OpenMP thread teams
    os.environ["OMP_NUM_THREADS"] = "1"  # stall badly on cores busy with other jobs

import torch

from hf_weaknat import WeakNATConfig, WeakNATForConditionalGeneration, train_weaknat_tokenizer

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
REPO = Path(__file__).resolve().parents[1]
MULTI30K = REPO / "training" / "corpora" / "multi30k"


def tiny_config(**overrides) -> WeakNATConfig:
    sizes = dict(vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=4, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=24)
    return WeakNATConfig(**{**sizes, **overrides})


def read_lines(name: str, count: int) -> list[str]:
    with open(MULTI30K / name, encoding="utf-8") as handle:
        return [next(handle).strip() for _ in range(count)]


def pad_batch(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def count(module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def batch_of(rows, targets=None):
    """A right-padded batch from token id rows (pad 0), with labels padded with -100."""
    ids = pad_batch(rows, 0)
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    if targets is not None:
        batch["labels"] = pad_batch(targets, -100)
    return batch


@pytest.fixture(scope="session")
def tokenizer():
    return train_weaknat_tokenizer(read_lines("train.de", 3000) + read_lines("train.en", 3000), vocab_size=400,
                                   num_threads=1)


@pytest.fixture(scope="session")
def memorized(tokenizer):
    """A tiny weak-AR + glancing model trained until it reproduces five real de->en pairs (model, sources, targets)."""
    de, en = read_lines("train.de", 200), read_lines("train.en", 200)
    pairs = sorted(zip(de, en), key=lambda p: len(p[0]))[:5]  # the shortest pairs keep the test fast
    sources, targets = [p[0] for p in pairs], [p[1] for p in pairs]
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128,
                         dropout=0.0, glancing=True, glancing_anneal_steps=150)
    model = WeakNATForConditionalGeneration(config)
    batch = tokenizer(sources, text_target=targets, padding=True, return_tensors="pt")
    labels = batch["labels"].masked_fill(batch["labels"] == tokenizer.pad_token_id, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(400):
        loss = model(batch["input_ids"], batch["attention_mask"], labels=labels, training_step=step).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 150 and step % 25 == 0 and generates(model, tokenizer, sources) == targets:
            break
    model.eval()
    return model, sources, targets


def generates(model, tokenizer, sources) -> list[str]:
    was_training = model.training
    model.eval()
    batch = tokenizer(sources, padding=True, return_tensors="pt")
    texts = tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True)
    model.train(was_training)
    return texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A small vocabulary for the runs that do not test tokenizer training (it saves them a few seconds)."""
    directory = tmp_path_factory.mktemp("tokenizer")
    lines = [line for name in ("train.de", "train.en") for line in
             (MULTI30K / name).read_text(encoding="utf-8").splitlines()[:400]]
    train_weaknat_tokenizer(lines, vocab_size=300, num_threads=2, save_directory=directory)
    return directory


def record_weak_ar_memories(model):
    """What the weak AR decoders read: the key/value input of each weak AR decoder call's (first) cross-attention.

    Returns (seen, handles); remove the handles when done. With shared parameters the partners of one step run as
    one batch, so one call holds `partners * batch` rows.
    """
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["key_value_states"] if "key_value_states" in kwargs else args[1])

    cross_attentions = [module for name, module in model.named_modules()
                        if name.startswith("weak_ar.") and name.endswith(".layers.0.cross_attn.sublayer")]
    return seen, [m.register_forward_pre_hook(hook, with_kwargs=True) for m in cross_attentions]


@pytest.fixture(scope="session")
def random_export(tmp_path_factory, tokenizer_dir):
    """A tiny random-weight export with its tokenizer (read only: copy it to change it). Its translations are
    nonsense, but each sentence's is its own and reproducible."""
    from transformers import AutoTokenizer

    from hf_weaknat import export_for_hub

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(vocab_size=len(tokenizer), max_position_embeddings=32))
    return export_for_hub(model, tmp_path_factory.mktemp("random_export") / "export", tokenizer=tokenizer)
