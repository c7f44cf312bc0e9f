"""The autoregressive baseline and distillation teacher: transformers' MarianMTModel, trained by train.py.

`--model_type marian` trains it with the NAR's tokenizer, data pipeline, batching, optimiser and schedule; only
the model and its loss differ. The same sizes as the NAR (d_model, layers, heads, FFN, dropout), post-LN, ReLU,
shared and tied embeddings, Marian's conventions (decoder start = pad), label-smoothed cross-entropy (the paper's
AR baseline). Its export is a plain MarianMTModel folder that any transformers user (and distill.py) can load.
"""

import torch
import torch.nn.functional as F
from transformers import MarianConfig, MarianMTModel
from transformers.models.marian.modeling_marian import shift_tokens_right

from hf_weaknat import WeakNATConfig

# The model fields the AR baseline shares with WeakNAT. The others (upsampling, weak AR, glancing, pre-LN, loss
# weights...) have no meaning for it: a recipe may keep them at WeakNATConfig's defaults (one recipe serves both
# models), any other value is refused rather than silently ignored
MARIAN_FIELDS = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
                 "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings", "dropout", "attention_dropout",
                 "activation_dropout", "label_smoothing")


def marian_config(tokenizer, *, d_model: int, encoder_layers: int, decoder_layers: int, encoder_attention_heads: int,
                  decoder_attention_heads: int, encoder_ffn_dim: int, decoder_ffn_dim: int, max_position_embeddings: int,
                  dropout: float = 0.1, attention_dropout: float = 0.0, activation_dropout: float = 0.0,
                  **extra) -> MarianConfig:
    """A MarianConfig of the given sizes in Marian's vocabulary layout: the tokenizer's pieces, then one extra id.

    As in every converted OPUS-MT model, that last id is the decoder start and the model's pad (a zero embedding,
    never an output), which is what CTranslate2's Marian converter expects: it drops the last row and starts the
    decoder from a zero vector. Sources are still padded with the tokenizer's `<pad>` under an attention mask.
    """
    start_id = len(tokenizer)
    return MarianConfig(
        vocab_size=len(tokenizer) + 1, d_model=d_model, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=encoder_attention_heads, decoder_attention_heads=decoder_attention_heads,
        encoder_ffn_dim=encoder_ffn_dim, decoder_ffn_dim=decoder_ffn_dim, dropout=dropout,
        attention_dropout=attention_dropout, activation_dropout=activation_dropout, activation_function="relu",
        max_position_embeddings=max_position_embeddings, scale_embedding=True, share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True, pad_token_id=start_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, decoder_start_token_id=start_id, forced_eos_token_id=tokenizer.eos_token_id,
        **extra)


def set_marian_generation_defaults(model: MarianMTModel, tokenizer) -> MarianMTModel:
    """Generation in the tokenizer's ids: outputs padded with its `<pad>` (so they decode, and a source without an
    attention mask is masked correctly), the decoder start never generated (OPUS-MT's `bad_words_ids`)."""
    config = model.generation_config
    config.pad_token_id = tokenizer.pad_token_id
    config.decoder_start_token_id = model.config.decoder_start_token_id
    config.eos_token_id = config.forced_eos_token_id = tokenizer.eos_token_id
    config.bad_words_ids = [[model.config.decoder_start_token_id]]
    config.max_length = model.config.max_position_embeddings
    return model


class MarianBaseline(MarianMTModel):
    """MarianMTModel with the loss the paper's AR baseline trains on: label-smoothed token cross-entropy.

    `forward(input_ids, attention_mask, labels)` takes train.py's batches (labels padded with -100) and ignores the
    NAR's `training_step`. Saved checkpoints load back as plain `MarianMTModel`s (same weights, same config).
    """

    def __init__(self, config: MarianConfig, label_smoothing: float = 0.1):
        super().__init__(config)
        self.label_smoothing = label_smoothing

    def forward(self, input_ids=None, attention_mask=None, labels=None, training_step=None, **kwargs):
        if labels is not None and kwargs.get("decoder_input_ids") is None:
            kwargs["decoder_input_ids"] = shift_tokens_right(labels, self.config.pad_token_id,
                                                             self.config.decoder_start_token_id)
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if labels is not None:  # mean over target tokens, as MarianMTModel's own loss, plus smoothing
            # the decoder start (last id) is never a target: leaving it out of the softmax keeps its tied embedding
            # at exactly zero, the start vector CTranslate2 assumes
            logits = out.logits[..., :self.config.decoder_start_token_id]
            out.loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                       label_smoothing=self.label_smoothing)
        return out


def check_marian_fields(fields: dict):
    """Refuse WeakNAT-only fields set to anything but their default (the baseline would ignore them)."""
    defaults = WeakNATConfig()
    ignored = [f"{name}={value!r}" for name, value in fields.items()
               if name not in MARIAN_FIELDS and value != getattr(defaults, name)]
    if ignored:
        raise ValueError(f"{', '.join(ignored)}: WeakNAT-only, model_type marian (a post-LN, ReLU MarianMTModel of "
                         f"the same sizes) would ignore it; it takes {', '.join(MARIAN_FIELDS)}")


def build_marian_baseline(fields: dict, tokenizer) -> MarianBaseline:
    """The baseline from a recipe's model fields; a field not given takes WeakNATConfig's default, which also
    validates the values (they mean the same for both models)."""
    check_marian_fields(fields)
    shared = WeakNATConfig(**fields)
    sizes = {name: getattr(shared, name) for name in MARIAN_FIELDS if name != "label_smoothing"}
    model = MarianBaseline(marian_config(tokenizer, **sizes), label_smoothing=shared.label_smoothing)
    return set_marian_generation_defaults(model, tokenizer)


def generation_limits(model, input_ids: torch.Tensor, ratio: float = 2.0) -> dict:
    """`generate` arguments bounding an AR model's output: ratio x source + 10 tokens, within its positions.

    A NAR model's output length is fixed by its frames, so it needs none.
    """
    if model.config.model_type == "weaknat":
        return {}
    new_tokens = int(ratio * input_ids.shape[1]) + 10
    positions = getattr(model.config, "max_position_embeddings", None)
    return {"max_new_tokens": min(new_tokens, positions - 1) if positions else new_tokens}


def export_marian(model: MarianMTModel, tokenizer, export_dir) -> None:
    """The baseline as a plain MarianMTModel checkpoint (class name, config and weights) with its tokenizer."""
    plain = MarianMTModel(model.config)
    plain.load_state_dict(model.state_dict())
    plain.config.architectures = ["MarianMTModel"]
    set_marian_generation_defaults(plain, tokenizer)
    plain.save_pretrained(export_dir)
    tokenizer.save_pretrained(export_dir)
