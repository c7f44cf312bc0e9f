# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""`generate()` arguments of a one-pass (non-autoregressive) model, in transformers' own terms.

A one-pass model computes a score for every output position in ONE forward pass and then decodes them. Everything
around that decoding lives here and knows nothing about CTC, so any one-pass decoder can share it:

1. `prepare_generation`: merge `generation_config` and keyword arguments exactly as transformers does (its own
   `GenerationMixin._prepare_generation_config`), reject what a one-pass model cannot honour with the reason, and
   check the source before torch sees it. Returns a `GenerationRequest`.
2. `process_scores` / `warp_for_sampling`: the position-wise logits processors (suppressed tokens, NaN removal, and
   for sampling transformers' own warpers: temperature, top-k, top-p, ...) applied to every output position at once.
3. `finish_generation`: the output: n-best selection, `min_length` ranking, truncation to `max_length` /
   `max_new_tokens`, and transformers' `GenerateEncoderDecoderOutput` / `GenerateBeamEncoderDecoderOutput`.

The model's `generate` runs the network and the decoding in between (CTC: `ctc_generation.py`; vanilla:
`length_prediction.py`). Shipped as remote code next to the model, so it imports only torch and transformers (what
differs between transformers 4.x and 5.x through `transformers_compat.py`).
"""

import copy
import warnings
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (EpsilonLogitsWarper, EtaLogitsWarper, InfNanRemoveLogitsProcessor,
                                                    MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper, TypicalLogitsWarper)
from transformers.generation.utils import (GenerateBeamEncoderDecoderOutput, GenerateEncoderDecoderOutput,
                                           GenerationMixin)
from transformers.utils import logging

from .transformers_compat import TopHLogitsWarper

logger = logging.get_logger(__name__)

STEPS = "this model computes its whole output in one forward pass, with no generation steps"
# Arguments of transformers' `generate()` signature (and keyword arguments it reads) that act on the step-by-step loop
ONE_PASS_UNSUPPORTED_ARGUMENTS = {
    "logits_processor": f"a logits processor sees the tokens generated so far, and {STEPS}; "
                        "mask tokens with `suppress_tokens` or `bad_words_ids` instead",
    "stopping_criteria": f"{STEPS}, so there is nothing to stop; bound the output with `max_new_tokens`",
    "prefix_allowed_tokens_fn": f"it constrains each step given the prefix, and {STEPS}",
    "assistant_model": f"assisted (speculative) decoding speeds up step-by-step decoding, and {STEPS}",
    "assistant_tokenizer": f"assisted (speculative) decoding speeds up step-by-step decoding, and {STEPS}",
    "streamer": f"{STEPS}: the output exists only once the pass is done",
    "negative_prompt_ids": "classifier-free guidance with a negative prompt is for decoder-only models",
    "negative_prompt_attention_mask": "classifier-free guidance with a negative prompt is for decoder-only models",
    "custom_generate": f"a custom generation loop calls the model step by step, and {STEPS}",
}
# Model inputs an autoregressive decoder reads and a one-pass decoder has no use for
ONE_PASS_UNSUPPORTED_INPUTS = {
    "decoder_input_ids": "a non-autoregressive decoder has no decoder input tokens (no forced prefix either)",
    "decoder_attention_mask": "a non-autoregressive decoder has no decoder input tokens",
    "decoder_inputs_embeds": "a non-autoregressive decoder has no decoder input tokens",
    "past_key_values": f"there is no cache: {STEPS}",
    "cache": f"there is no cache: {STEPS}",
}
# Ignored with reason: `synced_gpus` (one forward pass per call on every rank, so ranks never wait for each other),
# `tokenizer` (only used by transformers for `stop_strings`), `trust_remote_code` (only for `custom_generate`),
# `labels` (Seq2SeqTrainer passes the batch's labels; a translation does not read them)
IGNORED_ARGUMENTS = ("synced_gpus", "tokenizer", "trust_remote_code", "labels")
# This model's own generation options, not GenerationConfig fields: taken as keywords (as transformers takes its own)
# or as `generation_config` entries; each is checked where it is used (docs/usage.md, "Generation arguments")
MODEL_OPTIONS = ("beam_search_backend", "length_beam", "length_beam_ranking")
# GenerationConfig fields that act on the steps of an autoregressive decoder: a ValueError when set to anything but
# their neutral value(s). Everything else in GenerationConfig is honoured or a documented no-op (the package's
# docs/usage.md, "Generation arguments").
ONE_PASS_UNSUPPORTED_CONFIG = {
    "max_time": ((None,), f"{STEPS}, so it cannot stop part-way; bound the output with `max_new_tokens`"),
    "stop_strings": ((None,), f"{STEPS}, so there is no step at which to stop"),
    "repetition_penalty": ((None, 1.0), "it penalises tokens given those generated before, and every position of a "
                                        "one-pass model is predicted at once"),
    "encoder_repetition_penalty": ((None, 1.0), "not supported by this one-pass model"),
    "no_repeat_ngram_size": ((None, 0), "it bans n-grams given the prefix, and every position of a one-pass model "
                                        "is predicted at once"),
    "encoder_no_repeat_ngram_size": ((None, 0), "it bans n-grams given the prefix, and every position of a one-pass "
                                                "model is predicted at once"),
    "exponential_decay_length_penalty": ((None,), f"it depends on the current length, and {STEPS}"),
    "forced_bos_token_id": ((None,), f"it forces the token of one step, and {STEPS}"),
    "forced_eos_token_id": ((None,), f"it forces the token of one step, and {STEPS}"),
    "begin_suppress_tokens": ((None,), f"it suppresses tokens at the first step, and {STEPS}; "
                                       "`suppress_tokens` masks tokens everywhere"),
    "sequence_bias": ((None,), "it biases token sequences given the prefix; not supported by a one-pass model"),
    "guidance_scale": ((None, 1.0), "classifier-free guidance needs a second, unconditional step-by-step pass"),
    "watermarking_config": ((None,), "watermarking seeds each step with the previous token"),
    "token_healing": ((None, False), "token healing regenerates the end of a decoder-only prompt"),
    "use_mtp": ((None, False), f"multi-token prediction speeds up step-by-step decoding, and {STEPS}"),
    "prompt_lookup_num_tokens": ((None,), f"prompt lookup decoding speeds up step-by-step decoding, and {STEPS}"),
    "assistant_early_exit": ((None,), f"self-speculative decoding speeds up step-by-step decoding, and {STEPS}"),
    "penalty_alpha": ((None,), f"contrastive search re-ranks candidates step by step, and {STEPS}"),
    "dola_layers": ((None,), f"DoLa contrasts layers step by step, and {STEPS}"),
    "num_beam_groups": ((None, 1), "diverse (group) beam search is not implemented for this model"),
    "diversity_penalty": ((None, 0.0), "diverse (group) beam search is not implemented for this model"),
    "constraints": ((None,), "constrained beam search is not implemented for this model"),
    "force_words_ids": ((None,), "constrained beam search is not implemented for this model"),
}


@dataclass
class GenerationRequest:
    """One `generate()` call after merging and checking: the generation config and what decoding and output need."""

    config: GenerationConfig
    mode: str  # "greedy", "sample" or "beam"
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    batch_size: int
    source_length: int
    num_beams: int
    num_return_sequences: int
    max_tokens: int  # upper bound on the output length (truncation)
    min_tokens: int  # hypotheses shorter than this are ranked last (beam search only)
    pad_token_id: int
    suppressed_token_ids: tuple[int, ...] = ()
    warpers: list = field(default_factory=list)

    @property
    def return_dict(self) -> bool:
        return bool(self.config.return_dict_in_generate)

    @property
    def output_attentions(self) -> bool:
        return self.return_dict and bool(self.config.output_attentions)

    @property
    def output_hidden_states(self) -> bool:
        return self.return_dict and bool(self.config.output_hidden_states)

    @property
    def is_empty(self) -> bool:
        """No sentence, or sentences of zero tokens: the result is empty without running the model."""
        return self.batch_size == 0 or self.source_length == 0

    def empty_hypotheses(self, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The translation of nothing: one empty hypothesis per requested sequence (log-probability 0)."""
        k = self.num_return_sequences
        hypotheses = torch.full((self.batch_size, k, 0), self.pad_token_id, dtype=torch.long, device=device)
        return hypotheses, (torch.zeros(self.batch_size, k, device=device) if self.mode == "beam" else None)


# ----------------------------------------------------------------------------------------------------------------
# 1. Arguments in


def prepare_generation(model, inputs, generation_config, kwargs: dict) -> GenerationRequest:
    """Merge and check everything a `generate()` call was given, before any tensor reaches torch.

    Priority as in transformers: keyword arguments > `generation_config` > `model.generation_config` > transformers'
    global defaults. Raises a ValueError naming the argument (and why) for what a one-pass model cannot honour, the
    ValueError transformers itself raises for unknown arguments, and a TypeError / ValueError for a source of the
    wrong type, shape or ids.
    """
    kwargs = dict(kwargs)
    for name, why in ONE_PASS_UNSUPPORTED_ARGUMENTS.items():
        value = kwargs.pop(name, None)  # None, or an empty LogitsProcessorList / StoppingCriteriaList: not in use
        if value is not None and not (isinstance(value, (list, tuple)) and not value):
            raise ValueError(f"`{name}` is not supported by {type(model).__name__}.generate(): {why}.")
    for name in IGNORED_ARGUMENTS:
        kwargs.pop(name, None)
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"`generation_config` must be a transformers.GenerationConfig, got "
                        f"{type(generation_config).__name__}")
    has_default_max_length = (kwargs.get("max_length") is None and kwargs.get("max_new_tokens") is None
                              and (generation_config is None or generation_config.max_length is None)
                              and model.generation_config.max_length is None)
    options = {name: kwargs.pop(name) for name in MODEL_OPTIONS if kwargs.get(name) is not None}
    config, model_kwargs = merged_generation_config(model, generation_config, kwargs)
    for name, value in options.items():  # on the call's own (shallow) copy of the config
        setattr(config, name, value)
    model_kwargs.pop("output_attentions", None)  # transformers hands these to the model: they are in `config`
    model_kwargs.pop("output_hidden_states", None)

    for name, why in ONE_PASS_UNSUPPORTED_INPUTS.items():
        if model_kwargs.get(name) is not None:
            raise ValueError(f"`{name}` is not supported by {type(model).__name__}.generate(): {why}.")
    source = {name: model_kwargs.pop(name, None) for name in ("input_ids", "attention_mask", "inputs_embeds")}
    unused = [key for key, value in model_kwargs.items() if value is not None]
    if unused:  # transformers' own message (GenerationMixin._validate_model_kwargs)
        raise ValueError(f"The following `model_kwargs` are not used by the model: {unused} (note: typos in the"
                         " generate arguments will also show up in this list)")
    if inputs is not None:
        if source["input_ids"] is not None:  # transformers' own message (GenerationMixin._prepare_model_inputs)
            raise ValueError(f"`inputs`: {inputs}` were passed alongside input_ids which is not allowed. "
                             f"Make sure to either pass {inputs} or input_ids=...")
        source["input_ids"] = inputs
    batch_size, source_length = check_source(**source, vocab_size=model.config.vocab_size)

    check_one_pass_config(config, type(model).__name__)
    mode = decoding_mode(config)
    max_tokens, min_tokens = length_limits(config, mode, has_default_max_length)
    num_beams, num_return_sequences = config.num_beams, config.num_return_sequences

    pad = config.pad_token_id if config.pad_token_id is not None else model.config.pad_token_id
    return GenerationRequest(
        config=config, mode=mode, **source, batch_size=batch_size, source_length=source_length, num_beams=num_beams,
        num_return_sequences=num_return_sequences, max_tokens=max_tokens, min_tokens=min_tokens, pad_token_id=pad,
        suppressed_token_ids=suppressed_token_ids(config, model.config.vocab_size),
        warpers=sampling_warpers(config) if mode == "sample" else [],
    )


SOURCE_INPUTS = ("input_ids", "attention_mask", "inputs_embeds")
_PLAIN_VALUES = (type(None), bool, int, float, str)


def merged_generation_config(model, generation_config, kwargs: dict) -> tuple[GenerationConfig, dict]:
    """transformers' `GenerationMixin._prepare_generation_config(model, generation_config, **kwargs)`, remembered per
    model for the calls that repeat: no `generation_config` object and only plain keyword values (None, bool, int,
    float, str) beside the source tensors.

    transformers deep-copies and merges the model's `GenerationConfig` (and checks `model.config` for legacy
    generation fields) on every call, about half a millisecond, as much as a small model's whole CPU pass at batch
    1. The merged config depends only on `model.generation_config`, `model.config` and those keyword values, so it is
    reused while snapshots of the first two compare equal (a few microseconds); any change to either, an unusual
    value or a `generation_config` argument takes transformers' own path. Returns (config, model kwargs) as
    transformers does; the config is a shallow copy, so nothing a caller sets on it reaches the next call.
    """
    key = None
    if generation_config is None:
        options = tuple(sorted((name, type(value).__name__, value) for name, value in kwargs.items()
                               if name not in SOURCE_INPUTS))  # the type too: 1 == True, but not as a setting
        if all(type(value) in _PLAIN_VALUES for _, _, value in options):
            key = (options, tuple(sorted(name for name in kwargs if name in SOURCE_INPUTS)))
    cache = model.__dict__.setdefault("_one_pass_generation_configs", {})
    if key is not None and key in cache:
        generation_state, model_state, config, model_keys = cache[key]
        try:
            unchanged = (vars(model.generation_config) == generation_state and vars(model.config) == model_state)
        except Exception:  # a value without a plain `==` (e.g. a tensor): do not trust the snapshot
            unchanged = False
        if unchanged:
            model_kwargs = {name: kwargs[name] for name in model_keys}
            for name in ("output_attentions", "output_hidden_states"):  # as transformers adds them
                if getattr(config, name):
                    model_kwargs[name] = getattr(config, name)
            return copy.copy(config), model_kwargs
    config, model_kwargs = GenerationMixin._prepare_generation_config(model, generation_config, **kwargs)
    if key is not None:
        try:
            snapshot = (copy.deepcopy(vars(model.generation_config)), copy.deepcopy(vars(model.config)))
            valid = snapshot[0] == vars(model.generation_config) and snapshot[1] == vars(model.config)
        except Exception:
            valid = False
        if valid:
            if len(cache) >= 32:  # bounded: a stream of distinct keyword values must not grow it forever
                cache.clear()
            model_keys = tuple(name for name in kwargs if name in model_kwargs)
            cache[key] = (*snapshot, copy.copy(config), model_keys)
    return config, model_kwargs


def decoding_mode(config: GenerationConfig) -> str:
    """"greedy", "sample" or "beam", after checking `num_beams`, `num_return_sequences` and `do_sample`."""
    num_beams, num_return_sequences = config.num_beams, config.num_return_sequences
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"`num_beams` must be a positive integer, got {num_beams!r}")
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"`num_return_sequences` must be a positive integer, got {num_return_sequences!r}")
    if config.do_sample and num_beams > 1:
        raise ValueError("`do_sample=True` with `num_beams > 1` (beam sampling) is not supported by this model: "
                         "sample with num_beams=1 (every output position is drawn from its own distribution; "
                         "`num_return_sequences` gives several samples per sentence), or search with do_sample=False")
    return "beam" if num_beams > 1 else "sample" if config.do_sample else "greedy"


def length_limits(config: GenerationConfig, mode: str, has_default_max_length: bool) -> tuple[int, int]:
    """(most, fewest) output tokens from `max_length` / `max_new_tokens` and `min_length` / `min_new_tokens`."""
    max_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"`max_length` / `max_new_tokens` must be a non-negative integer, got {max_tokens!r}")
    if has_default_max_length:  # as transformers warns (GenerationMixin._validate_generated_length)
        warnings.warn(f"Using the model-agnostic default `max_length` (={config.max_length}) to control the "
                      "generation length. We recommend setting `max_new_tokens` to control the maximum length of the "
                      "generation.", UserWarning, stacklevel=4)
    min_tokens = config.min_new_tokens if config.min_new_tokens is not None else (config.min_length or 0)
    if min_tokens > max_tokens:
        raise ValueError(f"The minimum output length ({min_tokens}, `min_length` / `min_new_tokens`) is larger than "
                         f"the maximum ({max_tokens}, `max_length` / `max_new_tokens`)")
    if min_tokens > 0 and mode != "beam":
        raise ValueError(f"`min_length` / `min_new_tokens` ({min_tokens}) need beam search (num_beams > 1) in this "
                         "model: its one-pass greedy or sampled output cannot be lengthened; beam search ranks "
                         "hypotheses shorter than the minimum after those that reach it")
    if config.length_penalty not in (None, 1.0):
        logger.warning_once(f"length_penalty={config.length_penalty} has no effect: this model ranks beam hypotheses "
                            "by their full log-probability")
    return max_tokens, min_tokens


def check_one_pass_config(config: GenerationConfig, model_name: str):
    """A ValueError naming the first GenerationConfig field set to something a one-pass model cannot honour."""
    for name, (neutral, why) in ONE_PASS_UNSUPPORTED_CONFIG.items():
        value = getattr(config, name, None)
        if not any(value is n or (n is not None and value == n) for n in neutral):
            raise ValueError(f"`{name}={value!r}` is not supported by {model_name}.generate(): {why}.")


def check_source(input_ids=None, attention_mask=None, inputs_embeds=None, *, vocab_size: int) -> tuple[int, int]:
    """Type, shape and id checks of the source, with the fix in the message. Returns (batch, src_len)."""
    hint = 'call the tokenizer with return_tensors="pt" (and padding=True for several sentences)'
    for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask),
                        ("inputs_embeds", inputs_embeds)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"generate() takes `{name}` as a torch.Tensor, got {type(value).__name__}: {hint}")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("generate() needs exactly one of `input_ids` (or `inputs`) and `inputs_embeds`")
    if input_ids is not None:
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"`input_ids` must hold integer token ids (torch.long), got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, src_len), got {tuple(input_ids.shape)}: {hint}")
        if input_ids.numel():
            low, high = torch.stack(tuple(torch.aminmax(input_ids))).tolist()  # one host sync for both bounds
            bad = low if low < 0 else high if high >= vocab_size else None
            if bad is not None:
                row = int((input_ids == bad).any(1).nonzero()[0])
                raise ValueError(f"`input_ids` hold the id {bad} (row {row}), outside this model's vocabulary of "
                                 f"{vocab_size} ids (0..{vocab_size - 1}): was the source made with its tokenizer?")
        shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3:
            raise ValueError(f"`inputs_embeds` must have shape (batch, src_len, d_model), got "
                             f"{tuple(inputs_embeds.shape)}")
        shape = tuple(inputs_embeds.shape[:2])
    if attention_mask is not None and tuple(attention_mask.shape) != shape:
        raise ValueError(f"`attention_mask` has shape {tuple(attention_mask.shape)} but the source has {shape}")
    return shape


def suppressed_token_ids(config: GenerationConfig, vocab_size: int) -> tuple[int, ...]:
    """`suppress_tokens` and the one-token entries of `bad_words_ids`: ids masked at every output position."""
    ids = list(config.suppress_tokens or [])
    for words in config.bad_words_ids or []:
        if len(words) != 1:
            raise ValueError(f"`bad_words_ids` entry {list(words)} has several tokens: a one-pass model can only ban "
                             "single tokens (it predicts every position at once); split it into single-token entries "
                             "or use `suppress_tokens`")
        ids.extend(words)
    for token in ids:
        if not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(f"`suppress_tokens` / `bad_words_ids` hold {token!r}, not an id of this model's "
                             f"vocabulary of {vocab_size}")
    return tuple(sorted(set(ids)))


def sampling_warpers(config: GenerationConfig) -> list:
    """transformers' own sampling warpers, in the order and with the conditions of `GenerationMixin`."""
    warpers = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if getattr(config, "top_h", None) is not None:  # 5.x only (TopHLogitsWarper is None on 4.x)
        warpers.append(TopHLogitsWarper(top_h=config.top_h))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=1))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        warpers.append(EpsilonLogitsWarper(epsilon=config.epsilon_cutoff, min_tokens_to_keep=1))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        warpers.append(EtaLogitsWarper(epsilon=config.eta_cutoff, min_tokens_to_keep=1))
    return warpers


def has_content(input_ids, source_mask, config) -> torch.Tensor:
    """(batch,) bool: the source holds a token other than the config's pad, bos and eos (a source without one
    translates to an empty sequence)."""
    if input_ids is None:
        return source_mask.bool().any(1)
    content = source_mask.bool()
    for token in {t for t in (config.pad_token_id, config.bos_token_id, config.eos_token_id) if t is not None}:
        content = content & (input_ids != token)  # no host-to-device copy of the special ids
    return content.any(1)


# ----------------------------------------------------------------------------------------------------------------
# 2. Position-wise score processing


def process_scores(request: GenerationRequest, logits: torch.Tensor) -> torch.Tensor:
    """The logits processors that need no prefix, on (batch, positions, vocab) logits: NaN/inf removal
    (`remove_invalid_values`) and -inf on the suppressed ids. Returns `logits` itself when there is nothing to do."""
    if request.config.remove_invalid_values:
        logits = InfNanRemoveLogitsProcessor()(None, logits)
    if request.suppressed_token_ids:
        mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        mask[list(request.suppressed_token_ids)] = True
        logits = logits.masked_fill(mask, float("-inf"))
    return logits


def warp_for_sampling(request: GenerationRequest, logits: torch.Tensor) -> torch.Tensor:
    """transformers' sampling warpers (temperature, top-k, top-p, ...) applied to every position's distribution."""
    flat = logits.reshape(-1, logits.shape[-1])
    for warper in request.warpers:
        flat = warper(None, flat)
    return flat.view(logits.shape)


# ----------------------------------------------------------------------------------------------------------------
# 3. Output


def finish_generation(request: GenerationRequest, hypotheses: torch.Tensor, hypothesis_scores=None, *,
                      scores=None, logits=None, encoder_outputs=None, decoder_outputs=None):
    """The `generate()` result from decoded hypotheses.

    hypotheses: (batch, k, len) right-padded with `request.pad_token_id`, best first (k >= num_return_sequences);
    hypothesis_scores: (batch, k) log-probabilities (beam search) or None. scores / logits: (batch, positions, vocab)
    what the decoder read / the raw logits. encoder_outputs / decoder_outputs: the forward pass's outputs.
    Returns a LongTensor (batch * num_return_sequences, <= max_tokens), or with `return_dict_in_generate` a
    `GenerateBeamEncoderDecoderOutput` (beam search) / `GenerateEncoderDecoderOutput`.
    """
    if request.min_tokens > 0:  # beams that reach the minimum first, each group in score order
        short = ((hypotheses != request.pad_token_id).sum(-1) < request.min_tokens).to(torch.int8)
        order = torch.argsort(short, dim=1, stable=True)
        hypotheses = hypotheses.gather(1, order[:, :, None].expand_as(hypotheses))
        hypothesis_scores = None if hypothesis_scores is None else hypothesis_scores.gather(1, order)
    n = request.num_return_sequences
    sequences = hypotheses[:, :n].flatten(0, 1)[:, : request.max_tokens]
    if not request.return_dict:
        return sequences
    config = request.config
    per_position = lambda x: tuple(x.unbind(1)) if x is not None else None  # noqa: E731 - one tensor per position
    extras = {}
    if encoder_outputs is not None:
        extras = dict(
            encoder_hidden_states=encoder_outputs.hidden_states if request.output_hidden_states else None,
            encoder_attentions=encoder_outputs.attentions if request.output_attentions else None,
        )
    if decoder_outputs is not None:  # one pass = one "step": a 1-tuple of the per-layer tuples
        one_step = lambda x: (x,) if x is not None else None  # noqa: E731
        extras.update(
            decoder_hidden_states=one_step(decoder_outputs.decoder_hidden_states) if request.output_hidden_states
            else None,
            decoder_attentions=one_step(decoder_outputs.decoder_attentions) if request.output_attentions else None,
            cross_attentions=one_step(decoder_outputs.cross_attentions) if request.output_attentions else None,
        )
    common = dict(sequences=sequences, scores=per_position(scores) if config.output_scores else None,
                  logits=per_position(logits) if config.output_logits else None, **extras)
    if request.mode == "beam":
        sequences_scores = hypothesis_scores[:, :n].flatten() if config.output_scores else None
        return GenerateBeamEncoderDecoderOutput(sequences_scores=sequences_scores, **common)
    return GenerateEncoderDecoderOutput(**common)


__all__ = ["GenerationRequest", "prepare_generation", "has_content", "process_scores", "warp_for_sampling",
           "finish_generation"]
