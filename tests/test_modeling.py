"""Behaviour of the CTC-NAR model and its weak AR decoders (paper Section 3, METHOD.md)."""

import math

import pytest
import torch
from conftest import generates, pad_batch, tiny_config

from hf_weaknat import WeakNATConfig, WeakNATForConditionalGeneration, WeakNATModel
from hf_weaknat.modeling_weaknat import WeakARDecoder


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def batch_of(rows, targets=None):
    ids = pad_batch(rows, 0)
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    if targets is not None:
        batch["labels"] = pad_batch(targets, -100)
    return batch


SOURCES = [[7, 8, 9, 10, 11, 2], [12, 13, 2], [14, 15, 16, 2]]
TARGETS = [[20, 21, 22, 23, 2], [24, 2], [25, 25, 26, 2]]


def record_weak_ar_memories(model):
    """Capture the memory (cross-attention input) of every weak AR decoder call."""
    seen = []

    def hook(module, args):
        seen.append(args[2])  # forward(decoder_input_ids, target_mask, memory, memory_mask, embed_tokens)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, WeakARDecoder)]
    return seen, handles


# ---------------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad", [
    dict(upsample_ratio=0), dict(blank_token_id=0), dict(blank_token_id=60), dict(d_model=30),
    dict(upsample_method="nearest"), dict(weak_ar_layers=-1), dict(weak_ar_layer_sample_ratio=0.0),
    dict(nar_loss_weight=1.5), dict(label_smoothing=1.0), dict(weak_ar_loss_reduction="max"), dict(dropout=-0.1),
])
def test_invalid_config_values_raise_a_clear_error_at_construction(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_token")[0]):
        tiny_config(**bad)


def test_config_round_trips_through_save_pretrained(tmp_path):
    config = tiny_config(weak_ar_layers=3, glancing=True, upsample_method="repeat")
    config.save_pretrained(tmp_path)
    loaded = WeakNATConfig.from_pretrained(tmp_path)
    assert (loaded.weak_ar_layers, loaded.glancing, loaded.upsample_method) == (3, True, "repeat")


def test_glancing_ratio_anneals_linearly_from_start_to_end():
    config = tiny_config(glancing_anneal_steps=100)
    assert config.glancing_ratio(0) == pytest.approx(0.5)
    assert config.glancing_ratio(50) == pytest.approx(0.4)
    assert config.glancing_ratio(100) == pytest.approx(0.3)
    assert config.glancing_ratio(10_000) == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------------------- shapes and padding


@pytest.mark.parametrize("method", ["linear", "repeat"])
def test_decoder_has_upsample_ratio_frames_per_source_token(method):
    model = WeakNATModel(tiny_config(upsample_method=method, upsample_ratio=3)).eval()
    out = model(**batch_of(SOURCES))
    assert out.last_hidden_state.shape == (3, 3 * 6, 32)
    assert out.encoder_last_hidden_state.shape == (3, 6, 32)


def test_padded_row_gives_the_same_logits_and_loss_as_unpadded_row():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(weak_ar_layers=0)).eval()
    batched = model(**batch_of(SOURCES, TARGETS))
    for i, (src, tgt) in enumerate(zip(SOURCES, TARGETS)):
        alone = model(**batch_of([src], [tgt]))
        frames = 3 * len(src)
        torch.testing.assert_close(batched.logits[i, :frames], alone.logits[0], atol=1e-5, rtol=1e-5)
        assert batched.frame_mask[i].sum() == frames
    per_pair = [model(**batch_of([s], [t])).ctc_loss for s, t in zip(SOURCES, TARGETS)]
    torch.testing.assert_close(batched.ctc_loss, torch.stack(per_pair).mean(), atol=1e-5, rtol=1e-5)


def test_pad_and_minus_100_label_padding_are_equivalent():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config()).eval()
    with_pad = model(**{**batch_of(SOURCES), "labels": pad_batch(TARGETS, 0)}).loss
    with_ignore = model(**batch_of(SOURCES, TARGETS)).loss
    assert torch.equal(with_pad, with_ignore)


# ---------------------------------------------------------------------------------------------------------- losses


def test_pair_whose_target_cannot_fit_its_frames_is_counted_and_never_gives_nan():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(upsample_ratio=1)).train()
    # 2 source tokens -> 2 frames; the second target needs 4 (3 tokens + a blank between the repeated 30s)
    out = model(**batch_of([[7, 2], [8, 2]], [[20, 2], [30, 30, 2]]))
    assert out.num_unfit_pairs.item() == 1
    assert torch.isfinite(out.loss) and torch.isfinite(out.ctc_loss)
    fit_only = model.eval()(**batch_of([[7, 2]], [[20, 2]])).ctc_loss
    torch.testing.assert_close(model(**batch_of([[7, 2], [8, 2]], [[20, 2], [30, 30, 2]])).ctc_loss, fit_only)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_only_unfit_pairs_give_zero_ctc_loss_not_nan():
    model = WeakNATForConditionalGeneration(tiny_config(upsample_ratio=1, weak_ar_layers=0)).train()
    out = model(**batch_of([[7, 2]], [[20, 21, 22, 2]]))
    assert out.num_unfit_pairs.item() == 1 and out.loss.item() == 0.0


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.5, 1.0])
def test_loss_is_lambda_weighted_sum_of_ctc_and_weak_ar_losses(weight):
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(nar_loss_weight=weight)).train()
    out = model(**batch_of(SOURCES, TARGETS))
    torch.testing.assert_close(out.loss, weight * out.ctc_loss + (1 - weight) * out.ar_loss)


def test_with_lambda_one_weak_ar_decoders_get_no_gradient():
    model = WeakNATForConditionalGeneration(tiny_config(nar_loss_weight=1.0)).train()
    model(**batch_of(SOURCES, TARGETS)).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.weak_ar.parameters())


def test_ctc_loss_matches_torch_ctc_loss_divided_by_target_length():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(weak_ar_layers=0)).eval()
    out = model(**batch_of(SOURCES, TARGETS))
    expected = []
    for i, (src, tgt) in enumerate(zip(SOURCES, TARGETS)):
        log_probs = out.logits[i, : 3 * len(src)].log_softmax(-1)[:, None]
        expected.append(torch.nn.functional.ctc_loss(log_probs, torch.tensor([tgt]), [3 * len(src)], [len(tgt)],
                                                     blank=4, reduction="sum") / len(tgt))
    torch.testing.assert_close(out.ctc_loss, torch.stack(expected).mean())


def test_weak_ar_loss_reduction_sum_is_number_of_partners_times_mean():
    config = dict(decoder_layers=4, weak_ar_layer_sample_ratio=0.5, dropout=0.0)
    torch.manual_seed(0)
    mean_model = WeakNATForConditionalGeneration(tiny_config(**config)).train()
    sum_model = WeakNATForConditionalGeneration(tiny_config(weak_ar_loss_reduction="sum", **config)).train()
    sum_model.load_state_dict(mean_model.state_dict())
    torch.manual_seed(1)
    mean_loss = mean_model(**batch_of(SOURCES, TARGETS)).ar_loss
    torch.manual_seed(1)
    sum_loss = sum_model(**batch_of(SOURCES, TARGETS)).ar_loss
    torch.testing.assert_close(sum_loss, 2 * mean_loss)


# ---------------------------------------------------------------------------------------------------------- weak AR decoders


def test_weak_ar_gradients_reach_the_nar_decoder():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(nar_loss_weight=0.0, weak_ar_layer_sample_ratio=1.0)).train()
    model(**batch_of(SOURCES, TARGETS)).loss.backward()  # the AR loss alone
    for layer in model.model.decoder.layers:
        assert layer.ffn.sublayer.fc2.weight.grad.abs().sum() > 0
    assert model.model.upsampler.proj.weight.grad.abs().sum() > 0


def test_weak_ar_decoders_read_only_nar_layer_states_never_the_encoder():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(weak_ar_layer_sample_ratio=1.0, dropout=0.0)).train()
    memories, handles = record_weak_ar_memories(model)
    out = model(**batch_of(SOURCES, TARGETS), output_hidden_states=True)
    for h in handles:
        h.remove()
    (memory,) = memories  # shared parameters: the four partners run as one batch
    frames = out.logits.shape[1]
    assert memory.shape == (4 * 3, frames, 32)
    for i, layer_states in enumerate(out.decoder_hidden_states[1:]):  # index 0 is the decoder input
        assert torch.equal(memory[3 * i: 3 * i + 3], layer_states)
    assert not any(m.shape[1] == out.encoder_last_hidden_state.shape[1] for m in memories)


def test_optional_encoder_partner_reads_the_encoder_output():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(weak_ar_on_encoder=True, weak_ar_share_parameters=False,
                                                        weak_ar_layer_sample_ratio=0.25)).train()
    memories, handles = record_weak_ar_memories(model)
    out = model(**batch_of(SOURCES, TARGETS))
    for h in handles:
        h.remove()
    assert len(memories) == 2  # one sampled NAR layer + the encoder's partner
    assert any(torch.equal(m, out.encoder_last_hidden_state) for m in memories)


@pytest.mark.parametrize("ratio,partners", [(0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)])
def test_each_step_uses_the_configured_number_of_partners(ratio, partners):
    model = WeakNATForConditionalGeneration(tiny_config(decoder_layers=4, weak_ar_layer_sample_ratio=ratio,
                                                        weak_ar_share_parameters=False)).train()
    memories, handles = record_weak_ar_memories(model)
    for _ in range(5):
        memories.clear()
        model(**batch_of(SOURCES, TARGETS))
        assert len(memories) == partners
    for h in handles:
        h.remove()
    assert partners == model.config.num_weak_ar_partners()


def test_layer_sampling_visits_every_layer_over_many_steps():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(decoder_layers=4, weak_ar_share_parameters=False)).train()
    used = set()
    for decoder_index, decoder in enumerate(model.weak_ar.decoders):
        decoder.register_forward_pre_hook(lambda m, a, i=decoder_index: used.add(i))
    for _ in range(20):
        model(**batch_of(SOURCES, TARGETS))
    assert used == {0, 1, 2, 3}


def test_weak_ar_decoders_are_used_only_in_training():
    model = WeakNATForConditionalGeneration(tiny_config()).eval()
    memories, handles = record_weak_ar_memories(model)
    out = model(**batch_of(SOURCES, TARGETS))
    assert memories == [] and out.ar_loss is None and torch.equal(out.loss, out.ctc_loss)


def test_sharing_adds_exactly_one_weak_decoders_parameters():
    plain = count(WeakNATForConditionalGeneration(tiny_config(weak_ar_layers=0)))
    shared = count(WeakNATForConditionalGeneration(tiny_config(weak_ar_share_parameters=True)))
    separate = count(WeakNATForConditionalGeneration(tiny_config(weak_ar_share_parameters=False)))
    with_encoder = count(WeakNATForConditionalGeneration(tiny_config(weak_ar_share_parameters=False,
                                                                     weak_ar_on_encoder=True)))
    one = count(WeakARDecoder(tiny_config()))
    assert shared - plain == one
    assert separate - plain == 4 * one  # one per NAR decoder layer
    assert with_encoder - plain == 5 * one
    three_layers = count(WeakARDecoder(tiny_config(weak_ar_layers=3)))
    assert count(WeakNATForConditionalGeneration(tiny_config(weak_ar_layers=3))) - plain == three_layers > one


# ---------------------------------------------------------------------------------------------------------- glancing


def test_glancing_feeds_aligned_reference_embeddings_to_the_second_pass_and_the_weak_decoders():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(glancing=True, dropout=0.0, weak_ar_layer_sample_ratio=1.0))
    model.train()
    seen_inputs = []
    model.model.decoder.register_forward_pre_hook(lambda m, args: seen_inputs.append(args[0].detach().clone()))
    memories, _ = record_weak_ar_memories(model)
    out = model(**batch_of(SOURCES, TARGETS), training_step=0, output_hidden_states=True)
    first, second = seen_inputs  # no-grad prediction pass, then the glanced pass
    changed = (first != second).any(-1)  # (batch, frames): frames whose input became a target embedding
    assert changed.any()
    assert not (changed & ~out.frame_mask).any()  # never a padding frame
    embeddings = model.model.shared.weight * model.model.shared.embed_scale
    for b, f in changed.nonzero().tolist():
        assert any(torch.allclose(second[b, f], embeddings[t]) for t in TARGETS[b] + [4])
    (memory,) = memories  # the weak AR decoders read the glanced pass's states
    assert torch.equal(memory[:3], out.decoder_hidden_states[1])


def test_glancing_is_off_at_inference_and_without_labels():
    model = WeakNATForConditionalGeneration(tiny_config(glancing=True)).train()
    calls = []
    model.model.decoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    model(**batch_of(SOURCES))
    model.eval()(**batch_of(SOURCES, TARGETS))
    assert len(calls) == 2  # one decoder pass each


# ---------------------------------------------------------------------------------------------------------- bad input


def test_source_longer_than_positions_raises_value_error_naming_the_limit():
    model = WeakNATForConditionalGeneration(tiny_config(max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model(input_ids=torch.full((1, 9), 7))


def test_left_padding_is_rejected_with_a_clear_error():
    model = WeakNATForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match="right-padded"):
        model(input_ids=torch.tensor([[0, 7, 2]]), attention_mask=torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="right-padded"):
        model(**batch_of([[7, 2]]), labels=torch.tensor([[-100, 20, 2]]))


def test_labels_containing_the_blank_are_rejected():
    model = WeakNATForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match="blank"):
        model(**batch_of([[7, 2]], [[4, 2]]))


# ---------------------------------------------------------------------------------------------------------- decoding


def test_tiny_model_reproduces_its_training_pairs_exactly_through_generate(memorized, tokenizer):
    model, sources, targets = memorized
    assert generates(model, tokenizer, sources) == targets


def test_batched_generation_equals_unbatched(memorized, tokenizer):
    model, sources, _ = memorized
    mixed = sources + ["Ein Hund rennt durch das hohe Gras.", "Zwei Männer."]
    batch = tokenizer(mixed, padding=True, return_tensors="pt")
    for beams in (1, 4):
        together = model.generate(**batch, num_beams=beams)
        for i, text in enumerate(mixed):
            alone = model.generate(**tokenizer([text], return_tensors="pt"), num_beams=beams)[0]
            width = alone.shape[0]
            assert torch.equal(together[i, :width], alone) and not together[i, width:].any()


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(memorized, tokenizer):
    model, sources, targets = memorized
    batch = tokenizer(sources, padding=True, return_tensors="pt")
    beam = tokenizer.batch_decode(model.generate(**batch, num_beams=5), skip_special_tokens=True)
    assert beam == targets  # a memorised pair is also the most probable collapsed sequence
    nbest = model.generate(**batch, num_beams=5, num_return_sequences=3)
    assert nbest.shape[0] == 3 * len(sources)
    assert len({tuple(r.tolist()) for r in nbest[:3]}) == 3  # distinct hypotheses per sentence


def test_generate_translates_an_empty_source_to_an_empty_sequence(memorized, tokenizer):
    model, sources, _ = memorized
    batch = tokenizer(["", sources[0]], padding=True, return_tensors="pt")
    out = model.generate(**batch)
    assert not out[0].any() and out[1].any()


def test_generate_rejects_bad_beam_arguments():
    model = WeakNATForConditionalGeneration(tiny_config()).eval()
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(**batch_of(SOURCES), num_beams=2, num_return_sequences=3)


def test_hidden_states_and_attentions_cover_every_layer():
    model = WeakNATForConditionalGeneration(tiny_config(attn_implementation="eager")).eval()
    out = model(**batch_of(SOURCES), output_hidden_states=True, output_attentions=True)
    assert len(out.encoder_hidden_states) == 2 + 1 and len(out.decoder_hidden_states) == 4 + 1
    assert out.cross_attentions[0].shape == (3, 4, 18, 6)  # (batch, heads, frames, src_len)
    assert out.decoder_attentions[0].shape == (3, 4, 18, 18)


def test_sdpa_and_eager_attention_agree():
    torch.manual_seed(0)
    eager = WeakNATForConditionalGeneration(tiny_config(attn_implementation="eager")).eval()
    sdpa = WeakNATForConditionalGeneration(tiny_config(attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    batch = batch_of(SOURCES, TARGETS)
    torch.testing.assert_close(eager(**batch).logits, sdpa(**batch).logits, atol=1e-5, rtol=1e-5)


def test_base_size_parameter_counts_follow_the_architecture():
    """At the paper's base size the weak AR overhead is one decoder layer + positions per partner (Table 3)."""
    with torch.device("meta"):
        config = dict(vocab_size=10000, max_position_embeddings=256)
        plain = count(WeakNATForConditionalGeneration(WeakNATConfig(weak_ar_layers=0, **config)))
        shared = count(WeakNATForConditionalGeneration(WeakNATConfig(**config)))
        separate = count(WeakNATForConditionalGeneration(WeakNATConfig(weak_ar_share_parameters=False, **config)))
    d, ffn = 512, 2048
    layer = 4 * (d * d + d) + 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 3 * 2 * d
    one_weak = layer + 3 * 256 * d
    assert shared - plain == one_weak
    assert separate - plain == 6 * one_weak
    assert math.isclose(plain / 1e6, 50.5, abs_tol=1.0)  # paper Table 3: 50.6M for its IWSLT vocabulary
