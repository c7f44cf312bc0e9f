"""The paper's contribution (Section 3, Table 3): weak AR decoders that read one NAR layer each, their sharing,
layer sampling and loss, as `hf_weaknat/weak_ar.py` implements them and the translator wires them in."""

import ast
import math
from pathlib import Path

import pytest
import torch
from conftest import batch_of, count, pad_batch, record_weak_ar_memories, tiny_config

from hf_weaknat import WeakNATConfig, WeakNATForConditionalGeneration
from hf_weaknat.layers import WeakNATDecoderLayer
from hf_weaknat.weak_ar import Memory, WeakARDecoder, WeakARDecoders, multitask_loss, shift_tokens_right

SOURCES = [[7, 8, 9, 10, 11, 2], [12, 13, 2], [14, 15, 16, 2]]
# The structural tests run for both NAR types: one weak_ar.py serves CTC frames and vanilla target positions alike
BOTH = pytest.mark.parametrize("nar_type", ["ctc", "vanilla"])
TARGETS = [[20, 21, 22, 23, 2], [24, 2], [25, 25, 26, 2]]


def nar_loss(out):
    """The NAR loss that lambda weighs: CTC's, or the vanilla NAR's token + length_loss_factor * length loss."""
    return out.ctc_loss if out.ctc_loss is not None else out.token_loss + 0.1 * out.length_loss


def one_weak_decoder(config) -> WeakARDecoder:
    return WeakARDecoder(config, WeakNATDecoderLayer, config.max_frames)


def reads_of(model, **forward_kwargs):
    """(memories read per weak AR decoder call, the forward's output) for one training step on the toy batch."""
    memories, handles = record_weak_ar_memories(model)
    out = model(**batch_of(SOURCES, TARGETS), **forward_kwargs)
    for handle in handles:
        handle.remove()
    return memories, out


# ---------------------------------------------------------------------------------------------------------- the file


def test_weak_ar_file_imports_no_model_file():
    """The layer class and the embedding are passed in, so a second NAR type can reuse the file as it is."""
    tree = ast.parse((Path(__file__).resolve().parents[1] / "hf_weaknat" / "weak_ar.py").read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any(name and ("modeling" in name or "configuration" in name or name.startswith(".")) for name in modules)


def test_teacher_forcing_inputs_start_with_bos_and_turn_ignored_labels_into_pad():
    labels = torch.tensor([[20, 21, 2], [24, 2, -100]])
    assert shift_tokens_right(labels, 1, 0).tolist() == [[1, 20, 21], [1, 24, 2]]


def test_multitask_loss_is_the_papers_lambda_weighting():
    assert multitask_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 4)


# ---------------------------------------------------------------------------------------------------------- memories


def test_a_memory_can_have_any_length_and_its_masked_positions_never_change_the_loss():
    """Nothing CTC-specific: target-length states (a NAR with length prediction) work like upsampled frames."""
    torch.manual_seed(0)
    config = tiny_config(dropout=0.0, attn_implementation="sdpa")  # outside a model, nothing else picks it
    decoders = WeakARDecoders(config, WeakNATDecoderLayer, max_positions=16)
    embed = torch.nn.Embedding(config.vocab_size, config.d_model)
    labels = pad_batch(TARGETS, -100)
    states = torch.randn(3, labels.shape[1], config.d_model, requires_grad=True)  # one state per target position
    mask = labels != -100
    loss = decoders.loss(labels, [Memory(0, states, mask)], embed)
    garbage = torch.randn(3, 7, config.d_model)
    longer = Memory(0, torch.cat([states, garbage], 1), torch.cat([mask, mask.new_zeros(3, 7)], 1))
    padded = decoders.loss(labels, [longer], embed)
    torch.testing.assert_close(padded, loss)
    loss.backward()
    assert states.grad.abs().sum() > 0  # no detach: the NAR states learn from the weak decoder


@BOTH
def test_weak_ar_decoders_read_only_nar_layer_states_never_the_encoder(nar_type):
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type, weak_ar_layer_sample_ratio=1.0,
                                                        dropout=0.0)).train()
    memories, out = reads_of(model, output_hidden_states=True)
    (memory,) = memories  # shared parameters: the four partners run as one batch
    partners = memory.split(3)  # batch of 3 sentences per partner
    layer_states = out.decoder_hidden_states[1:]  # index 0 is the decoder input
    assert len(partners) == len(layer_states) == 4
    for i, (read, states) in enumerate(zip(partners, layer_states)):
        assert torch.equal(read, states), f"partner {i} does not read NAR layer {i}'s states"
    encoder = out.encoder_last_hidden_state
    for read in partners:  # the encoder's states, padded or not, are in no partner's memory
        assert not torch.equal(read[:, : encoder.shape[1]], encoder)


@BOTH
def test_optional_encoder_partner_reads_the_encoder_output(nar_type):
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type, weak_ar_on_encoder=True,
                                                        weak_ar_share_parameters=False,
                                                        weak_ar_layer_sample_ratio=0.25)).train()
    memories, out = reads_of(model, output_hidden_states=True)
    assert len(memories) == 2  # one sampled NAR layer + the encoder's partner
    nar_read, encoder_read = memories
    assert torch.equal(encoder_read, out.encoder_last_hidden_state)
    assert any(torch.equal(nar_read, states) for states in out.decoder_hidden_states[1:])


def test_with_sharing_the_encoder_partner_joins_the_batch_padded_under_its_mask():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(weak_ar_on_encoder=True, weak_ar_layer_sample_ratio=0.25,
                                                        dropout=0.0)).train()
    memories, out = reads_of(model, output_hidden_states=True)
    (memory,) = memories
    nar_read, encoder_read = memory.split(3)
    src_len = out.encoder_last_hidden_state.shape[1]
    assert any(torch.equal(nar_read, states) for states in out.decoder_hidden_states[1:])
    assert torch.equal(encoder_read[:, :src_len], out.encoder_last_hidden_state)
    assert not encoder_read[:, src_len:].any()  # zero padding, masked out of the attention


# ---------------------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("ratio,partners", [(0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)])
@BOTH
def test_each_step_uses_the_configured_number_of_partners(ratio, partners, nar_type):
    model = WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type, decoder_layers=4,
                                                        weak_ar_layer_sample_ratio=ratio,
                                                        weak_ar_share_parameters=False)).train()
    for _ in range(5):
        memories, _ = reads_of(model)
        assert len(memories) == partners
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


def test_the_states_the_partners_read_stay_internal_unless_hidden_states_are_asked_for():
    model = WeakNATForConditionalGeneration(tiny_config()).train()
    memories, out = reads_of(model)
    assert memories and out.ar_loss is not None
    assert out.decoder_hidden_states is None and out.encoder_hidden_states is None


@BOTH
def test_weak_ar_decoders_are_used_only_in_training(nar_type):
    model = WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type)).eval()
    memories, out = reads_of(model)
    assert memories == [] and out.ar_loss is None and torch.equal(out.loss, nar_loss(out))


# ---------------------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.5, 1.0])
@BOTH
def test_loss_is_lambda_weighted_sum_of_ctc_and_weak_ar_losses(weight, nar_type):
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type, nar_loss_weight=weight)).train()
    out = model(**batch_of(SOURCES, TARGETS))
    torch.testing.assert_close(out.loss, weight * nar_loss(out) + (1 - weight) * out.ar_loss)


@BOTH
def test_with_lambda_one_weak_ar_decoders_get_no_gradient(nar_type):
    model = WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type, nar_loss_weight=1.0)).train()
    model(**batch_of(SOURCES, TARGETS)).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.weak_ar.parameters())


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


@BOTH
def test_weak_ar_gradients_reach_the_nar_decoder(nar_type):
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type, nar_loss_weight=0.0,
                                                        weak_ar_layer_sample_ratio=1.0)).train()
    model(**batch_of(SOURCES, TARGETS)).loss.backward()  # the AR loss alone
    for layer in model.model.decoder.layers:
        assert layer.ffn.sublayer.fc2.weight.grad.abs().sum() > 0
    if nar_type == "ctc":
        assert model.model.upsampler.proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------- cost


@BOTH
def test_sharing_adds_exactly_one_weak_decoders_parameters(nar_type):
    plain = count(WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type, weak_ar_layers=0)))
    shared = count(WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type, weak_ar_share_parameters=True)))
    separate = count(WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type, weak_ar_share_parameters=False)))
    with_encoder = count(WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type, weak_ar_share_parameters=False,
                                                                     weak_ar_on_encoder=True)))
    one = count(one_weak_decoder(tiny_config(nar_type=nar_type)))
    assert shared - plain == one
    assert separate - plain == 4 * one  # one per NAR decoder layer
    assert with_encoder - plain == 5 * one
    three_layers = count(one_weak_decoder(tiny_config(nar_type=nar_type, weak_ar_layers=3)))
    three_layer_model = WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type, weak_ar_layers=3))
    assert count(three_layer_model) - plain == three_layers > one


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


# ---------------------------------------------------------------------------------------------------------------
# Beyond the paper: the partner-dependence diagnostic, the warm-in and the detached embedding


@BOTH
def test_dependence_compares_each_partner_on_its_own_sentences_states_with_another_sentences(nar_type):
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type, dropout=0.0)).eval()
    batch = batch_of(SOURCES, TARGETS)
    found = model.weak_ar_dependence(**batch)
    assert found["own"].shape == found["other"].shape == (4,)  # one partner per NAR layer, none sampled away
    assert found["tokens"] == sum(len(t) for t in TARGETS)
    assert not torch.equal(found["own"], found["other"])  # reading another sentence changes what a partner says

    # the same sentence three times: "another sentence" is this one, so the gap must vanish
    same = batch_of([SOURCES[0]] * 3, [TARGETS[0]] * 3)
    twins = model.weak_ar_dependence(**same)
    assert torch.equal(twins["own"], twins["other"])

    # a partner that cannot read its memory (cross-attention output zeroed) is a plain language model: no gap
    with torch.no_grad():
        model.weak_ar.decoders[0].layers[0].cross_attn.sublayer.out_proj.weight.zero_()
        model.weak_ar.decoders[0].layers[0].cross_attn.sublayer.out_proj.bias.zero_()
    deaf = model.weak_ar_dependence(**batch)
    assert torch.equal(deaf["own"], deaf["other"])


@BOTH
def test_warm_in_ramps_the_nar_loss_weight_from_one_with_no_partner_at_first(nar_type):
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(nar_type=nar_type, dropout=0.0,
                                                        weak_ar_warmup_steps=100)).train()
    batch = batch_of(SOURCES, TARGETS)
    start = model(**batch, training_step=0)
    assert start.ar_loss is None and torch.equal(start.loss, nar_loss(start))  # partners off at the start
    torch.manual_seed(1)
    halfway = model(**batch, training_step=50)
    torch.testing.assert_close(halfway.loss, 0.75 * nar_loss(halfway) + 0.25 * halfway.ar_loss)
    after = model(**batch, training_step=1000)
    torch.testing.assert_close(after.loss, 0.5 * nar_loss(after) + 0.5 * after.ar_loss)


def test_a_detached_embedding_gets_no_gradient_from_the_partners():
    def embedding_grad_from_ar_loss(detach: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = WeakNATForConditionalGeneration(tiny_config(dropout=0.0, weak_ar_detach_embedding=detach)).train()
        model(**batch_of(SOURCES, TARGETS), training_step=0).ar_loss.backward()
        return model.model.shared.weight.grad, model.model.decoder.layers[0].ffn.sublayer.fc1.weight.grad

    # token rows that only the targets use: the partners' input and output projections are their only path
    target_only = sorted({t for row in TARGETS for t in row} - {t for row in SOURCES for t in row} - {2})
    embedding, nar_layer = embedding_grad_from_ar_loss(detach=False)
    assert embedding[target_only].abs().sum() > 0 and nar_layer.abs().sum() > 0
    embedding, nar_layer = embedding_grad_from_ar_loss(detach=True)
    assert embedding[target_only].abs().sum() == 0
    assert nar_layer.abs().sum() > 0  # the NAR layers still get the partners' gradient through the states they read
