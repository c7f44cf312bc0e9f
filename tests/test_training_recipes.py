"""Recipes parse, command-line flags override them, and model arguments map onto WeakNATConfig one to one."""

import dataclasses
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "training"):  # training/ is a folder of scripts, not a package
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import arguments  # noqa: E402
import train  # noqa: E402
from hf_weaknat import WeakNATConfig  # noqa: E402
from hf_weaknat.tokenization_weaknat import BLANK_ID, BOS_ID, EOS_ID, PAD_ID  # noqa: E402

CONFIGS = REPO / "training/configs"
RECIPES = ["demo.yaml", "multi30k_de_en.yaml", "iwslt14_de_en.yaml", "wmt14_en_de.yaml", "wmt16_en_ro.yaml"]


class VocabularyOf:
    """What build_config reads from a tokenizer: its length and special ids (fixed by train_weaknat_tokenizer)."""

    pad_token_id, bos_token_id, eos_token_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def get_vocab(self):
        return {"<blank>": BLANK_ID}


def test_model_arguments_are_weaknat_config_fields_with_its_defaults():
    defaults = WeakNATConfig()
    for f in dataclasses.fields(arguments.ModelArguments):
        if f.name in ("model_type", "glancing_anneal_steps"):  # model family; anneal default = max_steps
            continue
        assert hasattr(defaults, f.name), f.name
        assert f.default == getattr(defaults, f.name), f.name


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("variant, flags, weak_ar_layers, glancing", [
    ("ctc", ["--weak_ar_layers", "0"], 0, False),
    ("weak_ar", [], 1, False),
    ("weak_ar_glancing", ["--glancing", "true"], 1, True),
])
def test_every_recipe_runs_as_plain_ctc_weak_ar_or_glancing(recipe, variant, flags, weak_ar_layers, glancing):
    model_args, data_args, train_args = arguments.parse_arguments([str(CONFIGS / recipe), *flags])
    config = train.build_config(model_args, VocabularyOf(1000), train_args.max_steps)
    assert (config.weak_ar_layers, config.glancing) == (weak_ar_layers, glancing)
    assert config.vocab_size == 1000 and config.blank_token_id == BLANK_ID
    assert config.glancing_anneal_steps == (model_args.glancing_anneal_steps or train_args.max_steps)
    recipe_values = yaml.safe_load((CONFIGS / recipe).read_text())["model"]
    for name, value in recipe_values.items():
        if f"--{name}" not in flags:
            assert getattr(config, name) == value, name


@pytest.mark.parametrize("recipe, dropout, beta2", [("iwslt14_de_en.yaml", 0.3, 0.98), ("wmt14_en_de.yaml", 0.1, 0.999),
                                                    ("wmt16_en_ro.yaml", 0.1, 0.999)])
def test_paper_recipes_carry_the_paper_hyperparameters(recipe, dropout, beta2):
    model_args, data_args, train_args = arguments.parse_arguments([str(CONFIGS / recipe)])
    assert (model_args.d_model, model_args.encoder_layers, model_args.decoder_layers) == (512, 6, 6)
    assert (model_args.encoder_ffn_dim, model_args.encoder_attention_heads) == (2048, 8)
    assert model_args.dropout == dropout and (train_args.adam_beta1, train_args.adam_beta2) == (0.9, beta2)
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
    model_args, data_args, train_args = arguments.parse_arguments(
        [str(CONFIGS / "demo.yaml"), "--max_steps", "50", "--output_dir", str(tmp_path), "--d_model", "64",
         "--weak_ar_share_parameters", "false", "--dataset", "wmt/wmt14", "--learning_rate", "3e-4"])
    assert (train_args.max_steps, train_args.output_dir, train_args.learning_rate) == (50, str(tmp_path), 3e-4)
    assert (model_args.d_model, model_args.weak_ar_share_parameters) == (64, False)
    assert data_args.dataset == "wmt/wmt14"
    assert model_args.encoder_layers == yaml.safe_load((CONFIGS / "demo.yaml").read_text())["model"]["encoder_layers"]


def test_json_recipes_work_and_unknown_names_are_rejected(tmp_path):
    (tmp_path / "r.json").write_text('{"training": {"max_steps": 7}, "model": {"d_model": 32}}')
    model_args, _, train_args = arguments.parse_arguments([str(tmp_path / "r.json")])
    assert (model_args.d_model, train_args.max_steps) == (32, 7)
    (tmp_path / "bad.yaml").write_text("model:\n  d_modell: 32\n")
    with pytest.raises(ValueError, match="d_modell"):
        arguments.parse_arguments([str(tmp_path / "bad.yaml")])
    (tmp_path / "misplaced.yaml").write_text("data:\n  max_steps: 3\n")
    with pytest.raises(ValueError, match="max_steps"):
        arguments.parse_arguments([str(tmp_path / "misplaced.yaml")])
