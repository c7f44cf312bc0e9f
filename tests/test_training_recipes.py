"""Recipes parse, command-line flags override them, and the model section goes straight into WeakNATConfig."""

import dataclasses
import sys
from pathlib import Path

import pytest
import yaml
from training_runs import run

from hf_weaknat import WeakNATConfig, configuration_weaknat
from hf_weaknat.tokenization_weaknat import BLANK_ID, BOS_ID, EOS_ID, PAD_ID
from training import arguments, train
from training.ar_baseline import MARIAN_FIELDS, build_marian_baseline

CONFIGS = Path(__file__).resolve().parents[1] / "training/configs"
RECIPES = ["demo.yaml", "multi30k_de_en.yaml", "multi30k_teacher.yaml", "iwslt14_de_en.yaml", "wmt14_en_de.yaml",
           "wmt16_en_ro.yaml"]
NAR_RECIPES = [r for r in RECIPES if r != "multi30k_teacher.yaml"]
# Another valid value of each str field, from the config's own lists of allowed values
CHOICES = {"activation_function": configuration_weaknat.ACTIVATIONS,
           "upsample_method": configuration_weaknat.UPSAMPLE_METHODS,
           "weak_ar_loss_reduction": configuration_weaknat.WEAK_AR_LOSS_REDUCTIONS,
           "init_scheme": configuration_weaknat.INIT_SCHEMES, "nar_type": configuration_weaknat.NAR_TYPES,
           "decoder_input": configuration_weaknat.DECODER_INPUTS}


class VocabularyOf:
    """What build_config reads from a tokenizer: its length and special ids (fixed by train_weaknat_tokenizer)."""

    pad_token_id, bos_token_id, eos_token_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def get_vocab(self):
        return {"<blank>": BLANK_ID}


def changed_value(name: str):
    """A valid value of a WeakNATConfig field that differs from its default."""
    default = getattr(WeakNATConfig(), name)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return 2 * default or 1  # doubled sizes keep d_model divisible by the heads
    if isinstance(default, float):
        return 0.25 if default != 0.25 else 0.5  # every float field accepts it (rates, ratios, init_std)
    return next(choice for choice in CHOICES[name] if choice != default)


def test_the_model_fields_are_the_config_fields_less_those_of_the_tokenizer():
    declared = set(WeakNATConfig.__annotations__)
    assert set(arguments.MODEL_FIELDS) == declared - set(arguments.FROM_TOKENIZER) - {"is_encoder_decoder"}
    assert not hasattr(arguments, "ModelArguments")  # no mirrored list of the config's fields


@pytest.mark.parametrize("name", sorted(arguments.MODEL_FIELDS))
def test_every_model_field_is_settable_from_a_recipe_and_from_the_command_line(name, tmp_path):
    value = changed_value(name)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"model": {name: value}}))
    flag = str(value).lower() if isinstance(value, bool) else str(value)
    for argv in ([str(tmp_path / "recipe.yaml")], [f"--{name}", flag]):
        model, _, train_args = arguments.parse_arguments(argv)
        assert model.fields == {name: value}
        config = train.build_config(model, VocabularyOf(1000), train_args.max_steps)
        assert getattr(config, name) == value and type(getattr(config, name)) is type(value), argv


@pytest.mark.parametrize("recipe", NAR_RECIPES)
@pytest.mark.parametrize("variant, flags, weak_ar_layers, glancing", [
    ("ctc", ["--weak_ar_layers", "0"], 0, False),
    ("weak_ar", [], 1, False),
    ("weak_ar_glancing", ["--glancing", "true"], 1, True),
])
def test_every_recipe_runs_as_plain_ctc_weak_ar_or_glancing(recipe, variant, flags, weak_ar_layers, glancing):
    model, data_args, train_args = arguments.parse_arguments([str(CONFIGS / recipe), *flags])
    config = train.build_config(model, VocabularyOf(1000), train_args.max_steps)
    assert (config.weak_ar_layers, config.glancing) == (weak_ar_layers, glancing)
    assert (config.vocab_size, config.pad_token_id, config.blank_token_id) == (1000, PAD_ID, BLANK_ID)
    assert config.glancing_anneal_steps == model.fields.get("glancing_anneal_steps", train_args.max_steps)
    recipe_values = yaml.safe_load((CONFIGS / recipe).read_text())["model"]
    for name, value in recipe_values.items():
        if f"--{name}" not in flags:
            assert getattr(config, name) == value, name


def test_fields_not_given_take_the_configs_defaults_and_glancing_anneals_over_the_run():
    model, _, train_args = arguments.parse_arguments(["--max_steps", "1234"])
    assert (model.model_type, model.fields) == ("weaknat", {})
    config = train.build_config(model, VocabularyOf(1000), train_args.max_steps)
    defaults = WeakNATConfig()
    assert all(getattr(config, name) == getattr(defaults, name) for name in arguments.MODEL_FIELDS
               if name != "glancing_anneal_steps")
    assert config.glancing_anneal_steps == 1234
    model, _, _ = arguments.parse_arguments(["--max_steps", "1234", "--glancing_anneal_steps", "99"])
    assert train.build_config(model, VocabularyOf(1000), 1234).glancing_anneal_steps == 99


@pytest.mark.parametrize("recipe, dropout, beta2", [("iwslt14_de_en.yaml", 0.3, 0.98), ("wmt14_en_de.yaml", 0.1, 0.999),
                                                    ("wmt16_en_ro.yaml", 0.1, 0.999)])
def test_paper_recipes_carry_the_paper_hyperparameters(recipe, dropout, beta2):
    model, data_args, train_args = arguments.parse_arguments([str(CONFIGS / recipe)])
    config = train.build_config(model, VocabularyOf(10000), train_args.max_steps)
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (512, 6, 6)
    assert (config.encoder_ffn_dim, config.encoder_attention_heads) == (2048, 8)
    assert config.dropout == dropout and (train_args.adam_beta1, train_args.adam_beta2) == (0.9, beta2)
    assert (train_args.learning_rate, train_args.warmup_steps, train_args.weight_decay) == (5e-4, 10000, 0.01)
    assert train_args.mixed_precision == "bf16" and train_args.keep_best == 5
    tokens_per_update = train_args.max_tokens * train_args.gradient_accumulation_steps
    if recipe.startswith("iwslt"):
        assert (tokens_per_update, train_args.max_steps) == (16384, 250000)
    else:  # 8 processes in the accelerate DDP config
        assert (tokens_per_update * 8, train_args.max_steps) == (65536, 300000)
    assert (data_args.source_lang, data_args.target_lang) == {"iwslt14_de_en.yaml": ("de", "en"),
                                                              "wmt14_en_de.yaml": ("en", "de"),
                                                              "wmt16_en_ro.yaml": ("en", "ro")}[recipe]


def test_command_line_overrides_the_recipe(tmp_path):
    model, data_args, train_args = arguments.parse_arguments(
        [str(CONFIGS / "demo.yaml"), "--max_steps", "50", "--output_dir", str(tmp_path), "--d_model", "64",
         "--weak_ar_share_parameters", "false", "--dataset", "wmt/wmt14", "--learning_rate", "3e-4", "--glancing"])
    assert (train_args.max_steps, train_args.output_dir, train_args.learning_rate) == (50, str(tmp_path), 3e-4)
    assert (model.fields["d_model"], model.fields["weak_ar_share_parameters"], model.fields["glancing"]) == (
        64, False, True)  # a bare boolean flag means true
    assert data_args.dataset == "wmt/wmt14"
    assert model.fields["encoder_layers"] == yaml.safe_load((CONFIGS / "demo.yaml").read_text())["model"][
        "encoder_layers"]


def test_json_recipes_work_and_unknown_names_are_rejected_by_name(tmp_path):
    (tmp_path / "r.json").write_text('{"training": {"max_steps": 7}, "model": {"d_model": 32, "model_type": "marian"}}')
    model, _, train_args = arguments.parse_arguments([str(tmp_path / "r.json")])
    assert (model.model_type, model.fields, train_args.max_steps) == ("marian", {"d_model": 32}, 7)
    (tmp_path / "bad.yaml").write_text("model:\n  d_modle: 32\n")
    with pytest.raises(ValueError, match="Unknown model field 'd_modle' \\(did you mean 'd_model'\\?\\)"):
        arguments.parse_arguments([str(tmp_path / "bad.yaml")])
    with pytest.raises(ValueError, match="'d_modle' is no model, data or training field"):
        arguments.parse_arguments(["--d_modle", "256"])
    with pytest.raises(ValueError, match="'d_mod'"):  # no abbreviations either
        arguments.parse_arguments(["--d_mod", "256"])
    (tmp_path / "misplaced.yaml").write_text("data:\n  max_steps: 3\n")
    with pytest.raises(ValueError, match="Unknown data field 'max_steps'"):
        arguments.parse_arguments([str(tmp_path / "misplaced.yaml")])
    (tmp_path / "section.yaml").write_text("models:\n  d_model: 3\n")
    with pytest.raises(ValueError, match="Unknown recipe section 'models'"):
        arguments.parse_arguments([str(tmp_path / "section.yaml")])


@pytest.mark.parametrize("name", arguments.FROM_TOKENIZER)
def test_the_tokenizers_fields_are_not_model_fields_of_a_recipe(name, tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": {name: 5}}))
    with pytest.raises(ValueError, match=f"Model field '{name}' is taken from the run's tokenizer"):
        arguments.parse_arguments([str(tmp_path / "r.yaml")])


@pytest.mark.parametrize("argv, message", [
    (["--dropout", "2"], "WeakNATConfig.dropout must be in \\[0, 1\\]"),
    (["--d_model", "100", "--encoder_attention_heads", "8"], "divisible by encoder_attention_heads"),
    (["--upsample_method", "cubic"], "WeakNATConfig.upsample_method must be one of"),
    (["--model_type", "marian", "--label_smoothing", "1.0"], "WeakNATConfig.label_smoothing"),
])
def test_the_config_validates_the_values_when_the_arguments_are_parsed(argv, message):
    with pytest.raises(ValueError, match=message):
        arguments.parse_arguments(argv)


def test_a_value_of_the_wrong_type_in_a_recipe_names_the_field(tmp_path):
    (tmp_path / "r.yaml").write_text("model:\n  d_model: 25.5\n")
    with pytest.raises(ValueError, match="field 'd_model'"):
        arguments.parse_arguments([str(tmp_path / "r.yaml")])


@pytest.mark.parametrize("name", sorted(set(arguments.MODEL_FIELDS) - set(MARIAN_FIELDS)))
def test_the_marian_baseline_refuses_every_weaknat_only_field(name, tmp_path):
    value = changed_value(name)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": {"model_type": "marian", name: value}}))
    flag = str(value).lower() if isinstance(value, bool) else str(value)
    for argv in ([str(tmp_path / "r.yaml")], ["--model_type", "marian", f"--{name}", flag]):
        with pytest.raises(ValueError, match=f"{name}={value!r}: WeakNAT-only, model_type marian .* would ignore it"):
            arguments.parse_arguments(argv)


# the main job's recipe picks a NAR-only shape for speed (upsample_ratio 2); its AR counterpart is the teacher's recipe
@pytest.mark.parametrize("recipe", [r for r in NAR_RECIPES if r != "demo.yaml"])
def test_a_nar_recipe_trains_the_marian_baseline_with_its_shared_fields(recipe, tokenizer):
    """The recipes keep WeakNAT-only fields at their defaults, so each also serves `--model_type marian`."""
    model, _, _ = arguments.parse_arguments([str(CONFIGS / recipe), "--model_type", "marian"])
    marian = build_marian_baseline(model.fields, tokenizer)
    recipe_values = yaml.safe_load((CONFIGS / recipe).read_text())["model"]
    assert {name: getattr(marian.config, name) for name in recipe_values if name in MARIAN_FIELDS[:-1]} == {
        name: value for name, value in recipe_values.items() if name in MARIAN_FIELDS[:-1]}


def test_the_marian_baseline_takes_the_shared_fields_and_label_smoothing(tokenizer):
    sizes = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=48, max_position_embeddings=40, dropout=0.3,
                 attention_dropout=0.1, activation_dropout=0.2)
    model, _, _ = arguments.parse_arguments(
        [str(CONFIGS / "multi30k_teacher.yaml"), *(f"--{k}={v}" for k, v in sizes.items()), "--label_smoothing", "0.2"])
    assert model.model_type == "marian" and set(model.fields) <= set(MARIAN_FIELDS)
    marian = build_marian_baseline(model.fields, tokenizer)
    assert {name: getattr(marian.config, name) for name in sizes} == sizes and marian.label_smoothing == 0.2
    defaults = build_marian_baseline({}, tokenizer)  # a field not given: WeakNATConfig's default, as for the NAR
    assert (defaults.config.d_model, defaults.config.max_position_embeddings) == (512, 512)
    assert defaults.label_smoothing == WeakNATConfig().label_smoothing


def test_the_run_description_is_the_recipe_as_given_and_the_resolved_config(tmp_path):
    model, data_args, train_args = arguments.parse_arguments([str(CONFIGS / "demo.yaml"), "--glancing", "true"])
    config = train.build_config(model, VocabularyOf(1000), train_args.max_steps)
    description = train.run_description(model, data_args, train_args, config)
    (tmp_path / "run_args.json").write_text(yaml.safe_dump({k: v for k, v in description.items()
                                                            if k != "model_config"}))
    again, data_again, train_again = arguments.parse_arguments([str(tmp_path / "run_args.json")])  # a recipe itself
    assert (again, data_again, train_again) == (model, data_args, train_args)
    assert description["model"] == {"model_type": "weaknat", **yaml.safe_load((CONFIGS / "demo.yaml").read_text())[
        "model"], "glancing": True}
    assert description["model_config"] == config.to_dict()
    assert description["model_config"]["glancing_anneal_steps"] == train_args.max_steps
    assert dataclasses.asdict(data_args) == description["data"]


def test_train_runs_as_a_module_and_its_help_lists_every_model_field_with_its_type():
    help_text = run([sys.executable, "-m", "training.train", "--help"]).stdout
    for name, annotation in arguments.MODEL_FIELDS.items():
        kind = "BOOL" if annotation is bool else arguments.value_type(annotation).__name__.upper()
        assert f"--{name} {kind}" in help_text or f"--{name} [{kind}]" in help_text, name
    assert "(default: max_steps)" in help_text and "--model_type {weaknat,marian}" in help_text
