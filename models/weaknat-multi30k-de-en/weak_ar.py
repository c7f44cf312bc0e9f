# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""The paper's contribution: weak autoregressive decoders that train a non-autoregressive one (Wang, Zheng and
Huang, EMNLP 2022, Section 3).

Reading order: the teacher-forcing inputs, one weak AR decoder, which NAR layers get a partner this step (layer
sampling), what each partner reads (its memory), the set of decoders (parameter sharing) and their loss, and how
that loss joins the NAR loss. Training only, but for one use at inference: a vanilla model loaded with its partners
can rank its length beam by its last layer's partner (`sequence_log_probs`). `export.py` writes a checkpoint without
any of it.

Nothing here knows how the NAR model makes its states: a memory is any `(states, mask)` pair of any length (the
upsampled frames of a CTC decoder, or the target-length states of a NAR decoder with length prediction). This file
imports no model file: the model passes in its decoder layer class (as mamba's `Block(mixer_cls=...)`) and its
shared embedding.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .transformers_compat import create_bidirectional_mask, create_causal_mask


def shift_tokens_right(labels, start_token_id, pad_token_id):
    """(batch, tgt_len) labels -> teacher-forcing inputs [start, y1 .. y_{n-1}]; -100 becomes pad."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_token_id)
    shifted[:, 0] = start_token_id
    return shifted


class WeakARDecoder(nn.Module):
    """One weak AR decoder: `config.weak_ar_layers` causal layers whose ONLY memory is one NAR layer's states.

    It never sees the encoder (paper Section 3): to predict the target it must rely on what the NAR decoder put in
    its states, so its gradients push the NAR decoder to carry target-side dependencies. No detach, on purpose.
    `layer_cls(config, is_causal=True)` builds a decoder layer whose forward is
    `(hidden, memory, self_attention_mask, memory_attention_mask) -> (hidden, ...)`.
    """

    def __init__(self, config, layer_cls, max_positions: int):
        super().__init__()
        self.config = config
        self.embed_positions = nn.Embedding(max_positions, config.d_model)
        self.layers = nn.ModuleList(layer_cls(config, is_causal=True) for _ in range(config.weak_ar_layers))
        self.final_layer_norm = nn.LayerNorm(config.d_model) if config.normalize_before else None

    def forward(self, decoder_input_ids, target_mask, memory, memory_mask, embed_tokens):
        """decoder_input_ids (batch, tgt_len); memory (batch, mem_len, d) -> logits (batch, tgt_len, vocab).

        The input and output projections are the model's shared `embed_tokens` (an embedding, scaled by its
        `embed_scale` if it has one): a partner adds no vocabulary weights. With `config.weak_ar_detach_embedding` it
        reads that embedding without sending it gradient.
        """
        weight = embed_tokens.weight.detach() if self.config.weak_ar_detach_embedding else embed_tokens.weight
        positions = torch.arange(decoder_input_ids.shape[1], device=decoder_input_ids.device)
        scale = getattr(embed_tokens, "embed_scale", 1.0)
        hidden = F.embedding(decoder_input_ids, weight, embed_tokens.padding_idx) * scale + self.embed_positions(positions)
        hidden = F.dropout(hidden, self.config.dropout, self.training)
        self_mask = create_causal_mask(self.config, hidden, target_mask)  # no cache: teacher forcing
        cross_mask = create_bidirectional_mask(self.config, hidden, memory_mask, encoder_hidden_states=memory)
        for layer in self.layers:
            hidden = layer(hidden, memory, self_mask, cross_mask)[0]
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        return F.linear(hidden, weight)


def sample_weak_ar_layers(num_layers: int, num_partners: int) -> list[int]:
    """The NAR layers whose weak AR partner trains this step: a random subset (paper Table 3, "layer dropout")."""
    return sorted(torch.randperm(num_layers)[:num_partners].tolist())


class Memory(NamedTuple):
    """What one partner reads: `states` (batch, mem_len, d) under `mask` (batch, mem_len), for decoder `partner`."""

    partner: int  # i < num NAR layers: NAR layer i's partner; num NAR layers: the encoder's partner
    states: torch.Tensor
    mask: torch.Tensor


class WeakARDecoders(nn.Module):
    """The set of weak AR decoders: one shared module (parameter sharing, paper Table 3) or one per NAR layer, plus
    one for the encoder output with `config.weak_ar_on_encoder` (the authors' code; not in the paper's text)."""

    def __init__(self, config, layer_cls, max_positions: int):
        super().__init__()
        self.config = config
        count = 1 if config.weak_ar_share_parameters else config.decoder_layers + int(config.weak_ar_on_encoder)
        self.decoders = nn.ModuleList(WeakARDecoder(config, layer_cls, max_positions) for _ in range(count))

    def decoder_for(self, partner: int) -> WeakARDecoder:
        return self.decoders[0 if self.config.weak_ar_share_parameters else partner]

    def memories(self, layer_states, layer_mask, encoder_states=None, encoder_mask=None) -> list[Memory]:
        """Sample this step's partners and give each the states it may read.

        layer_states: every NAR layer's output (batch, len, d), first layer first, under `layer_mask` (batch, len).
        NAR layer i's partner reads layer_states[i] and nothing else; the encoder output is read only by the
        encoder's own partner, with `weak_ar_on_encoder`.
        """
        num_layers = len(layer_states)
        layers = sample_weak_ar_layers(num_layers, self.config.num_weak_ar_partners())
        memories = [Memory(i, layer_states[i], layer_mask.bool()) for i in layers]
        if self.config.weak_ar_on_encoder:
            memories.append(Memory(num_layers, encoder_states, encoder_mask.bool()))
        return memories

    def token_losses(self, labels, memories: list[Memory], embed_tokens, label_smoothing: float = 0.0):
        """Per-partner cross-entropy summed over target tokens, and the token count: -> ((num memories,), count).

        For measuring, not training: the decoders of the memories run one by one."""
        inputs, target_mask = shift_tokens_right(labels, self.config.bos_token_id, self.config.pad_token_id), labels != -100
        sums = []
        for memory in memories:
            logits = self.decoder_for(memory.partner)(inputs, target_mask, memory.states, memory.mask, embed_tokens)
            sums.append(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                        label_smoothing=label_smoothing, reduction="sum"))
        return torch.stack(sums), target_mask.sum()

    def sequence_log_probs(self, tokens, target_mask, memory: Memory, embed_tokens):
        """The average log-probability that `memory.partner`'s decoder, reading `memory`, gives each row's tokens
        (rows, len) under `target_mask` (rows, len) -> (rows,); 0 for an empty row.

        Teacher forcing: one pass over every row, no loop over positions. At inference this ranks a vanilla model's
        length-beam candidates by its last layer's partner, each reading its own candidate's NAR states: noisy
        parallel decoding (Gu et al. 2018) with the AR scorer the model trained with, not a second model.
        """
        labels = tokens.masked_fill(~target_mask, -100)
        inputs = shift_tokens_right(labels, self.config.bos_token_id, self.config.pad_token_id)
        logits = self.decoder_for(memory.partner)(inputs, target_mask, memory.states, memory.mask, embed_tokens)
        picked = F.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
        return picked.masked_fill(~target_mask, 0.0).sum(1) / target_mask.sum(1).clamp(min=1)

    def dependence(self, labels, layer_states, layer_mask, embed_tokens) -> dict:
        """How much each partner relies on what its NAR layer says about *this* sentence (a diagnostic).

        Every NAR layer's partner is scored twice on the same targets: reading its own sentence's layer states, and
        reading another sentence's (the batch rolled by one, with that sentence's mask). `other - own`, in nats per
        token, is near 0 when a partner ignores the NAR states (a plain language model) and grows as it leans on
        them, which is the paper's mechanism. Returns sums over target tokens (`own`, `other`: (layers,)) and
        `tokens`, so that batches add up. Needs a batch of at least two sentences.
        """
        if labels.shape[0] < 2:
            raise ValueError("the partner-dependence diagnostic needs at least two sentences per batch")
        own = [Memory(i, states, layer_mask.bool()) for i, states in enumerate(layer_states)]
        other = [Memory(m.partner, m.states.roll(1, 0), m.mask.roll(1, 0)) for m in own]
        own_sums, tokens = self.token_losses(labels, own, embed_tokens)
        other_sums, _ = self.token_losses(labels, other, embed_tokens)
        return {"own": own_sums, "other": other_sums, "tokens": tokens}

    def loss(self, labels, memories: list[Memory], embed_tokens):
        """Label-smoothed cross-entropy of each partner, combined by `config.weak_ar_loss_reduction`.

        labels (batch, tgt_len), right-padded with -100. Partners that share parameters run as one batch (one big
        matmul); their memories are right-padded to the longest (the padding is masked out).
        """
        cfg = self.config
        inputs = shift_tokens_right(labels, cfg.bos_token_id, cfg.pad_token_id)
        target_mask = labels != -100
        groups: dict[int, list[Memory]] = {}
        for memory in memories:
            groups.setdefault(id(self.decoder_for(memory.partner)), []).append(memory)
        total, count = 0.0, 0
        for group in groups.values():
            n, width = len(group), max(m.states.shape[1] for m in group)
            states = torch.cat([F.pad(m.states, (0, 0, 0, width - m.states.shape[1])) for m in group])
            mask = torch.cat([F.pad(m.mask, (0, width - m.mask.shape[1])) for m in group])
            logits = self.decoder_for(group[0].partner)(inputs.repeat(n, 1), target_mask.repeat(n, 1), states, mask,
                                                        embed_tokens)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.repeat(n, 1).flatten(), ignore_index=-100,
                                   label_smoothing=cfg.label_smoothing)
            total, count = total + loss * n, count + n
        return total / count if cfg.weak_ar_loss_reduction == "mean" else total


def multitask_loss(nar_loss, ar_loss, nar_loss_weight: float):
    """The paper's training objective: `lambda * L_NAR + (1 - lambda) * L_AR` (lambda:
    `config.nar_loss_weight_at(step)`, which is `nar_loss_weight` unless a warm-in ramps it down from 1)."""
    return nar_loss_weight * nar_loss + (1 - nar_loss_weight) * ar_loss


__all__ = ["WeakARDecoder", "WeakARDecoders", "Memory", "sample_weak_ar_layers", "shift_tokens_right",
           "multitask_loss"]
