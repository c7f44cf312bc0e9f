"""The three argument dataclasses of train.py and the recipe parser (YAML or JSON, command-line flags on top).

A recipe has sections `model`, `data` and `training`, one per dataclass:

    model:
      d_model: 256
    training:
      max_steps: 1000
"""

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser


@dataclass
class ModelArguments:
    """WeakNATConfig fields, same names and defaults (paper base setup); vocabulary and special ids come from the
    tokenizer. Plain CTC: `--weak_ar_layers 0`; glancing: `--glancing true`."""

    model_type: str = field(default="weaknat", metadata={
        "help": "weaknat (the NAR translator) or marian (transformers' MarianMTModel of the same sizes: the AR "
                "baseline and distillation teacher; weak AR, upsampling and glancing fields do not apply)."})
    d_model: int = 512
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_position_embeddings: int = field(default=512, metadata={"help": "Longest source; longer pairs are dropped."})
    normalize_before: bool = False
    upsample_ratio: int = 3
    upsample_method: str = "linear"
    weak_ar_layers: int = field(default=1, metadata={"help": "Layers per weak AR decoder; 0 = plain CTC."})
    weak_ar_share_parameters: bool = True
    weak_ar_layer_sample_ratio: float = 0.5
    weak_ar_on_encoder: bool = False
    weak_ar_loss_reduction: str = "mean"
    nar_loss_weight: float = 0.5
    label_smoothing: float = 0.1
    glancing: bool = False
    glancing_start_ratio: float = 0.5
    glancing_end_ratio: float = 0.3
    glancing_anneal_steps: int | None = field(default=None, metadata={"help": "Default: max_steps."})


@dataclass
class DataArguments:
    dataset: str = field(default="training/data/multi30k", metadata={"help": "Hub id or local directory."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub config, e.g. de-en."})
    dataset_revision: str | None = None
    dataset_data_dir: str | None = None
    source_lang: str = "de"
    target_lang: str = "en"
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str | None = field(default="test", metadata={"help": "Scored at the end for the model card."})
    streaming: bool = False
    max_train_samples: int | None = None
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on validation pairs (test: all)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Saved tokenizer; default: train one."})
    vocab_size: int = field(default=8000, metadata={"help": "Joint SentencePiece vocabulary when training one."})
    distilled: bool = field(default=False, metadata={"help": "Targets are AR-teacher outputs (for the card)."})


@dataclass
class TrainingArguments:
    output_dir: str = "runs/demo"
    max_steps: int = 1000
    max_tokens: int = field(default=4096, metadata={"help": "Padded tokens per micro-batch per process."})
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    weight_decay: float = 0.01
    warmup_steps: int = 10000
    max_grad_norm: float = field(default=0.0, metadata={"help": "0 = no clipping."})
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16."})
    seed: int = 1
    logging_steps: int = 50
    eval_steps: int = 1000
    save_steps: int = 1000
    save_total_limit: int = field(default=3, metadata={"help": "Newest checkpoints kept."})
    keep_best: int = field(default=1, metadata={"help": "Best checkpoints (validation BLEU) kept as well."})
    early_stopping_patience: int = field(default=0, metadata={
        "help": "Stop after this many validations in a row without a new best BLEU; 0 = train to max_steps."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "latest, best or a path."})
    report_to: str = field(default="tensorboard", metadata={"help": "Accelerate trackers, comma-separated, or none."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Repo id to upload the export to."})


ARGUMENT_CLASSES = {"model": ModelArguments, "data": DataArguments, "training": TrainingArguments}


def parse_arguments(argv: list[str] | None = None):
    """(model, data, training) arguments: the recipe file (first argument) as defaults, command-line flags on top."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(tuple(ARGUMENT_CLASSES.values()))
    if argv and not argv[0].startswith("-"):
        recipe = yaml.safe_load(Path(argv.pop(0)).read_text())  # YAML is a superset of JSON: both work
        parser.set_defaults(**flatten_recipe(recipe or {}))
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def flatten_recipe(recipe: dict) -> dict:
    """`{section: {name: value}}` -> `{name: value}`, rejecting names that are not fields of that section."""
    flat = {}
    for section, values in recipe.items():
        if section not in ARGUMENT_CLASSES:
            raise ValueError(f"Unknown recipe section {section!r}; expected {sorted(ARGUMENT_CLASSES)}")
        names = {f.name for f in dataclasses.fields(ARGUMENT_CLASSES[section])}
        for name, value in (values or {}).items():
            if name not in names:
                raise ValueError(f"Unknown field {name!r} in recipe section {section!r}")
            flat[name] = value
    return flat
