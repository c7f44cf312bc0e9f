"""What a run is told: a recipe (YAML or JSON) with sections `model`, `data` and `training`, flags on top.

    model:                 # model_type (weaknat or marian) and any WeakNATConfig field; the config validates them
      d_model: 256
      weak_ar_layers: 0
    data:                  # DataArguments
      dataset: training/corpora/multi30k
    training:              # TrainingArguments
      max_steps: 1000

The model section is not mirrored here: its fields are WeakNATConfig's own, with the config's types and defaults,
and only the values given travel to the config, which validates them. Every name is also a flag (`--d_model 256`,
`--glancing true`, `--model_type marian`); `python training/train.py --help` lists them.

Data and training values are converted and checked in one place, `check_fields` (types from the annotations, ranges
from RULES), when the dataclasses are made: a recipe value and a flag's text go through the same code, before any
data is read, and a wrong one raises a ValueError naming the field (`max_steps must be a positive integer`).
"""

import argparse
import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub.errors import StrictDataclassError
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from hf_weaknat import WeakNATConfig
from training.ar_baseline import check_marian_fields

MODEL_TYPES = ("weaknat", "marian")
# Taken from the run's tokenizer by train.py (`data.vocab_size` sets the size of a vocabulary trained for the run)
FROM_TOKENIZER = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "blank_token_id")
# The fields WeakNATConfig declares (not those it inherits from PreTrainedConfig), less the tokenizer's and the
# architecture's fixed `is_encoder_decoder`
MODEL_FIELDS = {name: kind for name, kind in WeakNATConfig.__annotations__.items()
                if name not in FROM_TOKENIZER and name != "is_encoder_decoder"}
MODEL_HELP = {
    "max_position_embeddings": "Longest source in tokens; longer training pairs are dropped.",
    "weak_ar_layers": "Layers per weak AR decoder; 0 = plain CTC.",
}
RUN_DEFAULTS = {"glancing_anneal_steps": "max_steps"}  # defaults train.py gives instead of the config's


@dataclass
class ModelSection:
    """The recipe's `model` section: which model, and the config fields set by the recipe or the command line.

    Checked when made: `model_type` is known, every name is a WeakNATConfig field, a Marian baseline gets no
    WeakNAT-only field away from its default, and WeakNATConfig validates every value (for the Marian baseline too:
    the shared fields mean the same there).
    """

    model_type: str = "weaknat"
    fields: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"Unknown model_type {self.model_type!r}: one of {MODEL_TYPES}")
        for name in self.fields:
            check_model_field(name)
        if self.model_type == "marian":
            check_marian_fields(self.fields)
        # what WeakNATConfig makes of the fields (its defaults for the rest): validated now, before any data is read
        self.resolved = weaknat_config(**self.fields)

    def as_recipe(self) -> dict:
        return {"model_type": self.model_type, **self.fields}


def weaknat_config(**fields) -> WeakNATConfig:
    """WeakNATConfig(**fields), its validation errors as ValueErrors naming the field."""
    try:
        return WeakNATConfig(**fields)
    except StrictDataclassError as error:  # a wrong type (e.g. `d_model: 25.6`): huggingface_hub's strict check
        raise ValueError(f"Invalid model field: {error}") from error


def check_model_field(name: str):
    if name in FROM_TOKENIZER:
        raise ValueError(f"Model field {name!r} is taken from the run's tokenizer (data.vocab_size sets the size of "
                         "a vocabulary trained for the run)")
    if name not in MODEL_FIELDS:
        raise ValueError(f"Unknown model field {name!r}{_did_you_mean(name, MODEL_FIELDS)}")


@dataclass
class DataArguments:
    dataset: str = field(default="training/corpora/multi30k", metadata={"help": "Hub id or local directory."})
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
    invalid_utf8: str = field(default="error", metadata={
        "help": "A line of a two-file corpus that is not valid UTF-8: error (stop, naming file and line) or skip "
                "(leave the pair out and count it as invalid_utf8)."})

    def __post_init__(self):
        check_fields(self)
        if self.source_lang == self.target_lang:
            raise ValueError(f"source_lang and target_lang must differ (both are {self.source_lang!r})")


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
    stop_when_flat: float = field(default=0.0, metadata={
        "help": "Stop once validation BLEU has flattened: its best gained less than this many BLEU points over at "
                "least the run's last quarter (the study's plateau rule, training/convergence.py); 0 = off."})
    stop_when_flat_after: int = field(default=0, metadata={
        "help": "Apply --stop_when_flat only from this many updates on, past the pauses of an early rise."})
    max_consecutive_nonfinite_steps: int = field(default=5, metadata={
        "help": "Stop the run (with an error) after this many optimizer steps in a row whose loss or gradients are "
                "not finite; each such step is skipped, warned about and counted."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "latest, best or a path."})
    report_to: str = field(default="tensorboard", metadata={"help": "Accelerate trackers, comma-separated, or none."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Repo id to upload the export to."})
    allow_recipe_change: str | None = field(default=None, metadata={
        "help": "Resuming: fields (comma-separated) that may differ from the recipe the run was trained with, e.g. "
                "learning_rate,dropout. Stopping, logging, validation and saving settings may always change."})
    compare_with: str | None = field(default=None, metadata={
        "help": "A trained model (directory or Hub repo id) that translates the same test sentences at the end: both "
                "BLEU scores and a few translations side by side."})

    def __post_init__(self):
        check_fields(self)
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError("early_stopping_patience needs validations: set eval_steps to a positive integer")
        if self.stop_when_flat and not self.eval_steps:
            raise ValueError("stop_when_flat needs validations: set eval_steps to a positive integer")


# What each data and training value must be, checked in one place (`check_fields`) when the dataclass is made, so a
# recipe value and a flag (which reaches the dataclass as the text typed) go through the same conversion and the same
# message naming the field. Fields not listed only need their annotation's type.
RULES = {
    **dict.fromkeys(["max_steps", "max_tokens", "gradient_accumulation_steps", "save_total_limit",
                     "max_consecutive_nonfinite_steps", "vocab_size", "max_train_samples", "max_eval_samples"],
                    ("a positive integer", lambda v: v >= 1)),
    **dict.fromkeys(["warmup_steps", "logging_steps", "eval_steps", "save_steps", "keep_best",
                     "early_stopping_patience", "stop_when_flat_after"],
                   ("a non-negative integer (0 = off)", lambda v: v >= 0)),
    **dict.fromkeys(["learning_rate", "weight_decay", "max_grad_norm", "stop_when_flat"],
                    ("a number >= 0", lambda v: v >= 0)),
    **dict.fromkeys(["adam_beta1", "adam_beta2"], ("a number in [0, 1)", lambda v: 0 <= v < 1)),
    "seed": ("an integer in [0, 2**32)", lambda v: 0 <= v < 2**32),
    "mixed_precision": ("one of no, bf16, fp16", lambda v: v in ("no", "bf16", "fp16")),
    "invalid_utf8": ("one of error, skip", lambda v: v in ("error", "skip")),
    **dict.fromkeys(["output_dir", "dataset", "source_lang", "target_lang", "train_split"],
                    ("a non-empty string", lambda v: bool(v.strip()))),
}
KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_fields(arguments):
    """Convert every field of a DataArguments/TrainingArguments to its annotated type and check its range, in place.

    A value may come from a recipe (a YAML/JSON value) or a flag (its text); either way a wrong one raises a
    ValueError that names the field as the user wrote it: `max_steps must be a positive integer (got 2.5)`.
    """
    # the class's annotations, not `dataclasses.fields(...).type`, which HfArgumentParser rewrites in place
    for name, annotation in typing.get_type_hints(type(arguments)).items():
        setattr(arguments, name, check_value(name, annotation, getattr(arguments, name)))


def check_value(name: str, annotation, value):
    """`value` converted to `annotation` (`int`, `float`, `bool`, `str`, or one of them `| None`) and checked against
    RULES[name]; a ValueError naming the field otherwise."""
    kinds = typing.get_args(annotation) or (annotation,)
    kind, optional = next(k for k in kinds if k is not type(None)), type(None) in kinds
    description = RULES.get(name, (KIND_NAMES[kind], None))[0]
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be {description} (got an empty value)")
    try:
        converted = _convert(value, kind)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        hint = " (a YAML yes/no/on/off is a boolean: quote it)" if kind is str and isinstance(value, bool) else ""
        raise ValueError(f"{name} must be {description} (got {value!r}){hint}") from None
    check = RULES.get(name, (None, None))[1]
    if check is not None and not check(converted):
        raise ValueError(f"{name} must be {description} (got {value!r})")
    return converted


def _convert(value, kind):
    """A recipe value or a flag's text as `kind`; raises ValueError/TypeError when it is not one."""
    if kind is bool:
        return value if isinstance(value, bool) else string_to_bool(_text(value))
    if isinstance(value, bool):  # never 1/0 for a number, nor "True" for a string
        raise TypeError(value)
    if kind is int:
        return value if isinstance(value, int) else int(_text(value).strip())  # 2.5, "2.5" and "" all fail
    if kind is float:
        number = float(value) if isinstance(value, (int, float)) else float(_text(value).strip())
        if not math.isfinite(number):
            raise ValueError(value)
        return number
    if isinstance(value, int):  # e.g. `dataset_config: 2017` in a recipe, as the flag would give it
        return str(value)
    return _text(value)


def _text(value) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


SECTIONS = {"data": DataArguments, "training": TrainingArguments}


def build_parser() -> HfArgumentParser:
    """DataArguments and TrainingArguments as HfArgumentParser makes them, then one flag per model field, typed by
    its annotation in WeakNATConfig. A model flag not given is absent: the config's own default applies."""
    parser = HfArgumentParser(tuple(SECTIONS.values()), allow_abbrev=False)
    section_fields = {f.name for section in SECTIONS.values() for f in dataclasses.fields(section)}
    for action in parser._actions:
        if action.dest in section_fields:  # the text as typed: check_fields converts and checks it, like a recipe value
            action.type = None
    model = parser.add_argument_group("model", "model_type and the WeakNATConfig fields (default: the config's)")
    model.add_argument("--model_type", "--model-type", choices=MODEL_TYPES, default="weaknat",
                       help="weaknat (the NAR translator) or marian (transformers' MarianMTModel of the same sizes: "
                            "the AR baseline and distillation teacher; WeakNAT-only fields must keep their defaults)")
    defaults = {name: RUN_DEFAULTS.get(name, getattr(WeakNATConfig(), name)) for name in MODEL_FIELDS}
    for name, annotation in MODEL_FIELDS.items():
        flags = [f"--{name}", f"--{name.replace('_', '-')}"] if "_" in name else [f"--{name}"]
        convert = value_type(annotation)
        options = {"nargs": "?", "const": True, "metavar": "BOOL"} if convert is string_to_bool else {
            "metavar": convert.__name__.upper()}  # `--glancing` alone means `--glancing true`
        model.add_argument(*flags, dest=name, type=convert, default=argparse.SUPPRESS,
                           help=f"{MODEL_HELP.get(name, '')} (default: {defaults[name]})".lstrip(), **options)
    return parser


def value_type(annotation) -> typing.Callable[[str], object]:
    """The converter of a flag's text for a field annotation: `float | int` reads as float, `bool` as true/false."""
    kinds = [kind for kind in typing.get_args(annotation) or (annotation,) if kind is not type(None)]
    return string_to_bool if bool in kinds else kinds[0]


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelSection, DataArguments, TrainingArguments]:
    """(model, data, training): the recipe file (first argument) as defaults, command-line flags on top."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-"):
        recipe = yaml.safe_load(Path(argv.pop(0)).read_text())  # YAML is a superset of JSON: both work
        parser.set_defaults(**flatten_recipe(recipe or {}))
    data_args, train_args, model, unknown = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False, return_remaining_strings=True)
    if unknown:
        name = unknown[0].lstrip("-").replace("-", "_").split("=")[0]
        known = [*MODEL_FIELDS, *(f.name for section in SECTIONS.values() for f in dataclasses.fields(section))]
        if name in FROM_TOKENIZER:
            check_model_field(name)
        raise ValueError(f"Unknown argument {unknown[0]!r}: {name!r} is no model, data or training field"
                         f"{_did_you_mean(name, known)}")
    fields = vars(model)
    return ModelSection(model_type=fields.pop("model_type"), fields=fields), data_args, train_args


def flatten_recipe(recipe: dict) -> dict:
    """`{section: {name: value}}` -> `{name: value}`, rejecting names that are not fields of their section."""
    flat = {}
    for section, values in recipe.items():
        if section not in ("model", *SECTIONS):
            raise ValueError(f"Unknown recipe section {section!r}; expected model, data or training")
        names = {f.name for f in dataclasses.fields(SECTIONS[section])} if section in SECTIONS else None
        for name, value in (values or {}).items():
            if names is None and name != "model_type":
                check_model_field(name)
            elif names is not None and name not in names:
                raise ValueError(f"Unknown {section} field {name!r}{_did_you_mean(name, names)}")
            flat[name] = value
    return flat


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
