"""Behaviour of the CTC-NAR model: shapes and padding, the CTC loss, glancing, input checks and decoding.

The weak AR decoders (the paper's contribution) have their own file, test_weak_ar.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of, generates, pad_batch, record_weak_ar_memories, tiny_config

from hf_weaknat import WeakNATConfig, WeakNATForConditionalGeneration, WeakNATModel
from hf_weaknat.glancing import choose_glanced_frames


SOURCES = [[7, 8, 9, 10, 11, 2], [12, 13, 2], [14, 15, 16, 2]]
TARGETS = [[20, 21, 22, 23, 2], [24, 2], [25, 25, 26, 2]]


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


def test_glancing_reveals_ratio_times_the_wrong_frames_and_only_valid_frames_of_rows_that_fit():
    torch.manual_seed(0)
    frame_mask = torch.arange(12)[None] < torch.tensor([[12], [9], [2]])
    labels = pad_batch([[5, 6, 7, 5], [8, 9], [5, 5, 6]], -100)  # the last row needs 4 frames and has 2
    logits = torch.randn(3, 12, 10)
    glanced, aligned = choose_glanced_frames(logits, frame_mask, labels, ratio=0.5, blank_token_id=0)
    wrong = ((logits.argmax(-1) != aligned) & frame_mask).sum(1)
    assert glanced.sum(1).tolist() == [int(w * 0.5) for w in wrong[:2].tolist()] + [0]
    assert not (glanced & ~frame_mask).any()
    assert not aligned[2].any()  # an unfit row aligns to blanks only


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


def ctc_log_likelihood(model, batch, sequences) -> torch.Tensor:
    """log p(sequence | source) under the model's CTC distribution (all alignments), one value per row."""
    with torch.no_grad():
        log_probs = model(**batch).logits.double().log_softmax(-1)
    frames = model.frame_mask(batch["attention_mask"]).sum(1)
    lengths = (sequences != model.config.pad_token_id).sum(1)
    return -F.ctc_loss(log_probs.transpose(0, 1), sequences, frames, lengths, blank=model.config.blank_token_id,
                       reduction="none", zero_infinity=False)


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(memorized, tokenizer):
    # An untrained model is unsure of every frame, so the search matters; the memorised one is sure of its pairs.
    torch.manual_seed(0)
    untrained = WeakNATForConditionalGeneration(tiny_config(vocab_size=12, upsample_ratio=2)).eval()
    ids = torch.randint(5, 12, (6, 5), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = 2
    model, sources, targets = memorized
    unseen = ["Ein Hund rennt durch das hohe Gras.", "Zwei Männer.", "Eine Frau liest ein Buch im Park."]
    gains = []
    for translator, batch in ((untrained, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
                              (model, tokenizer(sources + unseen, padding=True, return_tensors="pt"))):
        greedy, beam = translator.generate(**batch), translator.generate(**batch, num_beams=5)
        greedy_ll, beam_ll = ctc_log_likelihood(translator, batch, greedy), ctc_log_likelihood(translator, batch, beam)
        assert torch.isfinite(greedy_ll).all() and (beam_ll >= greedy_ll - 1e-6).all(), (beam_ll, greedy_ll)
        gains.append(beam_ll - greedy_ll)
    assert (gains[0] > 1.0).all()  # greedy's collapsed sequence is far from the untrained model's most likely one
    beam = model.generate(**tokenizer(sources, padding=True, return_tensors="pt"), num_beams=5)
    assert tokenizer.batch_decode(beam, skip_special_tokens=True) == targets
    nbest = model.generate(**tokenizer(sources, padding=True, return_tensors="pt"), num_beams=5, num_return_sequences=3)
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


def test_fairseq_initialisation_has_the_statistics_it_promises():
    """`init_scheme="fairseq"`: embeddings N(0, d^-1/2) with a zero padding row, Xavier-uniform linear layers
    (query/key/value with gain 2^-1/2), zero biases, LayerNorms (1, 0); the default keeps N(0, init_std)."""
    torch.manual_seed(0)
    config = tiny_config(vocab_size=2000, d_model=64, decoder_layers=2, init_scheme="fairseq")
    model = WeakNATForConditionalGeneration(config)
    embedding = model.model.shared.weight
    assert abs(embedding[1:].std().item() - 64**-0.5) < 0.01 and embedding[config.pad_token_id].abs().sum() == 0

    def xavier_std(linear, gain=1.0):
        fan_out, fan_in = linear.weight.shape
        return gain * math.sqrt(2.0 / (fan_in + fan_out))

    attention = model.model.decoder.layers[0].self_attn.sublayer
    for linear, gain in ((attention.q_proj, 2**-0.5), (attention.out_proj, 1.0),
                         (model.model.decoder.layers[0].ffn.sublayer.fc1, 1.0), (model.model.upsampler.proj, 1.0),
                         (model.weak_ar.decoders[0].layers[0].cross_attn.sublayer.k_proj, 2**-0.5)):
        expected = xavier_std(linear, gain)
        assert abs(linear.weight.std().item() - expected) < 0.1 * expected
        assert linear.weight.abs().max() <= math.sqrt(3) * expected + 1e-6  # uniform on [-a, a], a = sqrt(3) std
        assert linear.bias.abs().sum() == 0
    norm = model.model.decoder.layers[0].ffn.layer_norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and norm.bias.abs().sum() == 0
    default = WeakNATForConditionalGeneration(tiny_config(vocab_size=2000, d_model=64, decoder_layers=2))
    assert abs(default.model.shared.weight[1:].std().item() - 0.02) < 0.002
