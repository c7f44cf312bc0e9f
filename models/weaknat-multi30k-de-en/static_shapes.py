# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""A static-shape path for a CTC model's one pass: sources padded to a few bucketed lengths, the pass compiled once
per shape (on CUDA, `mode="reduce-overhead"` replays it as a CUDA graph), switched on the transformers way.

At batch 1 on a GPU the pass is bound by Python and kernel launches, not arithmetic. Compiling it removes both, and
bucketing the source length keeps the number of distinct shapes (compilations, CUDA graphs) small. The switches are
transformers' own `GenerationConfig` fields, with transformers' meaning:

- `cache_implementation="static"` or a `compile_config` (`transformers.CompileConfig`): the static-shape path;
  `disable_compile=True` turns it off.
- The pass is compiled, with `compile_config` (default `model._default_compile_config()`, transformers' default
  `CompileConfig()`: inductor, `reduce-overhead`), on the devices where transformers' `generate` compiles (cuda,
  xpu, ...) or anywhere when `compile_config._compile_all_devices = True`, as in transformers; otherwise the bucketed
  pass runs eagerly (same tokens, no speed-up).

Exact against eager: a row's CTC frames come from its own tokens only (its attention masks and `frame_mask`), so
padding a source to its bucket changes no valid frame beyond floating-point rounding; the frames added by padding are
cut off before decoding, and decoding, scores and outputs are the eager path's (`ctc_generation.ctc_decode`,
`generation.finish_generation`). What a static pass cannot give (a vanilla model's predicted lengths, `inputs_embeds`,
`output_attentions` / `output_hidden_states`, which hold padded positions) runs eagerly, with a warning once.
"""

import copy
import functools
import math

import torch
from transformers.generation.configuration_utils import CompileConfig
from transformers.utils import logging

from .ctc_generation import ctc_decode, emitting_frames, wants_frame_logits
from .generation import GenerationRequest, finish_generation

logger = logging.get_logger(__name__)

# The devices on which transformers' `generate` compiles automatically (`GenerationMixin._valid_auto_compile_criteria`)
COMPILE_DEVICES = ("cuda", "xpu", "neuron", "tpu", "mps")
SMALLEST_BUCKET = 8


def bucket_length(length: int, limit: int) -> int:
    """The bucket a source of `length` tokens is padded to: the smallest of 8, 12, 16, 24, 32, 48, 64, 96, ... (powers
    of two and 1.5 times them) that holds it, capped at `limit` (max_position_embeddings). At most 2 * log2(limit / 8)
    + 2 distinct lengths, and at most 50% (at least 8 tokens: 33%) padding."""
    if length >= limit:
        return limit
    if length <= SMALLEST_BUCKET:
        return min(SMALLEST_BUCKET, limit)
    power = 2 ** math.floor(math.log2(length))
    bucket = power if length == power else power * 3 // 2 if length <= power * 3 // 2 else 2 * power
    return min(bucket, limit)


def pad_to_bucket(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int, limit: int):
    """(batch, src_len) right-padded ids and mask -> the same, right-padded with `pad_token_id` / 0 to
    `bucket_length(src_len, limit)` columns."""
    extra = bucket_length(input_ids.shape[1], limit) - input_ids.shape[1]
    if extra == 0:
        return input_ids, attention_mask
    pad = torch.nn.functional.pad
    return pad(input_ids, (0, extra), value=pad_token_id), pad(attention_mask, (0, extra), value=0)


def static_shapes_requested(config) -> bool:
    """Whether a generation config asks for the static-shape path (see the module docstring)."""
    if getattr(config, "disable_compile", None):
        return False
    return getattr(config, "cache_implementation", None) == "static" or getattr(config, "compile_config", None) is not None


def static_shapes_blocker(model, request: GenerationRequest) -> str | None:
    """Why the static path cannot serve this call (None when it can)."""
    if not model.config.is_ctc:
        return "a vanilla model's decoder length is its predicted length"
    if request.input_ids is None:
        return "it pads `input_ids`; this call passes `inputs_embeds`"
    if request.output_attentions or request.output_hidden_states:
        return "returned attentions and hidden states would hold the padded positions"
    return None


def use_static_shapes(model, request: GenerationRequest) -> bool:
    """True when the request asks for the static-shape path and it can serve it (else a warning, once, says why)."""
    if not static_shapes_requested(request.config):
        return False
    blocker = static_shapes_blocker(model, request)
    if blocker is not None:
        logger.warning_once(f"The static-shape (compiled) pass was requested (`cache_implementation='static'` or "
                            f"`compile_config`) but cannot be used: {blocker}. Running the eager pass.")
    return blocker is None


def compiles_on(model, config) -> bool:
    """transformers' device rule: compile on accelerators, elsewhere only with `compile_config._compile_all_devices`."""
    compile_config = getattr(config, "compile_config", None)
    return model.device.type in COMPILE_DEVICES or bool(compile_config is not None
                                                         and compile_config._compile_all_devices)


def one_pass(model, input_ids, attention_mask, suppress_mask=None, remove_invalid: bool = False,
             return_logits: bool = False) -> torch.Tensor:
    """The CTC model's pass without host syncs, data-dependent shapes or validation (the caller checked the source).

    input_ids, attention_mask: (batch, src_len), right-padded. suppress_mask: (vocab,) bool, True = masked to -inf
    (`suppress_tokens`), or None. Returns the frame logits (batch, frames, vocab) with `return_logits`, else each
    frame's argmax (batch, frames) after `remove_invalid_values` and the suppression (`generation.process_scores`).
    """
    inner = model.model
    encoder_states = inner.encoder(inner.shared(input_ids), attention_mask).last_hidden_state
    frames, frame_mask = inner.upsampler(encoder_states, attention_mask)
    hidden = inner.decoder(frames, frame_mask, encoder_states, attention_mask).last_hidden_state
    logits = model.decoding_logits(hidden)  # (batch, frames, vocab), float32 as in the eager path
    if return_logits:
        return logits
    if remove_invalid:  # transformers' InfNanRemoveLogitsProcessor
        logits = torch.nan_to_num(logits, nan=0.0, posinf=torch.finfo(logits.dtype).max,
                                  neginf=torch.finfo(logits.dtype).min)
    if suppress_mask is not None:
        logits = logits.masked_fill(suppress_mask, float("-inf"))
    return logits.argmax(-1)


class CompiledPassSlot:
    """Where a model keeps its compiled pass. A deep copy or a pickle of the model gets an empty slot: the compiled
    pass is bound to the original model's weights, and a compiled function cannot be pickled."""

    def __init__(self):
        self.compile_config, self.compiled = None, None

    def __deepcopy__(self, memo):
        return CompiledPassSlot()

    def __reduce__(self):
        return CompiledPassSlot, ()


def compiled_pass(model, compile_config: CompileConfig):
    """`torch.compile(one_pass bound to model, **compile_config.to_dict())`, kept on the model and rebuilt only when
    the compile config changes (as transformers' `PreTrainedModel.get_compiled_call` keeps the compiled forward)."""
    slot = model.__dict__.setdefault("_static_pass", CompiledPassSlot())
    if slot.compiled is None or slot.compile_config != compile_config:
        slot.compiled = torch.compile(functools.partial(one_pass, model), **compile_config.to_dict())
        slot.compile_config = copy.deepcopy(compile_config)
    return slot.compiled


def static_ctc_generate(model, request: GenerationRequest, source_mask, beam_token_candidates=None):
    """`generate` for a CTC model through the static-shape pass: pad the (checked) source to its bucket, run the
    (compiled) pass, cut the frames back to the source's own, then decode and assemble the output exactly as
    `ctc_generation.ctc_generate` does. source_mask: (batch, src_len), `modeling_weaknat.checked_source_mask`'s."""
    config, blank = model.config, model.config.blank_token_id
    input_ids, attention_mask = pad_to_bucket(request.input_ids, source_mask, config.pad_token_id,
                                              config.max_position_embeddings)
    suppress_mask = None
    if request.suppressed_token_ids:
        suppress_mask = torch.zeros(config.vocab_size, dtype=torch.bool, device=input_ids.device)
        suppress_mask[list(request.suppressed_token_ids)] = True
    return_logits = wants_frame_logits(request)
    if compiles_on(model, request.config):
        run = compiled_pass(model, request.config.compile_config or default_compile_config(model))
        torch.compiler.cudagraph_mark_step_begin()  # a new inference step: earlier CUDA-graph outputs may be reused
    else:
        run = functools.partial(one_pass, model)
    out = run(input_ids, attention_mask, suppress_mask, bool(request.config.remove_invalid_values), return_logits)
    frame_count = config.upsample_ratio * request.input_ids.shape[1]
    out = out[:, :frame_count].clone()  # the source's own frames; a copy, out of any CUDA graph's reused memory
    frame_mask = emitting_frames(model.frame_mask(source_mask), request.input_ids, source_mask, config)
    if return_logits:
        hypotheses, scores, frame_scores = ctc_decode(request, frame_mask, blank, logits=out,
                                                      beam_token_candidates=beam_token_candidates)
        logits = out
    else:
        (hypotheses, scores, frame_scores), logits = ctc_decode(request, frame_mask, blank, frame_ids=out), None
    return finish_generation(request, hypotheses, scores, scores=frame_scores, logits=logits)


def default_compile_config(model) -> CompileConfig:
    """The model's `generation_config.compile_config`, else transformers' default for its device."""
    own = getattr(model.generation_config, "compile_config", None)
    if own is not None:
        return own
    default = getattr(model, "_default_compile_config", None)  # transformers 5.x
    return default() if default is not None else CompileConfig()


__all__ = ["bucket_length", "pad_to_bucket", "static_shapes_requested", "use_static_shapes", "one_pass",
           "compiled_pass", "static_ctc_generate"]
