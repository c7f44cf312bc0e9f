# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""CTC non-autoregressive Transformer with auxiliary weak AR decoders (Wang, Zheng and Huang, EMNLP 2022).

Reading order: attention and layers, upsampling, encoder, NAR decoder, the weak AR decoder and its loss, glancing,
then the public models. Shapes use batch, src_len, frames (= upsample_ratio * src_len) and tgt_len.
The weak AR decoders exist only while `config.weak_ar_layers > 0`; `export.py` writes a checkpoint without them.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, ModelOutput, Seq2SeqModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .configuration_weaknat import WeakNATConfig
from .ctc import collapse_repeats_and_blanks, ctc_min_frames, ctc_prefix_beam_search, ctc_viterbi_align

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Attention and layers


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention; query (batch, heads, q_len, head_dim), additive mask (batch, 1, q_len, k_len)."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.dropout(F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype), dropout, module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights  # (batch, q_len, heads, head_dim)


class WeakNATAttention(nn.Module):
    """Multi-head attention dispatched through transformers' attention interface (eager, sdpa, flash...)."""

    def __init__(self, config: WeakNATConfig, num_heads: int, is_causal: bool = False):
        super().__init__()
        self.config, self.num_heads, self.is_causal = config, num_heads, is_causal
        self.head_dim = config.d_model // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(config.d_model, config.d_model) for _ in range(4))

    def forward(self, hidden_states, key_value_states=None, attention_mask=None, **kwargs):
        kv = hidden_states if key_value_states is None else key_value_states
        split = lambda x: x.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)  # (batch, heads, len, head_dim)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(
            self, split(self.q_proj(hidden_states)), split(self.k_proj(kv)), split(self.v_proj(kv)), attention_mask,
            scaling=self.scaling, dropout=self.dropout if self.training else 0.0, is_causal=self.is_causal, **kwargs,
        )
        return self.out_proj(out.reshape(*hidden_states.shape[:-1], -1)), weights


class WeakNATFeedForward(nn.Module):
    def __init__(self, config: WeakNATConfig, ffn_dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(config.d_model, ffn_dim), nn.Linear(ffn_dim, config.d_model)
        self.activation = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout

    def forward(self, x):
        x = F.dropout(self.activation(self.fc1(x)), self.activation_dropout, self.training)
        return self.fc2(x)


class WeakNATSublayer(nn.Module):
    """Residual + LayerNorm around one sublayer; post-LN (the paper's setup) or pre-LN by `config.normalize_before`."""

    def __init__(self, config: WeakNATConfig, sublayer: nn.Module):
        super().__init__()
        self.sublayer, self.layer_norm = sublayer, nn.LayerNorm(config.d_model)
        self.normalize_before, self.dropout = config.normalize_before, config.dropout

    def forward(self, x, *args, **kwargs):
        out = self.sublayer(self.layer_norm(x) if self.normalize_before else x, *args, **kwargs)
        out, extra = out if isinstance(out, tuple) else (out, None)
        x = x + F.dropout(out, self.dropout, self.training)
        return (x if self.normalize_before else self.layer_norm(x)), extra


class WeakNATEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: WeakNATConfig):
        super().__init__()
        self.self_attn = WeakNATSublayer(config, WeakNATAttention(config, config.encoder_attention_heads))
        self.ffn = WeakNATSublayer(config, WeakNATFeedForward(config, config.encoder_ffn_dim))

    def forward(self, hidden_states, attention_mask=None):
        hidden_states, self_weights = self.self_attn(hidden_states, attention_mask=attention_mask)
        return self.ffn(hidden_states)[0], self_weights


class WeakNATDecoderLayer(GradientCheckpointingLayer):
    """Self-attention, cross-attention, FFN. Non-causal in the NAR decoder; causal in a weak AR decoder."""

    def __init__(self, config: WeakNATConfig, is_causal: bool = False):
        super().__init__()
        heads = config.decoder_attention_heads
        self.self_attn = WeakNATSublayer(config, WeakNATAttention(config, heads, is_causal=is_causal))
        self.cross_attn = WeakNATSublayer(config, WeakNATAttention(config, heads))
        self.ffn = WeakNATSublayer(config, WeakNATFeedForward(config, config.decoder_ffn_dim))

    def forward(self, hidden_states, memory, self_attention_mask=None, memory_attention_mask=None):
        hidden_states, self_weights = self.self_attn(hidden_states, attention_mask=self_attention_mask)
        hidden_states, cross_weights = self.cross_attn(hidden_states, memory, attention_mask=memory_attention_mask)
        return self.ffn(hidden_states)[0], self_weights, cross_weights


class WeakNATScaledEmbedding(nn.Embedding):
    """Token embedding times sqrt(d_model) (fairseq's default), so `inputs_embeds` users get the same scale."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx, embed_scale=1.0):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids):
        return super().forward(input_ids) * self.embed_scale


# ----------------------------------------------------------------------------------------------------------------
# Upsampling: CTC needs more decoder frames than target tokens


class WeakNATUpsampler(nn.Module):
    """Turns final encoder states (batch, src_len, d) into decoder frames (batch, ratio * src_len, d).

    Frames 0..ratio-1 come from source position 0, and so on: with right padding the valid frames of a row are its
    first `ratio * src_len` frames, and frames made from padded source positions never reach a loss or an output.
    """

    def __init__(self, config: WeakNATConfig):
        super().__init__()
        self.ratio, self.method = config.upsample_ratio, config.upsample_method
        self.proj = nn.Linear(config.d_model, config.upsample_ratio * config.d_model) if self.method == "linear" else None

    def forward(self, encoder_states, attention_mask):
        batch, src_len, d = encoder_states.shape
        if self.method == "linear":
            frames = self.proj(encoder_states).view(batch, src_len * self.ratio, d)  # (batch, frames, d)
        else:
            frames = encoder_states.repeat_interleave(self.ratio, dim=1)
        return frames, self.frame_mask(attention_mask)

    def frame_mask(self, attention_mask):
        """(batch, src_len) source mask -> (batch, frames) bool mask of the frames made from real tokens."""
        return attention_mask.bool().repeat_interleave(self.ratio, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Encoder and non-autoregressive decoder


class WeakNATEncoder(nn.Module):
    def __init__(self, config: WeakNATConfig):
        super().__init__()
        self.config = config
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList(WeakNATEncoderLayer(config) for _ in range(config.encoder_layers))
        self.final_layer_norm = nn.LayerNorm(config.d_model) if config.normalize_before else None

    def forward(self, inputs_embeds, attention_mask, output_attentions=False, output_hidden_states=False):
        """inputs_embeds (batch, src_len, d) scaled token embeddings; attention_mask (batch, src_len)."""
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        hidden = F.dropout(inputs_embeds + self.embed_positions(positions), self.config.dropout, self.training)
        mask = create_bidirectional_mask(self.config, hidden, attention_mask)
        all_hidden, all_attn = (hidden,) if output_hidden_states else None, () if output_attentions else None
        for layer in self.layers:
            hidden, weights = layer(hidden, mask)
            all_hidden = all_hidden + (hidden,) if output_hidden_states else None
            all_attn = all_attn + (weights,) if output_attentions else None
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=all_hidden, attentions=all_attn)


@dataclass
class WeakNATDecoderOutput(ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


class WeakNATDecoder(nn.Module):
    """The NAR decoder: non-causal layers over all frames at once, cross-attending to the encoder."""

    def __init__(self, config: WeakNATConfig):
        super().__init__()
        self.config = config
        self.embed_positions = nn.Embedding(config.max_frames, config.d_model)
        self.layers = nn.ModuleList(WeakNATDecoderLayer(config) for _ in range(config.decoder_layers))
        self.final_layer_norm = nn.LayerNorm(config.d_model) if config.normalize_before else None

    def forward(self, frame_inputs, frame_mask, encoder_states, encoder_mask, output_attentions=False,
                output_hidden_states=False):
        """frame_inputs (batch, frames, d); frame_mask (batch, frames); encoder_states (batch, src_len, d).

        `output_hidden_states` gives the frame inputs and every layer's output: the states a weak AR decoder reads.
        """
        positions = torch.arange(frame_inputs.shape[1], device=frame_inputs.device)
        hidden = F.dropout(frame_inputs + self.embed_positions(positions), self.config.dropout, self.training)
        self_mask = create_bidirectional_mask(self.config, hidden, frame_mask)
        cross_mask = create_bidirectional_mask(self.config, hidden, encoder_mask, encoder_hidden_states=encoder_states)
        all_hidden = (hidden,) if output_hidden_states else None
        all_self, all_cross = ((), ()) if output_attentions else (None, None)
        for layer in self.layers:
            hidden, self_weights, cross_weights = layer(hidden, encoder_states, self_mask, cross_mask)
            all_hidden = all_hidden + (hidden,) if output_hidden_states else None
            if output_attentions:
                all_self, all_cross = all_self + (self_weights,), all_cross + (cross_weights,)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        return WeakNATDecoderOutput(hidden, all_hidden, all_self, all_cross)


# ----------------------------------------------------------------------------------------------------------------
# The weak AR decoders (the paper's contribution, training only)


def shift_tokens_right(labels, start_token_id, pad_token_id):
    """(batch, tgt_len) labels -> teacher-forcing inputs [start, y1 .. y_{n-1}]; -100 becomes pad."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_token_id)
    shifted[:, 0] = start_token_id
    return shifted


class WeakARDecoder(nn.Module):
    """One weak AR decoder: `weak_ar_layers` causal layers whose ONLY memory is one NAR layer's hidden states.

    It never sees the encoder (paper Section 3): to predict the target it must rely on what the NAR decoder put in
    its frames, so its gradients push the NAR decoder to carry target-side dependencies. No detach on purpose.
    Input and output projections are the model's shared embedding, passed in, so sharing adds no vocabulary weights.
    """

    def __init__(self, config: WeakNATConfig):
        super().__init__()
        self.config = config
        self.embed_positions = nn.Embedding(config.max_frames, config.d_model)
        self.layers = nn.ModuleList(WeakNATDecoderLayer(config, is_causal=True) for _ in range(config.weak_ar_layers))
        self.final_layer_norm = nn.LayerNorm(config.d_model) if config.normalize_before else None

    def forward(self, decoder_input_ids, target_mask, memory, memory_mask, embed_tokens: WeakNATScaledEmbedding):
        """decoder_input_ids (batch, tgt_len); memory (batch, frames, d) -> logits (batch, tgt_len, vocab)."""
        positions = torch.arange(decoder_input_ids.shape[1], device=decoder_input_ids.device)
        hidden = embed_tokens(decoder_input_ids) + self.embed_positions(positions)
        hidden = F.dropout(hidden, self.config.dropout, self.training)
        self_mask = create_causal_mask(self.config, hidden, target_mask, past_key_values=None)
        cross_mask = create_bidirectional_mask(self.config, hidden, memory_mask, encoder_hidden_states=memory)
        for layer in self.layers:
            hidden = layer(hidden, memory, self_mask, cross_mask)[0]
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        return F.linear(hidden, embed_tokens.weight)


def sample_weak_ar_layers(num_layers: int, num_partners: int) -> list[int]:
    """The NAR layers whose weak AR partner trains this step: a random subset (paper Table 3, "layer dropout")."""
    return sorted(torch.randperm(num_layers)[:num_partners].tolist())


class WeakARDecoders(nn.Module):
    """The set of weak AR decoders: one shared module (parameter sharing) or one per NAR layer (+1 for the encoder)."""

    def __init__(self, config: WeakNATConfig):
        super().__init__()
        self.config = config
        count = 1 if config.weak_ar_share_parameters else config.decoder_layers + int(config.weak_ar_on_encoder)
        self.decoders = nn.ModuleList(WeakARDecoder(config) for _ in range(count))

    def decoder_for(self, index: int) -> WeakARDecoder:
        """Index i < decoder_layers is NAR layer i's partner; index decoder_layers is the encoder's."""
        return self.decoders[0 if self.config.weak_ar_share_parameters else index]

    def loss(self, labels, memories: list[tuple[int, torch.Tensor, torch.Tensor]], embed_tokens):
        """Label-smoothed cross-entropy of each weak AR decoder, combined by `config.weak_ar_loss_reduction`.

        memories: (decoder index, states (batch, frames|src_len, d), mask (batch, frames|src_len)) per partner.
        """
        cfg = self.config
        inputs = shift_tokens_right(labels, cfg.bos_token_id, cfg.pad_token_id)
        target_mask = labels != -100
        groups: dict[int, list] = {}
        for index, states, mask in memories:  # decoders sharing parameters run as one batch: one big matmul
            groups.setdefault(id(self.decoder_for(index)), []).append((index, states, mask))
        total, count = 0.0, 0
        for group in groups.values():
            decoder, n = self.decoder_for(group[0][0]), len(group)
            width = max(s.shape[1] for _, s, _ in group)
            states = torch.cat([F.pad(s, (0, 0, 0, width - s.shape[1])) for _, s, _ in group])
            mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for _, _, m in group])
            logits = decoder(inputs.repeat(n, 1), target_mask.repeat(n, 1), states, mask, embed_tokens)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.repeat(n, 1).flatten(), ignore_index=-100,
                                   label_smoothing=cfg.label_smoothing)
            total, count = total + loss * n, count + n
        return total / count if cfg.weak_ar_loss_reduction == "mean" else total


# ----------------------------------------------------------------------------------------------------------------
# CTC loss and glancing


def ctc_loss(logits, frame_mask, labels, blank_token_id):
    """Per-sentence CTC loss divided by target length, averaged over the pairs whose target fits its frames.

    logits (batch, frames, vocab); labels (batch, tgt_len), right-padded with -100.
    Returns (loss, fits): a pair fits when frames >= target length + adjacent repeats (CTC needs a blank between
    repeats). Pairs that do not fit are left out of the mean and counted, never turned into inf/NaN.
    """
    target_mask = labels != -100
    target_lengths, frame_lengths = target_mask.sum(1), frame_mask.sum(1)
    fits = frame_lengths >= ctc_min_frames(labels, target_lengths)
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (frames, batch, vocab), float32 for CTC
    per_pair = F.ctc_loss(log_probs, labels.masked_fill(~target_mask, 0), frame_lengths, target_lengths,
                          blank=blank_token_id, reduction="none", zero_infinity=True)
    per_pair = per_pair / target_lengths.clamp(min=1)
    return (per_pair * fits).sum() / fits.sum().clamp(min=1), fits


def glancing_frame_inputs(frame_inputs, frame_mask, frame_logits, labels, ratio, blank_token_id, embed_tokens):
    """GLAT with CTC (Gu and Kong 2021): reveal the best-aligned reference token on some frames.

    The number of revealed frames is `ratio` times the number of frames where the model's argmax disagrees with
    the Viterbi alignment of the reference, chosen uniformly among the valid frames of each row.
    frame_inputs (batch, frames, d); frame_logits (batch, frames, vocab) from a no-grad pass -> (batch, frames, d).
    """
    with torch.no_grad():
        target_mask = labels != -100
        aligned, fits = ctc_viterbi_align(F.log_softmax(frame_logits.float(), -1), frame_mask.sum(1),
                                          labels.masked_fill(~target_mask, 0), target_mask.sum(1), blank_token_id)
        wrong = ((frame_logits.argmax(-1) != aligned) & frame_mask).sum(1)
        num_glanced = (wrong.float() * ratio).long() * fits  # floor, as GLAT
        scores = torch.rand(frame_mask.shape, device=frame_mask.device).masked_fill(~frame_mask, 2.0)
        rank = scores.argsort(1).argsort(1)  # rank of each frame among its row's random scores
        glanced = rank < num_glanced[:, None]
    return torch.where(glanced[..., None], embed_tokens(aligned).to(frame_inputs.dtype), frame_inputs)


# ----------------------------------------------------------------------------------------------------------------
# Public models


class WeakNATPreTrainedModel(PreTrainedModel):
    config: WeakNATConfig
    config_class = WeakNATConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["WeakNATEncoderLayer", "WeakNATDecoderLayer"]


def check_right_padded(mask: torch.Tensor, name: str):
    if mask.shape[1] > 1 and (mask[:, 1:].long() > mask[:, :-1].long()).any():
        raise ValueError(f"{name} must be right-padded (padding after the tokens); set tokenizer.padding_side='right'")


class WeakNATModel(WeakNATPreTrainedModel):
    """Encoder + upsampler + NAR decoder. `last_hidden_state` holds the decoder frames (batch, frames, d_model)."""

    def __init__(self, config: WeakNATConfig):
        super().__init__(config)
        scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.shared = WeakNATScaledEmbedding(config.vocab_size, config.d_model, config.pad_token_id, scale)
        self.encoder = WeakNATEncoder(config)
        self.upsampler = WeakNATUpsampler(config)
        self.decoder = WeakNATDecoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, value):
        self.shared = value

    def source_mask(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        """Validate the source and return its (batch, src_len) mask."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        batch, src_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        limit = self.config.max_position_embeddings
        if src_len > limit:
            raise ValueError(f"Source has {src_len} tokens but the model has max_position_embeddings={limit}; "
                             "truncate the input (tokenizer(..., truncation=True, max_length=...))")
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if attention_mask is None:
            return torch.ones(batch, src_len, dtype=torch.long, device=device)
        check_right_padded(attention_mask, "attention_mask")
        if src_len and not attention_mask.bool().any(1).all():
            raise ValueError("Every row needs at least one source token (an empty sentence encodes as '</s>')")
        return attention_mask

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, encoder_outputs=None,
                frame_inputs=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, src_len)`): source tokens, right-padded.
        attention_mask (`torch.LongTensor` of shape `(batch, src_len)`): 1 for tokens, 0 for padding.
        encoder_outputs (`BaseModelOutput`, optional): precomputed encoder outputs (glancing reuses them).
        frame_inputs (`torch.FloatTensor` of shape `(batch, frames, d_model)`, optional): decoder inputs to use
            instead of the upsampled encoder states (glancing replaces some frames by target embeddings).
        Other keyword arguments (e.g. `decoder_inputs_embeds`, which generic seq2seq callers pass) are ignored:
        a NAR decoder has no decoder input tokens.
        """
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        if output_attentions and cfg._attn_implementation not in (None, "eager"):
            logger.warning_once(  # as transformers' own sdpa path does: sdpa/flash/flex compute no probabilities
                f"output_attentions=True needs attn_implementation='eager', but this model uses "
                f"'{cfg._attn_implementation}': the returned attentions are not attention probabilities (None for "
                "sdpa). Load it with attn_implementation='eager' or call model.set_attn_implementation('eager').")
        if encoder_outputs is None:
            attention_mask = self.source_mask(input_ids, attention_mask, inputs_embeds)
            inputs_embeds = self.shared(input_ids) if inputs_embeds is None else inputs_embeds
            encoder_outputs = self.encoder(inputs_embeds, attention_mask, output_attentions, output_hidden_states)
        encoder_states = encoder_outputs.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(encoder_states.shape[:2], dtype=torch.long, device=encoder_states.device)
        upsampled, frame_mask = self.upsampler(encoder_states, attention_mask)
        decoder_outputs = self.decoder(upsampled if frame_inputs is None else frame_inputs, frame_mask,
                                       encoder_states, attention_mask, output_attentions, output_hidden_states)
        outputs = Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_states,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )
        return outputs if return_dict else outputs.to_tuple()


@dataclass
class WeakNATOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`): `nar_loss_weight * ctc_loss + (1 - nar_loss_weight) * ar_loss`
        (just `ctc_loss` without weak AR decoders or outside training).
    logits (`torch.FloatTensor` of shape `(batch, frames, vocab)`): CTC frame logits; frames beyond `frame_mask` are
        padding and must be ignored.
    ctc_loss, ar_loss (`torch.FloatTensor` of shape `()`): the two terms (with labels; `ar_loss` while the weak AR
        decoders train).
    frame_mask (`torch.BoolTensor` of shape `(batch, frames)`): valid frames (returned with labels; otherwise use
        `model.frame_mask(attention_mask)`).
    num_unfit_pairs (`torch.LongTensor` of shape `()`): pairs whose target cannot fit its frames, left out of the CTC
        loss (with labels).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    encoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    ctc_loss: torch.FloatTensor | None = None
    ar_loss: torch.FloatTensor | None = None
    frame_mask: torch.BoolTensor | None = None
    num_unfit_pairs: torch.LongTensor | None = None


class WeakNATForConditionalGeneration(WeakNATPreTrainedModel):
    """The translator: WeakNATModel + CTC head, plus the weak AR decoders while `config.weak_ar_layers > 0`.

    `forward(input_ids, attention_mask, labels, training_step)` trains; `generate(input_ids, attention_mask)`
    translates in one forward pass (CTC greedy, or prefix beam search with `num_beams > 1`).
    """

    _tied_weights_keys = {"ctc_head.weight": "model.shared.weight"}

    def __init__(self, config: WeakNATConfig):
        super().__init__(config)
        self.model = WeakNATModel(config)
        self.ctc_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.weak_ar = WeakARDecoders(config) if config.uses_weak_ar else None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.shared

    def set_input_embeddings(self, value):
        self.model.shared = value

    def get_output_embeddings(self):
        return self.ctc_head

    def set_output_embeddings(self, value):
        self.ctc_head = value

    def frame_mask(self, attention_mask):
        """(batch, src_len) source mask -> (batch, frames) mask of the valid CTC frames."""
        return self.model.upsampler.frame_mask(attention_mask)

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, training_step=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, src_len)`): source tokens, right-padded.
        attention_mask (`torch.LongTensor` of shape `(batch, src_len)`): 1 for tokens, 0 for padding.
        labels (`torch.LongTensor` of shape `(batch, tgt_len)`): target tokens, right-padded with -100 (or pad).
        training_step (`int`, optional): the optimizer step, which drives the glancing ratio schedule.
        """
        cfg = self.config
        return_dict = cfg.return_dict if return_dict is None else return_dict
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        training_weak_ar = labels is not None and self.weak_ar is not None and self.training
        if labels is not None:
            labels = self.check_labels(labels)
        glance = labels is not None and cfg.glancing and self.training
        encoder_outputs, frame_inputs = None, None
        if glance:
            attention_mask = self.model.source_mask(input_ids, attention_mask, inputs_embeds)
            embeds = self.model.shared(input_ids) if inputs_embeds is None else inputs_embeds
            encoder_outputs = self.model.encoder(embeds, attention_mask, output_attentions, output_hidden_states)
            frame_inputs = self.glanced_frame_inputs(encoder_outputs, attention_mask, labels, training_step)
        outputs = self.model(input_ids if not glance else None, attention_mask, inputs_embeds if not glance else None,
                             encoder_outputs=encoder_outputs, frame_inputs=frame_inputs,
                             output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states or training_weak_ar, return_dict=True)
        logits = self.ctc_head(outputs.last_hidden_state)  # (batch, frames, vocab)

        loss = ctc = ar = frame_mask = unfit = None
        if labels is not None:
            attention_mask = self.model.source_mask(input_ids, attention_mask, inputs_embeds)
            frame_mask = self.frame_mask(attention_mask)
            ctc, fits = ctc_loss(logits, frame_mask, labels, cfg.blank_token_id)
            unfit, loss = (~fits).sum(), ctc
            if training_weak_ar:
                ar = self.weak_ar.loss(labels, self.weak_ar_memories(outputs, frame_mask, attention_mask),
                                       self.model.shared)
                loss = cfg.nar_loss_weight * ctc + (1 - cfg.nar_loss_weight) * ar
        if not output_hidden_states:
            outputs.decoder_hidden_states = None
        result = WeakNATOutput(
            loss=loss, logits=logits, decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions, cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states if output_hidden_states else None,
            encoder_attentions=outputs.encoder_attentions, ctc_loss=ctc, ar_loss=ar, frame_mask=frame_mask,
            num_unfit_pairs=unfit,
        )
        return result if return_dict else result.to_tuple()

    def check_labels(self, labels):
        """Map pad to -100, and reject left padding, blanks and targets longer than the weak AR positions."""
        labels = labels.masked_fill(labels == self.config.pad_token_id, -100)
        check_right_padded(labels != -100, "labels")
        if (labels == self.config.blank_token_id).any():
            raise ValueError(f"labels contain the CTC blank id {self.config.blank_token_id}")
        if labels.shape[1] > self.config.max_frames:
            raise ValueError(f"labels have {labels.shape[1]} tokens; the model allows at most {self.config.max_frames}")
        return labels

    def glanced_frame_inputs(self, encoder_outputs, attention_mask, labels, training_step):
        """Glancing: a no-grad pass predicts, then some frames get their aligned reference token as input."""
        upsampled, frame_mask = self.model.upsampler(encoder_outputs.last_hidden_state, attention_mask)
        with torch.no_grad():
            first = self.model(attention_mask=attention_mask, encoder_outputs=encoder_outputs, return_dict=True)
            frame_logits = self.ctc_head(first.last_hidden_state)
        return glancing_frame_inputs(upsampled, frame_mask, frame_logits, labels,
                                     self.config.glancing_ratio(training_step), self.config.blank_token_id,
                                     self.model.shared)

    def weak_ar_memories(self, outputs, frame_mask, attention_mask):
        """The hidden states the weak AR decoders read this step: a random subset of NAR layers (+ the encoder)."""
        cfg = self.config
        layers = sample_weak_ar_layers(cfg.decoder_layers, cfg.num_weak_ar_partners())
        # decoder_hidden_states[0] is the decoder input; layer i's output is at i + 1
        memories = [(i, outputs.decoder_hidden_states[i + 1], frame_mask) for i in layers]
        if cfg.weak_ar_on_encoder:
            memories.append((cfg.decoder_layers, outputs.encoder_last_hidden_state, attention_mask.bool()))
        return memories

    @torch.inference_mode()
    def generate(self, input_ids=None, attention_mask=None, num_beams: int = 1, num_return_sequences: int = 1,
                 beam_token_candidates: int | None = None, inputs_embeds=None) -> torch.LongTensor:
        """Translate in one forward pass. Returns right-padded target ids, shape `(batch * num_return_sequences, len)`.

        Greedy (num_beams=1): per-frame argmax on the valid frames, collapse repeats, drop blanks.
        num_beams > 1: CTC prefix beam search (no language model); `beam_token_candidates` limits the tokens tried
        per frame (default: 2 * num_beams). Rows whose source has no real token (an empty sentence is just `</s>`)
        translate to an empty sequence.
        """
        if num_beams < 1 or not 1 <= num_return_sequences <= num_beams:
            raise ValueError(f"Need num_beams >= 1 and 1 <= num_return_sequences <= num_beams, got {num_beams}, "
                             f"{num_return_sequences}")
        cfg = self.config
        attention_mask = self.model.source_mask(input_ids, attention_mask, inputs_embeds)
        hidden = self.model(input_ids, attention_mask, inputs_embeds, return_dict=True).last_hidden_state
        frame_mask = self.frame_mask(attention_mask)
        if input_ids is not None:  # an empty sentence has no content token: define its translation as empty
            content = attention_mask.bool() & ~torch.isin(input_ids, input_ids.new_tensor(
                [t for t in (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) if t is not None]))
            frame_mask = frame_mask & content.any(1, keepdim=True)
        valid_logits = self.ctc_head(hidden[frame_mask])  # (valid frames, vocab): padded frames cost nothing
        if num_beams == 1:  # argmax needs no softmax
            frame_ids = torch.full(frame_mask.shape, cfg.blank_token_id, dtype=torch.long, device=hidden.device)
            frame_ids[frame_mask] = valid_logits.argmax(-1)
            return collapse_repeats_and_blanks(frame_ids, frame_mask, cfg.blank_token_id, cfg.pad_token_id)
        log_probs = torch.zeros(*frame_mask.shape, cfg.vocab_size, device=hidden.device)
        log_probs[frame_mask] = F.log_softmax(valid_logits.float(), -1)
        sequences, _ = ctc_prefix_beam_search(log_probs, frame_mask.sum(1), cfg.blank_token_id, cfg.pad_token_id,
                                              num_beams, beam_token_candidates or 2 * num_beams)
        return sequences[:, :num_return_sequences].flatten(0, 1)


__all__ = ["WeakNATPreTrainedModel", "WeakNATModel", "WeakNATForConditionalGeneration", "WeakNATOutput"]
