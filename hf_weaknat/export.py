# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""Export for the Hub: the NAR translator without its weak AR decoders, loadable with or without this package.

The weak AR decoders only exist to train the NAR decoder (paper Section 3, "Inference"): the export keeps exactly
the parameters of a plain NAR model (CTC or vanilla) of the same size, turns the AR switches off in its config, and
ships the model, config and pipeline code so `trust_remote_code=True` users need nothing but transformers.

One exception, asked for by name: a vanilla model trained with shared partners can keep them
(`keep_ranking_partner=True`) to rank its length beam (`generate(num_beams=k, length_beam_ranking="partner")`, noisy
parallel decoding by the last layer's partner). It adds one weak AR decoder; greedy decoding never runs it.
"""

import copy
import shutil
from pathlib import Path

import torch

from .configuration_weaknat import WeakNATConfig
from .modeling_weaknat import WeakNATForConditionalGeneration
from .tokenization_weaknat import make_tokenizer_config_portable

PACKAGE_DIR = Path(__file__).resolve().parent
# Everything modeling_weaknat.py imports, with the pipeline. weak_ar.py and glancing.py only run in training, but the
# modeling file imports them, and shipping them keeps an export's code identical to the package's.
REMOTE_CODE_FILES = ("configuration_weaknat.py", "modeling_weaknat.py", "layers.py", "ctc.py", "ctc_generation.py",
                     "length_prediction.py", "generation.py", "weak_ar.py", "glancing.py", "pipeline_weaknat.py",
                     "saved_files.py", "static_shapes.py", "transformers_compat.py")
AUTO_MAP = {
    "AutoConfig": "configuration_weaknat.WeakNATConfig",
    "AutoModel": "modeling_weaknat.WeakNATModel",
    "AutoModelForSeq2SeqLM": "modeling_weaknat.WeakNATForConditionalGeneration",
}
# One task only, so `pipeline(model=dir, trust_remote_code=True)` can infer it; naming it "translation" lets v4-style
# `pipeline("translation", model=dir, trust_remote_code=True)` work, since custom tasks bypass the removed-task check.
CUSTOM_PIPELINES = {
    "translation": {"impl": "pipeline_weaknat.WeakNATTranslationPipeline", "pt": ["AutoModelForSeq2SeqLM"],
                    "tf": [], "type": "text"}
}


def inference_config(config: WeakNATConfig, keep_ranking_partner: bool = False) -> WeakNATConfig:
    """A copy of the config with every training-only AR switch off (no glancing; no weak AR decoders unless
    `keep_ranking_partner`, which keeps the shared one)."""
    config = copy.deepcopy(config)
    if not keep_ranking_partner:
        config.weak_ar_layers = 0
    config.weak_ar_on_encoder = False  # the encoder's partner ranks nothing (shared: the same single decoder)
    config.glancing = False
    config.architectures = ["WeakNATForConditionalGeneration"]
    return config


def check_ranking_partner(config: WeakNATConfig):
    """The partner can be kept where it has a use and stays one decoder: a vanilla model with shared partners."""
    nar_type = getattr(config, "nar_type", config.model_type)  # an AR baseline has none
    if nar_type != "vanilla":
        raise ValueError("keep_ranking_partner: the partner ranks a vanilla model's length beam; this model is "
                         f"{nar_type!r} and would never run it")
    if not config.uses_weak_ar:
        raise ValueError("keep_ranking_partner: this model has no weak AR partner to keep (weak_ar_layers=0: trained "
                         "without partners, or already an export)")
    if not config.weak_ar_share_parameters:
        raise ValueError("keep_ranking_partner needs shared partners (weak_ar_share_parameters=True): one decoder to "
                         "keep, not one per layer")


def strip_weak_decoders(model: WeakNATForConditionalGeneration,
                        keep_ranking_partner: bool = False) -> WeakNATForConditionalGeneration:
    """A new model holding the NAR weights of `model` (same values, same dtype) and no weak AR decoders; with
    `keep_ranking_partner` (a vanilla model with shared partners), their one shared decoder too."""
    if keep_ranking_partner:
        check_ranking_partner(model.config)
    nar_state = {k: v for k, v in model.state_dict().items()
                 if keep_ranking_partner or not k.startswith("weak_ar.")}
    exported = WeakNATForConditionalGeneration(inference_config(model.config, keep_ranking_partner)).to(model.dtype)
    exported.load_state_dict(nar_state, strict=True)  # strict: the export has exactly the NAR parameters
    if getattr(model, "generation_config", None) is not None:  # the caller's generate() defaults travel with it
        exported.generation_config = copy.deepcopy(model.generation_config)  # saved as generation_config.json
    return exported.eval()


def export_for_hub(model: WeakNATForConditionalGeneration, save_directory, tokenizer=None,
                   max_shard_size="2GB", weights_dtype: torch.dtype | None = None,
                   keep_ranking_partner: bool = False) -> Path:
    """Write the inference checkpoint to `save_directory` and return its path.

    Holds: config.json (AR off, auto_map, custom_pipelines), generation_config.json (the model's `generation_config`:
    `generate()` defaults), model.safetensors (no `weak_ar.*` keys unless kept), the remote code files (they run on transformers
    4.57+ and 5.x), and the tokenizer when given (its tokenizer_config.json made loadable by 4.x too).
    `weights_dtype` (e.g. `torch.float16`): the weights are stored in that dtype, half the size, while config.json
    keeps the model's own dtype, which `from_pretrained` loads them in unless asked for another.
    `keep_ranking_partner`: a vanilla model's shared weak AR decoder stays (`weak_ar.*`), for
    `generate(num_beams=k, length_beam_ranking="partner")`.
    """
    save_directory = Path(save_directory)
    exported = strip_weak_decoders(model, keep_ranking_partner)  # refuses before anything is written
    save_directory.mkdir(parents=True, exist_ok=True)
    exported.config.auto_map = dict(AUTO_MAP)
    exported.config.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)
    stored = None if weights_dtype is None else stored_weights(exported, weights_dtype)
    exported.save_pretrained(save_directory, max_shard_size=max_shard_size, state_dict=stored)
    for name in REMOTE_CODE_FILES:  # flat folder, relative imports only: what transformers' remote code loader expects
        shutil.copyfile(PACKAGE_DIR / name, save_directory / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
        if (save_directory / "tokenizer_config.json").is_file():  # loadable by transformers 4.x as well
            make_tokenizer_config_portable(save_directory)
    return save_directory


def refresh_remote_code(export_directory) -> Path:
    """Put this package's current remote code into an existing export, leaving its weights, config, tokenizer and
    card as they are: what an export (the shipped model's among them) needs after a change to the code it ships."""
    export_directory = Path(export_directory)
    if not (export_directory / "config.json").is_file():
        raise FileNotFoundError(f"{export_directory} holds no config.json: not an export")
    for stale in set(p.name for p in export_directory.glob("*.py")) - set(REMOTE_CODE_FILES):
        (export_directory / stale).unlink()
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(PACKAGE_DIR / name, export_directory / name)
    return export_directory


def stored_weights(model, dtype: torch.dtype) -> dict:
    """The model's state dict with floating-point tensors in `dtype`; tied parameters stay one tensor."""
    converted = {}  # by storage: a tied copy gets the same converted tensor as its source
    state = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr()
        if key not in converted:
            converted[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        state[name] = converted[key]
    return state


def push_export_to_hub(export_directory, repo_id: str, *, private: bool | None = None, token: str | None = None,
                       commit_message: str = "Upload WeakNAT translator (exported without weak AR decoders)",
                       revision: str | None = None):
    """Upload exactly the folder `export_for_hub` wrote (nothing is re-saved on the way)."""
    from huggingface_hub import HfApi

    export_directory = Path(export_directory)
    if not (export_directory / "config.json").is_file():
        raise FileNotFoundError(f"{export_directory} holds no config.json: run export_for_hub first")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(export_directory), commit_message=commit_message,
                             revision=revision)
