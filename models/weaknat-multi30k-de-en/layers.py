# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""The Transformer's building blocks, shared by the NAR encoder and decoder and the weak AR decoders: attention
(through transformers' attention interface), feed-forward, the residual + LayerNorm sublayer (post-LN as in the
paper, or pre-LN), the encoder and decoder layers, and the scaled token embedding."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_weaknat import WeakNATConfig
from .transformers_compat import attention_interface


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention; query (batch, heads, q_len, head_dim), additive mask (batch, 1, q_len, k_len)."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.dropout(F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype), dropout, module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights  # (batch, q_len, heads, head_dim)


def float32_linear(x, weight):
    """`F.linear(x, weight)` (no bias) in float32 whatever the dtypes of x (..., d_in) and weight (d_out, d_in), and
    outside any autocast: the output head and the length predictor as decoding reads them -> (..., d_out) float32.

    Autocast is switched off on CPU and CUDA, the devices this package trains under autocast on; whether
    `torch.autocast` accepts other device types depends on the torch version, so there it is left alone."""
    if x.device.type in ("cpu", "cuda"):
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), weight.float())
    return F.linear(x.float(), weight.float())


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
        attention = attention_interface(self.config._attn_implementation, eager_attention_forward)
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


__all__ = ["float32_linear", "WeakNATAttention", "WeakNATFeedForward", "WeakNATSublayer", "WeakNATEncoderLayer",
           "WeakNATDecoderLayer", "WeakNATScaledEmbedding", "eager_attention_forward"]
