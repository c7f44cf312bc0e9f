# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""CTC non-autoregressive Transformer with auxiliary weak AR decoders (Wang, Zheng and Huang, EMNLP 2022).

Reading order: attention and layers, upsampling, encoder, NAR decoder, then the public models: `WeakNATModel`
(encode, then upsample and decode) and `WeakNATForConditionalGeneration` (CTC head, the training losses' wiring,
`generate`). Shapes use batch, src_len, frames (= upsample_ratio * src_len) and tgt_len.
The paper's weak AR decoders live in `weak_ar.py` and glancing in `glancing.py`; both only run in training, and
the weak AR decoders exist only while `config.weak_ar_layers > 0` (`export.py` writes a checkpoint without them).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, ModelOutput, Seq2SeqModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple, logging

from .configuration_weaknat import WeakNATConfig
from .ctc import ctc_greedy_decode, ctc_loss, ctc_prefix_beam_search, ctc_sample_decode
from .generation import finish_generation, prepare_generation, process_scores, warp_for_sampling
from .glancing import glancing_frame_inputs
from .weak_ar import WeakARDecoders, multitask_loss

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
        d = config.d_model
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        for projection in (self.q_proj, self.k_proj, self.v_proj):
            projection.xavier_gain = 2**-0.5  # fairseq's MultiheadAttention, used by `init_scheme="fairseq"`

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
        linear = self.method == "linear"
        self.proj = nn.Linear(config.d_model, config.upsample_ratio * config.d_model) if linear else None

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
    layer_states: tuple[torch.FloatTensor, ...] | None = None  # each layer's output: what the weak AR decoders read


class WeakNATDecoder(nn.Module):
    """The NAR decoder: non-causal layers over all frames at once, cross-attending to the encoder."""

    def __init__(self, config: WeakNATConfig):
        super().__init__()
        self.config = config
        self.embed_positions = nn.Embedding(config.max_frames, config.d_model)
        self.layers = nn.ModuleList(WeakNATDecoderLayer(config) for _ in range(config.decoder_layers))
        self.final_layer_norm = nn.LayerNorm(config.d_model) if config.normalize_before else None

    def forward(self, frame_inputs, frame_mask, encoder_states, encoder_mask, output_attentions=False,
                output_hidden_states=False, return_layer_states=False):
        """frame_inputs (batch, frames, d); frame_mask (batch, frames); encoder_states (batch, src_len, d).

        `output_hidden_states`: the frame inputs and every layer's output, for the user. `return_layer_states`:
        every layer's output as `layer_states`, for the weak AR decoders (training only, never in the output).
        """
        positions = torch.arange(frame_inputs.shape[1], device=frame_inputs.device)
        hidden = F.dropout(frame_inputs + self.embed_positions(positions), self.config.dropout, self.training)
        self_mask = create_bidirectional_mask(self.config, hidden, frame_mask)
        cross_mask = create_bidirectional_mask(self.config, hidden, encoder_mask, encoder_hidden_states=encoder_states)
        states = [hidden] if output_hidden_states or return_layer_states else None
        all_self, all_cross = ((), ()) if output_attentions else (None, None)
        for layer in self.layers:
            hidden, self_weights, cross_weights = layer(hidden, encoder_states, self_mask, cross_mask)
            if states is not None:
                states.append(hidden)
            if output_attentions:
                all_self, all_cross = all_self + (self_weights,), all_cross + (cross_weights,)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        return WeakNATDecoderOutput(hidden, tuple(states) if output_hidden_states else None, all_self, all_cross,
                                    tuple(states[1:]) if return_layer_states else None)


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
    _input_embed_layer = "shared"  # transformers' get/set_input_embeddings then find `shared` and `model.shared`

    def _init_weights(self, module):
        """transformers' default (N(0, init_std)), or with `init_scheme="fairseq"` the authors' fairseq scheme:
        embeddings N(0, d_model^-1/2) (padding row 0), linear layers Xavier-uniform (gain `xavier_gain`, 2^-1/2 for
        query/key/value), biases 0."""
        if self.config.init_scheme != "fairseq":
            return super()._init_weights(module)
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight, gain=getattr(module, "xavier_gain", 1.0))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.d_model**-0.5)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        else:
            super()._init_weights(module)  # LayerNorms: weight 1, bias 0

    def output_flags(self, output_attentions=None, output_hidden_states=None) -> tuple[bool, bool]:
        """The `output_*` arguments with the config's defaults filled in."""
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        if output_attentions and cfg._attn_implementation not in (None, "eager"):
            logger.warning_once(  # as transformers' own sdpa path does: sdpa/flash/flex compute no probabilities
                f"output_attentions=True needs attn_implementation='eager', but this model uses "
                f"'{cfg._attn_implementation}': the returned attentions are not attention probabilities (None for "
                "sdpa). Load it with attn_implementation='eager' or call model.set_attn_implementation('eager').")
        return output_attentions, output_hidden_states


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

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=False,
               output_hidden_states=False) -> tuple[BaseModelOutput, torch.Tensor]:
        """Validate, embed and encode the source: -> (encoder outputs, source mask (batch, src_len))."""
        attention_mask = self.source_mask(input_ids, attention_mask, inputs_embeds)
        inputs_embeds = self.shared(input_ids) if inputs_embeds is None else inputs_embeds
        return self.encoder(inputs_embeds, attention_mask, output_attentions, output_hidden_states), attention_mask

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, encoder_outputs=None,
                output_attentions=None, output_hidden_states=None, **kwargs) -> Seq2SeqModelOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, src_len)`): source tokens, right-padded.
        attention_mask (`torch.LongTensor` of shape `(batch, src_len)`): 1 for tokens, 0 for padding.
        encoder_outputs (`BaseModelOutput`, optional): precomputed encoder outputs (`encode` returns them).
        Other keyword arguments (e.g. `decoder_inputs_embeds`, which generic seq2seq callers pass) are ignored:
        a NAR decoder has no decoder input tokens.
        """
        output_attentions, output_hidden_states = self.output_flags(output_attentions, output_hidden_states)
        if encoder_outputs is None:
            encoder_outputs, attention_mask = self.encode(input_ids, attention_mask, inputs_embeds, output_attentions,
                                                          output_hidden_states)
        encoder_states = encoder_outputs.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(encoder_states.shape[:2], dtype=torch.long, device=encoder_states.device)
        frames, frame_mask = self.upsampler(encoder_states, attention_mask)
        decoded = self.decoder(frames, frame_mask, encoder_states, attention_mask, output_attentions,
                               output_hidden_states)
        return Seq2SeqModelOutput(
            last_hidden_state=decoded.last_hidden_state, decoder_hidden_states=decoded.hidden_states,
            decoder_attentions=decoded.attentions, cross_attentions=decoded.cross_attentions,
            encoder_last_hidden_state=encoder_states, encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


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


class WeakNATForConditionalGeneration(WeakNATPreTrainedModel, GenerationMixin):
    """The translator: WeakNATModel + CTC head, plus the weak AR decoders while `config.weak_ar_layers > 0`.

    `forward(input_ids, attention_mask, labels, training_step)` trains; `generate(input_ids, attention_mask, ...)`
    translates in one forward pass (CTC greedy, prefix beam search with `num_beams > 1`, or sampling with
    `do_sample=True`), with transformers' `GenerationConfig` and keyword arguments (`generation.py`).
    """

    _tied_weights_keys = {"ctc_head.weight": "model.shared.weight"}
    # The loss is a mean over pairs, not a sum to be divided by the Trainer's `num_items_in_batch`: without this,
    # transformers' Trainer would see `**kwargs` in `forward` and skip its gradient-accumulation scaling
    accepts_loss_kwargs = False

    def __init__(self, config: WeakNATConfig):
        super().__init__(config)
        self.model = WeakNATModel(config)
        self.ctc_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # a weak AR decoder reads at most as many target positions as there are frames (CTC: tgt_len <= frames)
        self.weak_ar = WeakARDecoders(config, WeakNATDecoderLayer, config.max_frames) if config.uses_weak_ar else None
        self.post_init()
        self.generation_defaults()

    def get_output_embeddings(self):
        return self.ctc_head

    def set_output_embeddings(self, value):
        self.ctc_head = value

    def frame_mask(self, attention_mask):
        """(batch, src_len) source mask -> (batch, frames) mask of the valid CTC frames."""
        return self.model.upsampler.frame_mask(attention_mask)

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, training_step=None,
                output_attentions=None, output_hidden_states=None, **kwargs) -> WeakNATOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, src_len)`): source tokens, right-padded.
        attention_mask (`torch.LongTensor` of shape `(batch, src_len)`): 1 for tokens, 0 for padding.
        labels (`torch.LongTensor` of shape `(batch, tgt_len)`): target tokens, right-padded with -100 (or pad).
        training_step (`int`, optional): the optimizer step, which drives the glancing ratio schedule (and the weak AR
            warm-in, `weak_ar_warmup_steps`). Callers that do not pass it (transformers' Trainer / Seq2SeqTrainer)
            train with the glancing ratio of step 0, `glancing_start_ratio`, throughout (a warning says so once) and
            without the warm-in (`nar_loss_weight` from the start); `training/train.py` passes it.
        """
        output_attentions, output_hidden_states = self.output_flags(output_attentions, output_hidden_states)
        labels = self.check_labels(labels) if labels is not None else None
        training = labels is not None and self.training
        encoder_outputs, source_mask = self.model.encode(input_ids, attention_mask, inputs_embeds, output_attentions,
                                                         output_hidden_states)
        encoder_states = encoder_outputs.last_hidden_state
        frames, frame_mask = self.model.upsampler(encoder_states, source_mask)  # (batch, frames, d)
        if training and self.config.glancing:
            frames = self.glance(frames, frame_mask, encoder_states, source_mask, labels, training_step)
        nar_weight = self.config.nar_loss_weight_at(training_step)
        warming_in = self.config.weak_ar_warmup_steps > 0 and nar_weight >= 1.0  # a warm-in starts without partners
        partners_train = training and self.weak_ar is not None and not warming_in
        decoded = self.model.decoder(frames, frame_mask, encoder_states, source_mask, output_attentions,
                                     output_hidden_states, return_layer_states=partners_train)
        logits = self.ctc_head(decoded.last_hidden_state)  # (batch, frames, vocab)
        terms = (self.loss_terms(logits, frame_mask, labels, decoded.layer_states, encoder_states, source_mask,
                                 nar_weight) if labels is not None else {})
        return WeakNATOutput(
            logits=logits, decoder_hidden_states=decoded.hidden_states, decoder_attentions=decoded.attentions,
            cross_attentions=decoded.cross_attentions, encoder_last_hidden_state=encoder_states,
            encoder_hidden_states=encoder_outputs.hidden_states, encoder_attentions=encoder_outputs.attentions,
            frame_mask=frame_mask if labels is not None else None, **terms,
        )

    @torch.no_grad()
    def weak_ar_dependence(self, input_ids, attention_mask, labels) -> dict:
        """The partner-dependence diagnostic (`WeakARDecoders.dependence`) on one batch, without dropout or glancing:
        per NAR layer, its partner's summed token loss reading its own sentence's states vs another sentence's."""
        was_training = self.training
        self.eval()
        labels = self.check_labels(labels)
        encoder_outputs, source_mask = self.model.encode(input_ids, attention_mask)
        encoder_states = encoder_outputs.last_hidden_state
        frames, frame_mask = self.model.upsampler(encoder_states, source_mask)
        decoded = self.model.decoder(frames, frame_mask, encoder_states, source_mask, return_layer_states=True)
        result = self.weak_ar.dependence(labels, decoded.layer_states, frame_mask, self.model.shared)
        self.train(was_training)
        return result

    def check_labels(self, labels):
        """Map pad to -100, and reject left padding, blanks and targets longer than the weak AR positions."""
        labels = labels.masked_fill(labels == self.config.pad_token_id, -100)
        check_right_padded(labels != -100, "labels")
        if (labels == self.config.blank_token_id).any():
            raise ValueError(f"labels contain the CTC blank id {self.config.blank_token_id}")
        if labels.shape[1] > self.config.max_frames:
            raise ValueError(f"labels have {labels.shape[1]} tokens; the model allows at most {self.config.max_frames}")
        return labels

    def glance(self, frames, frame_mask, encoder_states, source_mask, labels, training_step):
        """Glancing (`glancing.py`): a no-grad pass predicts, then some frames get their aligned reference token."""
        with torch.no_grad():
            guess = self.ctc_head(self.model.decoder(frames, frame_mask, encoder_states, source_mask).last_hidden_state)
        if training_step is None:
            logger.warning_once(
                f"Glancing without `training_step` (transformers' Trainer does not pass it): the glancing ratio stays "
                f"at glancing_start_ratio={self.config.glancing_start_ratio} instead of annealing to "
                f"{self.config.glancing_end_ratio}. Pass forward(..., training_step=step) to follow the schedule.")
        return glancing_frame_inputs(frames, frame_mask, guess, labels, self.config.glancing_ratio(training_step),
                                     self.config.blank_token_id, self.model.shared)

    def loss_terms(self, logits, frame_mask, labels, layer_states, encoder_states, source_mask,
                   nar_weight: float) -> dict:
        """The named training losses: `ctc_loss`, `ar_loss` (when `layer_states` are given) and their `loss`.

        layer_states: the NAR decoder layers' outputs, which the weak AR decoders read (`weak_ar.py`).
        """
        cfg = self.config
        ctc, fits = ctc_loss(logits, frame_mask, labels, cfg.blank_token_id)
        terms = {"loss": ctc, "ctc_loss": ctc, "num_unfit_pairs": (~fits).sum()}
        if layer_states is not None:
            memories = self.weak_ar.memories(layer_states, frame_mask, encoder_states, source_mask)
            terms["ar_loss"] = self.weak_ar.loss(labels, memories, self.model.shared)
            terms["loss"] = multitask_loss(ctc, terms["ar_loss"], nar_weight)
        return terms

    def adjust_generation_fn(self, *args, **kwargs):
        """After `from_pretrained` loads `generation_config.json` (or, for exports made before it was saved, builds a
        generation config from `config.json`), fill in this model's defaults where unset (`generation_defaults`)."""
        super().adjust_generation_fn(*args, **kwargs)
        self.generation_defaults()

    def generation_defaults(self):
        """`max_length` = `config.max_frames` where unset: CTC emits at most one token per frame, so this bound never
        truncates, and transformers' model-agnostic default of 20 (which Seq2SeqTrainer writes into an unset
        `generation_config.max_length`) never applies. Marked as the model's own generation config (not one derived
        from config.json), so custom entries such as `beam_token_candidates` survive a save and load."""
        if self.generation_config is None:
            return
        if self.generation_config.max_length is None:
            self.generation_config.max_length = self.config.max_frames
        self.generation_config._from_model_config = False

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, synced_gpus=None, beam_token_candidates=None, **kwargs):
        r"""Translate in one forward pass, then CTC decoding; transformers' `generate` arguments and return types.

        inputs / input_ids (`torch.LongTensor` of shape `(batch, src_len)`): right-padded source tokens, with
            `attention_mask`; or `inputs_embeds`. Made by `tokenizer(texts, padding=True, return_tensors="pt")`.
        generation_config (`GenerationConfig`, optional): overrides `self.generation_config` (saved with every export
            as `generation_config.json`); keyword arguments override both, as in transformers.
        beam_token_candidates (`int`, optional): beam search tries the best N non-blank tokens per frame (default
            `2 * num_beams`); also read from a `generation_config` entry of that name.

        Decoding: `num_beams=1` takes each valid frame's argmax, collapses repeats and drops blanks (greedy);
        `num_beams > 1` runs CTC prefix beam search; `do_sample=True` draws each frame from its (temperature / top-k /
        top-p / ... warped) distribution with torch's RNG, then collapses. `suppress_tokens` and one-token
        `bad_words_ids` are masked in every frame first. A one-pass model does not stop early: the output length
        comes from the frames, and `max_length` / `max_new_tokens` only truncate it (the output holds no decoder start
        token, so both bound the same count). `min_length` / `min_new_tokens` rank shorter beam hypotheses last.
        Arguments that act on the steps of an autoregressive decoder (`prefix_allowed_tokens_fn`, `assistant_model`,
        `streamer`, `decoder_input_ids`, `repetition_penalty`, ...) raise a ValueError saying why; unknown arguments
        raise transformers' own ValueError. Every argument is in README.md ("Generation arguments").
        Rows whose source has no real token (an empty sentence is just `</s>`) translate to an empty sequence; an
        empty batch or a zero-length source gives an empty result without running the model.

        Returns: `torch.LongTensor` (batch * num_return_sequences, out_len), right-padded with `pad_token_id`; with
        `return_dict_in_generate=True` a `GenerateEncoderDecoderOutput` (greedy, sampling) or
        `GenerateBeamEncoderDecoderOutput` (beam search; with `output_scores`, `sequences_scores` = each hypothesis's
        CTC prefix log-probability, best first). `scores` / `logits`: one `(batch, vocab)` tensor per frame (what the
        decoder read / raw logits; frames past `frame_mask(attention_mask)` are padding). Attentions and hidden
        states: the single pass's, as one "step".
        """
        request = prepare_generation(self, inputs, generation_config, kwargs)
        cfg = self.config
        if cfg.blank_token_id in request.suppressed_token_ids:
            raise ValueError(f"The CTC blank (id {cfg.blank_token_id}) cannot be suppressed: every CTC output needs it")
        if request.is_empty:
            device = (request.input_ids if request.input_ids is not None else request.inputs_embeds).device
            return finish_generation(request, *request.empty_hypotheses(device))
        input_ids = request.input_ids
        encoder_outputs, source_mask = self.model.encode(input_ids, request.attention_mask, request.inputs_embeds,
                                                         request.output_attentions, request.output_hidden_states)
        outputs = self.model(attention_mask=source_mask, encoder_outputs=encoder_outputs,
                             output_attentions=request.output_attentions,
                             output_hidden_states=request.output_hidden_states)
        logits = self.ctc_head(outputs.last_hidden_state)  # (batch, frames, vocab); padded frames are masked out below
        frame_mask = self.frame_mask(source_mask)
        if input_ids is not None:  # an empty sentence has no content token: define its translation as empty
            special = [t for t in (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) if t is not None]
            content = source_mask.bool() & ~torch.isin(input_ids, input_ids.new_tensor(special))
            frame_mask = frame_mask & content.any(1, keepdim=True)
        frame_scores = process_scores(request, logits)
        blank, pad, scores = cfg.blank_token_id, request.pad_token_id, None
        if request.mode == "greedy":
            hypotheses = ctc_greedy_decode(frame_scores, frame_mask, blank, pad)[:, None]
        elif request.mode == "sample":
            frame_scores = warp_for_sampling(request, frame_scores)
            n = request.num_return_sequences
            samples = ctc_sample_decode(frame_scores.repeat_interleave(n, 0), frame_mask.repeat_interleave(n, 0),
                                        blank, pad)
            hypotheses = samples.view(request.batch_size, n, samples.shape[1])
        else:
            frame_scores = F.log_softmax(frame_scores.float(), -1)
            candidates = (beam_token_candidates or getattr(request.config, "beam_token_candidates", None)
                          or 2 * request.num_beams)
            hypotheses, scores = ctc_prefix_beam_search(frame_scores, frame_mask.sum(1), blank, pad,
                                                        request.num_beams, candidates)
        return finish_generation(request, hypotheses, scores, scores=frame_scores, logits=logits,
                                 encoder_outputs=encoder_outputs, decoder_outputs=outputs)


__all__ = ["WeakNATPreTrainedModel", "WeakNATModel", "WeakNATForConditionalGeneration", "WeakNATOutput"]
