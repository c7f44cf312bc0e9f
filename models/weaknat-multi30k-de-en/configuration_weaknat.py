# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the non-autoregressive translator (CTC or vanilla with length prediction) with auxiliary weak
AR decoders.

Paper: Wang, Zheng and Huang, "Helping the Weak Makes You Strong: Simple Multi-Task Learning Improves
Non-Autoregressive Translators", EMNLP 2022. Defaults follow the paper's base setup (Appendix A) and its
released code; every deviation is a documented field.
"""

import math

from .transformers_compat import PreTrainedConfig, strict

NAR_TYPES = ("ctc", "vanilla")
DECODER_INPUTS = ("uniform_copy", "placeholder")
UPSAMPLE_METHODS = ("linear", "repeat")
WEAK_AR_LOSS_REDUCTIONS = ("mean", "sum")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh")
INIT_SCHEMES = ("transformers", "fairseq")


@strict
class WeakNATConfig(PreTrainedConfig):
    r"""
    Sizes (Transformer base by default, post-LN like the paper's fairseq setup):
        vocab_size, d_model, encoder_layers, decoder_layers, encoder_attention_heads, decoder_attention_heads,
        encoder_ffn_dim, decoder_ffn_dim, activation_function, dropout, attention_dropout, activation_dropout,
        normalize_before (pre-LN when True), scale_embedding (multiply embeddings by sqrt(d_model)).
    init_scheme (`str`, defaults to `"transformers"`):
        `"transformers"`: every weight N(0, `init_std`), biases 0 (transformers' default). `"fairseq"`: the authors'
        setup (fairseq's Transformer): token and position embeddings N(0, d_model^-1/2), linear layers Xavier-uniform
        (query/key/value projections with gain 2^-1/2), biases 0. LayerNorms start at (1, 0) in both.
    nar_type (`str`, defaults to `"ctc"`):
        The non-autoregressive translator the weak AR decoders train. `"ctc"`: upsampled frames, CTC loss and
        decoding (the paper's main model; the upsampler exists only here). `"vanilla"`: Gu et al. (2018) as in
        fairseq's `nonautoregressive_transformer`: a length predictor picks the target length, the decoder reads
        one input per target position and predicts one token per position, trained with label-smoothed
        cross-entropy plus `length_loss_factor` times the length loss (no blank, no upsampler; the length predictor
        exists only here). The weak AR decoders attach to the NAR decoder layers the same way for both.
    max_position_embeddings (`int`, defaults to 512):
        Longest source, in tokens. CTC: the decoder has `upsample_ratio * max_position_embeddings` frame positions
        and the weak AR decoders as many target positions (a CTC target never has more tokens than frames).
        Vanilla: the decoder and the weak AR decoders have `max_position_embeddings` target positions, so a target
        is at most that long. `max_frames` is the decoder's number of positions in both cases.
    upsample_ratio (`int`, defaults to 3), CTC only:
        Decoder frames per source token: CTC needs more frames than target tokens.
    upsample_method (`str`, defaults to `"linear"`), CTC only:
        `"linear"`: a learned `Linear(d, ratio * d)` of each final encoder state, reshaped into `ratio` frames
        (the authors' code). `"repeat"`: each encoder state copied `ratio` times.
    blank_token_id (`int`, defaults to 4):
        The CTC blank. A real vocabulary entry (the tokenizer's `<blank>`), never the pad id. A vanilla model never
        emits it by design but may be given it (it is an ordinary, unused id there).
    decoder_input (`str`, defaults to `"uniform_copy"`), vanilla only:
        The decoder's input at each target position. `"uniform_copy"`: the (scaled, position-free) embedding of the
        source token at position `round(j * (src_len - 1) / (tgt_len - 1))` (Gu et al. 2018; fairseq
        `--src-embedding-copy`). `"placeholder"`: no token input, only the learned position embedding (fairseq's
        `<unk>` placeholders: a constant vector added to every position is what learned positions absorb).
    max_length_offset (`int`, defaults to 128), vanilla only:
        The length predictor classifies the offset `tgt_len - src_len` (fairseq `--pred-length-offset`) into
        `2 * max_length_offset + 1` classes, offsets -max_length_offset..+max_length_offset (fairseq: 256 classes,
        -128..127). In training an offset outside the range is clamped to its end (as fairseq; `training/` leaves
        such pairs out and counts them); at decoding only lengths in [1, max_frames] are candidates.
    length_loss_factor (`float`, defaults to 0.1), vanilla only:
        Weight of the length loss in the NAR loss: `nar_loss = token_loss + length_loss_factor * length_loss`
        (fairseq `--length-loss-factor`).
    weak_ar_layers (`int`, defaults to 1):
        Transformer layers in each auxiliary weak AR decoder ("as weak as possible"). 0 gives the plain CTC baseline.
    weak_ar_share_parameters (`bool`, defaults to `True`):
        One weak AR decoder serves every NAR layer (paper Table 3, trick (a)).
    weak_ar_layer_sample_ratio (`float`, defaults to 0.5):
        Fraction of NAR decoder layers that get their AR partner in a training step, chosen at random
        (paper Table 3, trick (b) "layer dropout"); `ceil(ratio * decoder_layers)` layers, at least one.
    weak_ar_on_encoder (`bool`, defaults to `False`):
        Also attach a weak AR decoder to the encoder output, as the released code always does (not in the paper's text).
    weak_ar_loss_reduction (`str`, defaults to `"mean"`):
        How the AR losses of the decoders used in a step combine: `"mean"` (released code; keeps `nar_loss_weight`
        meaningful when the number of decoders changes) or `"sum"` (the paper's equation).
    nar_loss_weight (`float`, defaults to 0.5):
        The paper's lambda: `loss = lambda * nar_loss + (1 - lambda) * ar_loss`, where `nar_loss` is `ctc_loss`
        (CTC) or `token_loss + length_loss_factor * length_loss` (vanilla).
    label_smoothing (`float`, defaults to 0.1):
        Label smoothing of the weak AR decoders' cross-entropy, and of the vanilla NAR's token loss.
    weak_ar_warmup_steps (`int`, defaults to 0):
        Warm-in, beyond the paper: over the first N optimizer steps the NAR loss weight ramps linearly from 1 (no
        weak AR loss) down to `nar_loss_weight`, so the partners join once the NAR states carry something. 0 = off.
    weak_ar_detach_embedding (`bool`, defaults to `False`):
        Beyond the paper: the partners use the shared embedding (input and output projection) without sending it
        gradient, so their only way to shape the NAR model is through the layer states they read.
    glancing (`bool`, defaults to `False`), glancing_start_ratio (0.5), glancing_end_ratio (0.3), glancing_anneal_steps (300000):
        Glancing training (GLAT): with CTC on the best CTC alignment, with vanilla on the reference itself (Hamming
        distance); the ratio anneals linearly from start to end over `glancing_anneal_steps` optimizer steps, read
        from the `training_step` passed to `forward`.
    drop_repeats (`bool`, defaults to `False`), vanilla only:
        Decoding: merge adjacent identical output tokens (a post-processing step; off by default, so that the raw
        repeated-token rate is what is measured). `generate(drop_repeats=...)` overrides it per call.

    Example:
    ```python
    >>> from hf_weaknat import WeakNATConfig, WeakNATForConditionalGeneration
    >>> model = WeakNATForConditionalGeneration(WeakNATConfig(vocab_size=8000))
    ```"""

    model_type = "weaknat"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "encoder_attention_heads",
        "num_hidden_layers": "encoder_layers",
    }

    # Transformer sizes
    vocab_size: int = 40000
    d_model: int = 512
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    activation_function: str = "relu"
    dropout: float | int = 0.1
    attention_dropout: float | int = 0.0
    activation_dropout: float | int = 0.0
    max_position_embeddings: int = 512
    normalize_before: bool = False
    scale_embedding: bool = True
    init_std: float = 0.02
    init_scheme: str = "transformers"
    is_encoder_decoder: bool = True

    # Which NAR translator
    nar_type: str = "ctc"

    # CTC
    upsample_ratio: int = 3
    upsample_method: str = "linear"

    # Vanilla NAR (length prediction)
    decoder_input: str = "uniform_copy"
    max_length_offset: int = 128
    length_loss_factor: float | int = 0.1
    drop_repeats: bool = False

    # Special tokens (the tokenizer's fixed ids) and tying
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    blank_token_id: int = 4
    tie_word_embeddings: bool = True

    # Weak AR decoders (training only, dropped at export)
    weak_ar_layers: int = 1
    weak_ar_share_parameters: bool = True
    weak_ar_layer_sample_ratio: float | int = 0.5
    weak_ar_on_encoder: bool = False
    weak_ar_loss_reduction: str = "mean"
    nar_loss_weight: float | int = 0.5
    label_smoothing: float | int = 0.1
    weak_ar_warmup_steps: int = 0
    weak_ar_detach_embedding: bool = False

    # Glancing training
    glancing: bool = False
    glancing_start_ratio: float | int = 0.5
    glancing_end_ratio: float | int = 0.3
    glancing_anneal_steps: int = 300000

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_values()

    def _check_values(self):
        """Raise a ValueError naming the field for any value the model cannot be built or trained with."""
        positive = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings",
                    "upsample_ratio", "glancing_anneal_steps", "max_length_offset")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"WeakNATConfig.{name} must be >= 1, got {getattr(self, name)}")
        for heads in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, heads):
                raise ValueError(f"d_model ({self.d_model}) must be divisible by {heads} ({getattr(self, heads)})")
        unit = ("dropout", "attention_dropout", "activation_dropout", "nar_loss_weight", "glancing_start_ratio",
                "glancing_end_ratio")
        for name in unit:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WeakNATConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.length_loss_factor >= 0.0:
            raise ValueError(f"WeakNATConfig.length_loss_factor must be >= 0, got {self.length_loss_factor}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"WeakNATConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.weak_ar_layer_sample_ratio <= 1.0:
            raise ValueError(
                f"WeakNATConfig.weak_ar_layer_sample_ratio must be in (0, 1], got {self.weak_ar_layer_sample_ratio}"
            )
        if self.weak_ar_warmup_steps < 0:
            raise ValueError(f"WeakNATConfig.weak_ar_warmup_steps must be >= 0 (0 = off), got {self.weak_ar_warmup_steps}")
        if self.weak_ar_layers < 0:
            raise ValueError(f"WeakNATConfig.weak_ar_layers must be >= 0 (0 = plain CTC), got {self.weak_ar_layers}")
        choices = (("upsample_method", UPSAMPLE_METHODS), ("weak_ar_loss_reduction", WEAK_AR_LOSS_REDUCTIONS),
                   ("activation_function", ACTIVATIONS), ("init_scheme", INIT_SCHEMES),
                   ("nar_type", NAR_TYPES), ("decoder_input", DECODER_INPUTS))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"WeakNATConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0 <= self.blank_token_id < self.vocab_size:
            raise ValueError(f"blank_token_id ({self.blank_token_id}) must be a vocabulary id below {self.vocab_size}")
        if self.blank_token_id == self.pad_token_id:
            raise ValueError("blank_token_id must differ from pad_token_id: padding is masked out of the CTC loss")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} ({value}) must be a vocabulary id below {self.vocab_size}")

    @property
    def max_frames(self) -> int:
        """The decoder's positions: `upsample_ratio` frames per source position (CTC), or `max_position_embeddings`
        target positions (vanilla). The weak AR decoders have as many."""
        if self.nar_type == "vanilla":
            return self.max_position_embeddings
        return self.upsample_ratio * self.max_position_embeddings

    @property
    def is_ctc(self) -> bool:
        return self.nar_type == "ctc"

    @property
    def num_length_classes(self) -> int:
        """Vanilla: the length predictor's classes, offsets -max_length_offset..+max_length_offset."""
        return 2 * self.max_length_offset + 1

    @property
    def uses_weak_ar(self) -> bool:
        return self.weak_ar_layers > 0

    def num_weak_ar_partners(self) -> int:
        """How many NAR decoder layers get their weak AR partner in one training step."""
        return max(1, math.ceil(self.weak_ar_layer_sample_ratio * self.decoder_layers))

    def nar_loss_weight_at(self, training_step: int | None) -> float:
        """The paper's lambda at an optimizer step: `nar_loss_weight`, after the warm-in ramp from 1 when one is set.

        Without a step (`training_step=None`, e.g. a caller that does not pass it) the ramp is over."""
        if not self.weak_ar_warmup_steps or training_step is None:
            return self.nar_loss_weight
        progress = min(max(training_step, 0) / self.weak_ar_warmup_steps, 1.0)
        return 1.0 - (1.0 - self.nar_loss_weight) * progress

    def glancing_ratio(self, training_step: int | None) -> float:
        """The glancing ratio at an optimizer step: linear from start to end over `glancing_anneal_steps`."""
        progress = min(max(training_step or 0, 0) / self.glancing_anneal_steps, 1.0)
        return self.glancing_start_ratio + (self.glancing_end_ratio - self.glancing_start_ratio) * progress


__all__ = ["WeakNATConfig"]
