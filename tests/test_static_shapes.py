"""The static-shape path of `generate` (sources padded to bucketed lengths, the one pass compiled) and the per-call
overhead removed around it: padding never changes a translation, the compiled pass gives eager's tokens without
recompiling inside a bucket, the switch is transformers' own (`cache_implementation="static"`, `compile_config`,
`disable_compile`), and the remembered generation config follows every change to the model's.
"""

import math
import shutil

import pytest
import torch
from conftest import pad_batch, tiny_config
from transformers import CompileConfig, GenerationConfig
from transformers.testing_utils import CaptureLogger

from hf_weaknat import WeakNATForConditionalGeneration
from hf_weaknat import static_shapes
from hf_weaknat.static_shapes import bucket_length, pad_to_bucket

# Rows of 9-12 tokens (each ending in </s>): all in the bucket of 12 under max_position_embeddings=24
ROWS_A = [[7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 2], [18, 19, 20, 21, 22, 23, 24, 25, 2]]
ROWS_B = [[30, 31, 32, 33, 34, 35, 36, 37, 38, 2], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 2]]


def batch_of(rows):
    ids = pad_batch(rows, 0)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.fixture(scope="module")
def model():
    """Untrained, so every frame is uncertain and any change to a valid frame's logits would show in the argmax."""
    torch.manual_seed(0)
    return WeakNATForConditionalGeneration(tiny_config(weak_ar_layers=0, decoder_layers=2)).eval()


def spy_on_one_pass(monkeypatch):
    """Record the source width of every (eager) static pass."""
    widths, real = [], static_shapes.one_pass

    def spy(model, input_ids, *args):
        widths.append(input_ids.shape[1])
        return real(model, input_ids, *args)

    monkeypatch.setattr(static_shapes, "one_pass", spy)
    return widths


def test_buckets_hold_every_length_with_at_most_half_padding_and_are_few():
    limit = 1024
    buckets = [bucket_length(n, limit) for n in range(1, limit + 1)]
    assert all(n <= b <= limit for n, b in zip(range(1, limit + 1), buckets))
    assert all(b <= max(8, 1.5 * n) for n, b in zip(range(1, limit + 1), buckets))
    assert len(set(buckets)) <= 2 * math.log2(limit / 8) + 2
    assert bucket_length(30, 24) == 24 and bucket_length(20, 24) == 24  # capped at max_position_embeddings
    ids, mask = pad_to_bucket(torch.tensor([[5, 6, 2]]), torch.tensor([[1, 1, 1]]), 0, 24)
    assert ids.tolist() == [[5, 6, 2, 0, 0, 0, 0, 0]] and mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]


def test_padding_a_source_changes_neither_its_translation_nor_its_frame_logits(model):
    """Eager: a sentence alone, in a padded batch beside a longer one, and padded to its bucket."""
    row = ROWS_A[1]
    alone = batch_of([row])
    in_batch = batch_of([ROWS_A[0], row])
    bucketed = dict(zip(("input_ids", "attention_mask"), pad_to_bucket(alone["input_ids"], alone["attention_mask"],
                                                                      0, model.config.max_position_embeddings)))
    assert bucketed["input_ids"].shape[1] == 12 > len(row)
    frames = model.config.upsample_ratio * len(row)
    reference = model.generate(**alone)[0]
    beside_longer = model.generate(**in_batch)[1]
    assert torch.equal(beside_longer[: len(reference)], reference) and (beside_longer[len(reference):] == 0).all()
    assert torch.equal(model.generate(**bucketed)[0], reference)
    with torch.no_grad():
        logits = model(**alone).logits
        assert torch.allclose(model(**in_batch).logits[1:, :frames], logits, atol=1e-5)
        assert torch.allclose(model(**bucketed).logits[:, :frames], logits, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"suppress_tokens": [7, 20]},
                                     {"num_beams": 3, "num_return_sequences": 2, "output_scores": True},
                                     {"output_scores": True, "output_logits": True}],
                         ids=["greedy", "suppressed", "beam", "scores"])
def test_static_shapes_give_the_eager_output(model, monkeypatch, options):
    """`cache_implementation="static"` on CPU without `_compile_all_devices`: the bucketed pass, run eagerly (as
    transformers uses a static cache there without compiling)."""
    widths = spy_on_one_pass(monkeypatch)
    batch = batch_of(ROWS_A)
    eager = model.generate(**batch, return_dict_in_generate=True, **options)
    static = model.generate(**batch, return_dict_in_generate=True, cache_implementation="static", **options)
    assert widths == [12]  # 12 tokens wide already: the bucket; ROWS_B (11 wide) below is padded
    assert torch.equal(static.sequences, eager.sequences)
    for name in ("scores", "logits"):
        if getattr(eager, name) is not None:
            assert len(getattr(static, name)) == len(getattr(eager, name))
            assert all(torch.allclose(s, e, atol=1e-5) for s, e in zip(getattr(static, name), getattr(eager, name)))
    if options.get("num_beams"):
        assert torch.allclose(static.sequences_scores, eager.sequences_scores, atol=1e-5)
    assert torch.equal(model.generate(**batch_of(ROWS_B), cache_implementation="static", **options),
                       model.generate(**batch_of(ROWS_B), **options)) and widths[-1] == 12


def test_static_switch_follows_the_generation_config(model, monkeypatch):
    widths = spy_on_one_pass(monkeypatch)
    batch = batch_of(ROWS_B)
    model.generate(**batch)
    assert widths == []  # off by default
    model.generate(**batch, generation_config=GenerationConfig(cache_implementation="static"))
    model.generate(**batch, compile_config=CompileConfig())  # CPU, no `_compile_all_devices`: bucketed, eager
    assert widths == [12, 12]
    model.generate(**batch, cache_implementation="static", disable_compile=True)
    assert widths == [12, 12]
    saved = model.generation_config.cache_implementation
    try:
        model.generation_config.cache_implementation = "static"  # e.g. from generation_config.json
        model.generate(**batch)
        assert widths == [12, 12, 12]
        model.generate(**batch, output_hidden_states=True, return_dict_in_generate=True)  # padded states: eager
        assert widths == [12, 12, 12]
    finally:
        model.generation_config.cache_implementation = saved


def test_a_vanilla_model_asked_for_static_shapes_warns_and_runs_eagerly(monkeypatch):
    widths = spy_on_one_pass(monkeypatch)
    torch.manual_seed(0)
    vanilla = WeakNATForConditionalGeneration(tiny_config(nar_type="vanilla", weak_ar_layers=0)).eval()
    batch = batch_of(ROWS_B)
    with CaptureLogger(static_shapes.logger) as captured:
        static = vanilla.generate(**batch, cache_implementation="static")
    assert torch.equal(static, vanilla.generate(**batch)) and widths == []
    assert "predicted length" in captured.out


def test_generate_follows_changes_to_the_model_generation_config_between_calls(model):
    """The merged generation config is remembered between calls: a change to the model's must still take effect."""
    batch = batch_of(ROWS_A)
    full = model.generate(**batch)
    assert full.shape[1] > 3
    saved = model.generation_config.max_length, model.generation_config.suppress_tokens
    try:
        model.generation_config.max_length = 3
        assert torch.equal(model.generate(**batch), full[:, :3])
        model.generation_config.suppress_tokens = [int(full[0, 0])]
        assert int(model.generate(**batch)[0, 0]) != int(full[0, 0])
    finally:
        model.generation_config.max_length, model.generation_config.suppress_tokens = saved
    assert torch.equal(model.generate(**batch), full)
    assert torch.equal(model.generate(**batch, max_new_tokens=2), full[:, :2])
    assert torch.equal(model.generate(**batch), full)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's inductor backend needs a C++ compiler on CPU")
def test_compiled_pass_gives_eager_tokens_and_compiles_once_per_bucket():
    """torch.compile (inductor, CPU, fullgraph) through `compile_config`, two batches of different widths in one
    bucket: eager's tokens, one graph."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(weak_ar_layers=0, encoder_layers=1, decoder_layers=1)).eval()
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers' switch for compiling on CPU
    graphs = counters["stats"]["unique_graphs"]
    for rows in (ROWS_A, ROWS_B):
        batch = batch_of(rows)
        assert torch.equal(model.generate(**batch, compile_config=compile_config), model.generate(**batch))
    assert counters["stats"]["unique_graphs"] - graphs == 1


def test_compiled_pass_is_kept_per_compile_config_and_not_carried_into_a_copy(model):
    """torch.compile is lazy, so this compiles nothing. A deep copy must not run the original's compiled pass (it is
    bound to the original's weights)."""
    import copy

    from hf_weaknat.static_shapes import compiled_pass

    first = compiled_pass(model, CompileConfig(backend="eager"))
    assert compiled_pass(model, CompileConfig(backend="eager")) is first
    assert compiled_pass(model, CompileConfig(backend="aot_eager")) is not first
    assert copy.deepcopy(model).__dict__["_static_pass"].compiled is None
