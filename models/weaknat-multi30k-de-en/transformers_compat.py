# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""The transformers names that differ between the 4.x line (>= 4.57) and 5.x, resolved once, here.

Shipped as remote code next to every export (`export.REMOTE_CODE_FILES`), so an export loads with
`trust_remote_code=True` on transformers 4.57+ and 5.x alike. The package itself (training, tests) runs on 5.x; the
4.x side only has to load, generate and translate. Every other file imports what moved from this module and
nothing version-specific from transformers:

- `PreTrainedConfig`, `strict`: 5.x configs are dataclasses (fields declared as annotated class attributes, a
  `__post_init__(**kwargs)` hook, `huggingface_hub`'s `@strict` type checks). On 4.x, `PreTrainedConfig` is a
  `PretrainedConfig` subclass that gives such a class the same constructor (every field set from its keyword argument
  or its default, the rest handed to 4.x's own `__init__`, then `__post_init__`), and `strict` checks nothing.
- `init`: the weight initialisers (`transformers.initialization` on 5.x, which skip loaded weights; `torch.nn.init`).
- `create_bidirectional_mask` (5.x only) and `create_causal_mask` (whose signature changed): attention masks in the
  form the configured attention implementation expects.
- `attention_interface`: the attention function for `config._attn_implementation`.
- `TopHLogitsWarper`: 5.x only (`GenerationConfig.top_h`); None on 4.x, where no generation config sets `top_h`.
"""

import re

import torch
import transformers

TRANSFORMERS_VERSION = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())
TRANSFORMERS_V5 = TRANSFORMERS_VERSION >= (5, 0)
if TRANSFORMERS_VERSION < (4, 57):
    raise ImportError(f"This model's code needs transformers >= 4.57 (4.x) or 5.x; transformers "
                      f"{transformers.__version__} is installed: pip install -U 'transformers>=4.57'")

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402 - after the version check

if TRANSFORMERS_V5:
    from huggingface_hub.dataclasses import strict
    from transformers import initialization as init
    from transformers.configuration_utils import PreTrainedConfig
    from transformers.generation.logits_process import TopHLogitsWarper
    from transformers.masking_utils import create_bidirectional_mask
    from transformers.masking_utils import create_causal_mask as _create_causal_mask

    def create_causal_mask(config, inputs_embeds, attention_mask):
        """The causal (and padding) self-attention mask of a pass without cache (teacher forcing)."""
        return _create_causal_mask(config, inputs_embeds, attention_mask, None)

    def attention_interface(implementation, default):
        """The attention function registered for `implementation` (`default` for "eager")."""
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, default)

else:
    import copy
    import inspect

    from torch.nn import init
    from transformers.configuration_utils import PretrainedConfig
    from transformers.masking_utils import create_causal_mask as _create_causal_mask

    TopHLogitsWarper = None

    def strict(cls):
        """5.x checks field types with huggingface_hub's `@strict`; 4.x configs check nothing (the config's own
        `__post_init__` still checks every value)."""
        return cls

    class PreTrainedConfig(PretrainedConfig):
        """4.x's `PretrainedConfig` taking a 5.x-style config: the annotated class attributes of the subclasses are
        its fields. `Config(**kwargs)` sets each field from `kwargs` or its default, hands everything to 4.x's
        `__init__` (which keeps its own keys, e.g. `pad_token_id`, and sets the rest as attributes), then calls
        `__post_init__()`, as 5.x does."""

        def __init__(self, **kwargs):
            values = {name: copy.deepcopy(default) for name, default in self.field_defaults().items()}
            values.update(kwargs)
            super().__init__(**values)
            self.__post_init__()

        def __post_init__(self, **kwargs):
            """The subclass's checks run after `super().__post_init__(**kwargs)`, as on 5.x."""

        @classmethod
        def field_defaults(cls) -> dict:
            """{field: default} over the subclasses, base classes first."""
            defaults = {}
            for klass in reversed(cls.__mro__):
                if klass is PreTrainedConfig or not issubclass(klass, PreTrainedConfig):
                    continue
                for name in inspect.get_annotations(klass):
                    if name in vars(klass):
                        defaults[name] = vars(klass)[name]
            return defaults

    def create_bidirectional_mask(config, inputs_embeds, attention_mask, encoder_hidden_states=None):
        """5.x's `masking_utils.create_bidirectional_mask` (no cache, no mask functions) on 4.x: queries are
        `inputs_embeds`' positions, keys `encoder_hidden_states`' (cross-attention) or the same ones, and a key is
        seen where the 2D `attention_mask` is 1. Eager: an additive float mask (batch, 1, q_len, kv_len); sdpa and
        the others: a boolean one, or None without padding; flash: the 2D mask, or None; flex: a BlockMask."""
        keys = inputs_embeds if encoder_hidden_states is None else encoder_hidden_states
        batch, q_len, kv_len = inputs_embeds.shape[0], inputs_embeds.shape[1], keys.shape[1]
        implementation = config._attn_implementation or "eager"
        if attention_mask is None:
            attention_mask = torch.ones(batch, kv_len, dtype=torch.long, device=inputs_embeds.device)
        attention_mask = attention_mask.to(inputs_embeds.device)
        padded = not bool(attention_mask.bool().all())
        if "flash" in implementation:
            return attention_mask if padded else None
        if implementation == "flex_attention":
            from transformers.integrations.flex_attention import make_flex_block_causal_mask

            return make_flex_block_causal_mask(attention_mask, query_length=q_len, is_causal=False)
        mask = attention_mask.bool()[:, None, None, :].expand(batch, 1, q_len, kv_len)
        if implementation == "eager":
            zero = torch.zeros((), dtype=keys.dtype, device=mask.device)
            return torch.where(mask, zero, torch.finfo(keys.dtype).min)
        return mask if padded else None

    def create_causal_mask(config, inputs_embeds, attention_mask):
        """The causal (and padding) self-attention mask of a pass without cache (teacher forcing)."""
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        return _create_causal_mask(config, inputs_embeds, attention_mask, positions, None)

    def attention_interface(implementation, default):
        """The attention function registered for `implementation` (`default` for "eager" or unset)."""
        if implementation in (None, "eager"):
            return default
        return ALL_ATTENTION_FUNCTIONS[implementation]


__all__ = ["TRANSFORMERS_V5", "PreTrainedConfig", "strict", "init", "create_bidirectional_mask", "create_causal_mask",
           "attention_interface", "TopHLogitsWarper"]
