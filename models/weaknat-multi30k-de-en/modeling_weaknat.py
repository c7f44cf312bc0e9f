# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""Non-autoregressive Transformer (CTC, or vanilla with length prediction) with auxiliary weak AR decoders (Wang,
Zheng and Huang, EMNLP 2022).

Reading order (the Transformer layers are in `layers.py`, CTC's upsampler in `ctc.py`): encoder, NAR decoder, then
the public models: `WeakNATModel` (encode, then upsample (CTC) or predict the length (vanilla, `length_prediction.py`)
and decode) and `WeakNATForConditionalGeneration` (output head, the training losses' wiring, `generate`, whose CTC
decoding is in `ctc_generation.py`). Shapes use
batch, src_len, frames (decoder positions: upsample_ratio * src_len for CTC, the target length for vanilla), tgt_len.
The paper's weak AR decoders live in `weak_ar.py` and glancing in `glancing.py`; both only run in training, and
the weak AR decoders exist only while `config.weak_ar_layers > 0` (`export.py` writes a checkpoint without them).
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutput, ModelOutput, Seq2SeqModelOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import can_return_tuple, logging

from .configuration_weaknat import WeakNATConfig
from .ctc import WeakNATUpsampler, ctc_loss
from .ctc_generation import check_blank_not_suppressed, ctc_generate
from .generation import finish_generation, prepare_generation
from .glancing import glancing_frame_inputs, glancing_target_inputs
from .layers import WeakNATDecoderLayer, WeakNATEncoderLayer, WeakNATScaledEmbedding, float32_linear
from .length_prediction import WeakNATLengthPredictor, vanilla_decoder_inputs, vanilla_generate, vanilla_loss_terms
from .saved_files import check_saved_files
from .static_shapes import static_ctc_generate, use_static_shapes
from .transformers_compat import create_bidirectional_mask, init
from .weak_ar import WeakARDecoders, multitask_loss

logger = logging.get_logger(__name__)


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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, after checking a local folder's files: a damaged one (truncated JSON,
        cut weights) is an OSError naming it and its fault (`saved_files.py`)."""
        if pretrained_model_name_or_path is not None and os.path.isdir(pretrained_model_name_or_path):
            check_saved_files(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

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


def checked_source_mask(config: WeakNATConfig, input_ids=None, attention_mask=None, inputs_embeds=None):
    """Validate the source (length, right padding, a token per row) and return its (batch, src_len) mask."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids and inputs_embeds")
    batch, src_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    limit = config.max_position_embeddings
    if src_len > limit:
        raise ValueError(f"Source has {src_len} tokens but the model has max_position_embeddings={limit}; "
                         "truncate the input (tokenizer(..., truncation=True, max_length=...))")
    device = (input_ids if input_ids is not None else inputs_embeds).device
    if attention_mask is None:
        return torch.ones(batch, src_len, dtype=torch.long, device=device)
    left_padded = empty_row = torch.zeros((), dtype=torch.bool, device=attention_mask.device)
    if src_len > 1:  # check_right_padded's test
        left_padded = (attention_mask[:, 1:].long() > attention_mask[:, :-1].long()).any()
    if src_len:
        empty_row = ~attention_mask.bool().any(1).all()
    left_padded, empty_row = torch.stack((left_padded, empty_row)).tolist()  # one host sync for both checks
    if left_padded:
        raise ValueError("attention_mask must be right-padded (padding after the tokens); "
                         "set tokenizer.padding_side='right'")
    if empty_row:
        raise ValueError("Every row needs at least one source token (an empty sentence encodes as '</s>')")
    return attention_mask


class WeakNATModel(WeakNATPreTrainedModel):
    """Encoder + upsampler (CTC) or length predictor (vanilla) + NAR decoder. `last_hidden_state` holds the decoder
    states (batch, frames, d_model): CTC frames, or a vanilla model's positions at its predicted target lengths."""

    def __init__(self, config: WeakNATConfig):
        super().__init__(config)
        scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.shared = WeakNATScaledEmbedding(config.vocab_size, config.d_model, config.pad_token_id, scale)
        self.encoder = WeakNATEncoder(config)
        self.upsampler = WeakNATUpsampler(config) if config.is_ctc else None
        self.length_predictor = None if config.is_ctc else WeakNATLengthPredictor(config)
        self.decoder = WeakNATDecoder(config)
        self.post_init()

    def decoder_inputs(self, encoder_states, source_mask, input_ids=None, inputs_embeds=None, target_lengths=None):
        """-> (decoder inputs (batch, frames, d), their mask (batch, frames), length logits (vanilla) or None).

        CTC: the upsampled frames. Vanilla (`length_prediction.vanilla_decoder_inputs`): inputs at `target_lengths`
        (the reference's in training), else at the predicted lengths."""
        if self.upsampler is not None:
            return (*self.upsampler(encoder_states, source_mask), None)
        return vanilla_decoder_inputs(self, encoder_states, source_mask, input_ids, inputs_embeds, target_lengths)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=False,
               output_hidden_states=False) -> tuple[BaseModelOutput, torch.Tensor]:
        """Validate, embed and encode the source: -> (encoder outputs, source mask (batch, src_len))."""
        attention_mask = checked_source_mask(self.config, input_ids, attention_mask, inputs_embeds)
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
        frames, frame_mask, _ = self.decoder_inputs(encoder_states, attention_mask, input_ids, inputs_embeds)
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
    loss (`()`): `lambda * nar_loss + (1 - lambda) * ar_loss`, lambda = `config.nar_loss_weight_at(training_step)`,
        nar_loss = `ctc_loss` (CTC) or `token_loss + length_loss_factor * length_loss` (vanilla); just nar_loss
        without weak AR decoders or outside training.
    logits (`(batch, frames, vocab)`): CTC frame logits or vanilla logits per target position; positions beyond
        `frame_mask` are padding. length_logits (`(batch, 2 * max_length_offset + 1)`, vanilla): over `tgt - src`.
    ctc_loss (CTC), token_loss and length_loss (vanilla), ar_loss (`()`): the named terms (with labels; `ar_loss`
        while the weak AR decoders train).
    frame_mask (`(batch, frames)` bool): valid positions (with labels, and always for vanilla, whose positions follow
        the predicted lengths; CTC without labels: `model.frame_mask(attention_mask)`).
    num_unfit_pairs (`()`): with labels, pairs left out of the NAR loss: CTC, targets that cannot fit their frames;
        vanilla, none (a length offset outside the classifier's range is clamped).
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
    token_loss: torch.FloatTensor | None = None
    length_loss: torch.FloatTensor | None = None
    length_logits: torch.FloatTensor | None = None


class WeakNATForConditionalGeneration(WeakNATPreTrainedModel, GenerationMixin):
    """The translator: WeakNATModel + output head (`ctc_head`, named for the CTC model; a vanilla model's per-position
    head), plus the weak AR decoders while `config.weak_ar_layers > 0`.

    `forward(input_ids, attention_mask, labels, training_step)` trains; `generate(input_ids, attention_mask, ...)`
    translates in one forward pass (CTC: greedy, prefix beam search with `num_beams > 1`, or sampling; vanilla:
    argmax at the predicted length, the length beam with `num_beams > 1`, or sampling), with transformers'
    `GenerationConfig` and keyword arguments (`generation.py`).
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

    def decoding_logits(self, hidden_states):
        """The output head as decoding reads it: (..., d_model) decoder states -> (..., vocab) float32 logits.

        A half-precision model (`from_pretrained(..., dtype=torch.bfloat16)`, or under autocast) runs its network in
        that dtype, but the logits that greedy argmax, sampling and beam search read are computed in float32, as
        transformers' own `generate` reads float32 logits: a bfloat16 logit between 8 and 16 is rounded to a
        multiple of 0.0625, enough to flip a frame's near-tie (docs/usage.md, "Half precision"). A head that is not a
        plain float `nn.Linear` (e.g. after `torch.ao.quantization.quantize_dynamic`) runs as it is."""
        weight = self.ctc_head.weight
        if not isinstance(weight, torch.Tensor):  # a quantized head: `weight` is a method, the module knows best
            return self.ctc_head(hidden_states).float()
        return float32_linear(hidden_states, weight)

    def frame_mask(self, attention_mask):
        """(batch, src_len) source mask -> (batch, frames) mask of the valid CTC frames."""
        if self.model.upsampler is None:
            raise ValueError("A vanilla model's positions follow its lengths: read the forward output's `frame_mask`")
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
        encoder_outputs, source_mask, frames, frame_mask, length_logits, labels = self.nar_inputs(
            input_ids, attention_mask, inputs_embeds, labels, output_attentions, output_hidden_states)
        encoder_states = encoder_outputs.last_hidden_state
        if training and self.config.glancing:
            frames = self.glance(frames, frame_mask, encoder_states, source_mask, labels, training_step)
        nar_weight = self.config.nar_loss_weight_at(training_step)
        warming_in = self.config.weak_ar_warmup_steps > 0 and nar_weight >= 1.0  # a warm-in starts without partners
        partners_train = training and self.weak_ar is not None and not warming_in
        decoded = self.model.decoder(frames, frame_mask, encoder_states, source_mask, output_attentions,
                                     output_hidden_states, return_layer_states=partners_train)
        logits = self.ctc_head(decoded.last_hidden_state)  # (batch, frames, vocab)
        terms = (self.loss_terms(logits, frame_mask, labels, decoded.layer_states, encoder_states, source_mask,
                                 nar_weight, length_logits) if labels is not None else {})
        return WeakNATOutput(
            logits=logits, decoder_hidden_states=decoded.hidden_states, decoder_attentions=decoded.attentions,
            cross_attentions=decoded.cross_attentions, encoder_last_hidden_state=encoder_states,
            encoder_hidden_states=encoder_outputs.hidden_states, encoder_attentions=encoder_outputs.attentions,
            frame_mask=frame_mask if labels is not None or length_logits is not None else None,
            length_logits=length_logits, **terms,
        )

    @torch.no_grad()
    def weak_ar_dependence(self, input_ids, attention_mask, labels) -> dict:
        """The partner-dependence diagnostic (`WeakARDecoders.dependence`) on one batch, without dropout or glancing:
        per NAR layer, its partner's summed token loss reading its own sentence's states vs another sentence's."""
        was_training = self.training
        self.eval()
        encoder_outputs, source_mask, frames, frame_mask, _, labels = self.nar_inputs(
            input_ids, attention_mask, None, self.check_labels(labels))
        encoder_states = encoder_outputs.last_hidden_state
        decoded = self.model.decoder(frames, frame_mask, encoder_states, source_mask, return_layer_states=True)
        result = self.weak_ar.dependence(labels, decoded.layer_states, frame_mask, self.model.shared)
        self.train(was_training)
        return result

    def nar_inputs(self, input_ids, attention_mask, inputs_embeds, labels, output_attentions=False,
                   output_hidden_states=False):
        """Encode, then the decoder inputs (`WeakNATModel.decoder_inputs`; vanilla: at the labels' lengths, the labels
        cut to them) -> (encoder outputs, source mask, inputs, mask, length logits, labels)."""
        encoder_outputs, source_mask = self.model.encode(input_ids, attention_mask, inputs_embeds, output_attentions,
                                                         output_hidden_states)
        lengths = None if labels is None or self.config.is_ctc else (labels != -100).sum(1)
        frames, frame_mask, length_logits = self.model.decoder_inputs(
            encoder_outputs.last_hidden_state, source_mask, input_ids, inputs_embeds, lengths)
        labels = labels if lengths is None else labels[:, : frames.shape[1]]
        return encoder_outputs, source_mask, frames, frame_mask, length_logits, labels

    def check_labels(self, labels):
        """Map pad to -100, and reject left padding, blanks and targets longer than the weak AR positions."""
        labels = labels.masked_fill(labels == self.config.pad_token_id, -100)
        check_right_padded(labels != -100, "labels")
        if self.config.is_ctc and (labels == self.config.blank_token_id).any():
            raise ValueError(f"labels contain the CTC blank id {self.config.blank_token_id}")
        if labels.shape[1] > self.config.max_frames:
            raise ValueError(f"labels have {labels.shape[1]} tokens; the model allows at most {self.config.max_frames}")
        if not self.config.is_ctc and not (labels != -100).any(1).all():
            raise ValueError("Every label row needs at least one token (a vanilla NAR decodes at least one position)")
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
        ratio = self.config.glancing_ratio(training_step)
        if not self.config.is_ctc:  # the reference itself, position by position
            return glancing_target_inputs(frames, frame_mask, guess, labels, ratio, self.model.shared)
        return glancing_frame_inputs(frames, frame_mask, guess, labels, ratio, self.config.blank_token_id,
                                     self.model.shared)

    def loss_terms(self, logits, frame_mask, labels, layer_states, encoder_states, source_mask,
                   nar_weight: float, length_logits=None) -> dict:
        """The named training losses: `ctc_loss` (CTC) or `token_loss` and `length_loss` (vanilla), `ar_loss` (when
        `layer_states` are given) and their `loss`.

        layer_states: the NAR decoder layers' outputs, which the weak AR decoders read (`weak_ar.py`).
        """
        cfg = self.config
        if cfg.is_ctc:
            nar, fits = ctc_loss(logits, frame_mask, labels, cfg.blank_token_id)
            terms = {"loss": nar, "ctc_loss": nar, "num_unfit_pairs": (~fits).sum()}
        else:  # length_prediction.py
            terms = vanilla_loss_terms(logits, labels, length_logits, source_mask, frame_mask, cfg)
            nar = terms["loss"]
        if layer_states is not None:
            memories = self.weak_ar.memories(layer_states, frame_mask, encoder_states, source_mask)
            terms["ar_loss"] = self.weak_ar.loss(labels, memories, self.model.shared)
            terms["loss"] = multitask_loss(nar, terms["ar_loss"], nar_weight)
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
    def generate(self, inputs=None, generation_config=None, synced_gpus=None, beam_token_candidates=None,
                 drop_repeats=None, target_lengths=None, **kwargs):
        r"""Translate in one forward pass, with transformers' `generate` arguments, config and output classes.

        inputs / input_ids (`torch.LongTensor` of shape `(batch, src_len)`): right-padded source with
            `attention_mask` (`tokenizer(texts, padding=True, return_tensors="pt")`), or `inputs_embeds`.
        generation_config (`GenerationConfig`, optional): overrides `self.generation_config` (saved with every
            export as `generation_config.json`); keyword arguments override both.
        beam_token_candidates (`int`, optional): CTC: tokens tried per frame by beam search (default `2 * num_beams`).
        drop_repeats (`bool`, optional): vanilla: merge adjacent identical output tokens (default: the generation
            config's `drop_repeats`, else `config.drop_repeats`, False).
        target_lengths (`torch.LongTensor` of shape `(batch,)`, optional): vanilla: decode each sentence at this
            length instead of the predicted one (e.g. the reference's: the oracle length), with `num_beams=1`.
        beam_search_backend, length_beam, length_beam_ranking (`str`, optional): this model's own options, as
            keywords or `generation_config` entries: which CTC beam search runs (`ctc.choose_beam_search_backend`);
            vanilla: which lengths the length beam decodes (`"top_k"` or fairseq's `"window"`) and how it ranks them
            (`"joint"`, the default, `"average"`, `"average_plus_length"`, or `"partner"`: the weak AR partner of the
            last layer, for a model loaded with its partners; `length_prediction.rank_length_beam`).

        `num_beams=1`: each valid frame's argmax, repeats collapsed, blanks dropped; `num_beams > 1`: CTC prefix beam
        search; `do_sample=True`: each frame drawn from its warped distribution, then collapsed. Vanilla: the most
        probable length, one argmax per position (`num_beams > 1`: the length beam, the `num_beams` most probable
        lengths decoded at once, ranked by their joint log-probability; `do_sample=True`: each position drawn at the
        most probable length). A one-pass model
        does not stop early: the frames fix the length, `max_length` / `max_new_tokens` only truncate. An empty
        sentence (`</s>` alone) translates to an empty sequence. docs/usage.md ("Generation arguments") lists them all.
        `cache_implementation="static"` or a `compile_config` (transformers' switches): a CTC model pads the source to
        a bucketed length and runs its pass compiled (`static_shapes.py`), with the same tokens.

        Returns: `torch.LongTensor` (batch * num_return_sequences, len), right-padded with `pad_token_id`, or with
        `return_dict_in_generate=True` a `GenerateEncoderDecoderOutput` / `GenerateBeamEncoderDecoderOutput`
        (`sequences_scores`: CTC prefix log-probabilities or vanilla average log-probabilities, best first; `scores`
        / `logits`: one (batch, vocab) tensor per frame (vanilla beam: (batch * num_beams, vocab)), frames past the
        source's are padding).
        """
        request = prepare_generation(self, inputs, generation_config, kwargs)
        if target_lengths is not None and self.config.is_ctc:
            raise ValueError("target_lengths is for vanilla models: a CTC model's output length follows its frames")
        if self.config.is_ctc:
            check_blank_not_suppressed(request, self.config.blank_token_id)
        if request.is_empty:
            device = (request.input_ids if request.input_ids is not None else request.inputs_embeds).device
            return finish_generation(request, *request.empty_hypotheses(device))
        if use_static_shapes(self, request):  # `cache_implementation="static"` or a `compile_config`
            source_mask = checked_source_mask(self.config, request.input_ids, request.attention_mask)
            return static_ctc_generate(self, request, source_mask, beam_token_candidates)
        encoder_outputs, source_mask = self.model.encode(request.input_ids, request.attention_mask,
                                                         request.inputs_embeds, request.output_attentions,
                                                         request.output_hidden_states)
        if not self.config.is_ctc:  # length_prediction.py
            return vanilla_generate(self, request, encoder_outputs, source_mask, drop_repeats, target_lengths)
        return ctc_generate(self, request, encoder_outputs, source_mask, beam_token_candidates)


__all__ = ["WeakNATPreTrainedModel", "WeakNATModel", "WeakNATForConditionalGeneration", "WeakNATOutput"]
