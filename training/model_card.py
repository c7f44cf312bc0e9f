"""Model card of an exported translator: `model_cards/weaknat_translation.md` filled with the run's facts.

The YAML header carries a `model-index` with sacreBLEU and chrF (signature as `metric_config`), so the Hub shows
the scores; the body states data, direction, distillation, decoding, parameter count and the learning curve.
"""

import json
import shutil
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_weaknat import export_for_hub
from hf_weaknat.export import check_ranking_partner
from training.ar_baseline import export_marian
from training.checkpoints import refuse_non_finite, written_whole

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
# What differs between the two model families train.py exports, by config.model_type
FAMILIES = {
    "weaknat": {"template": CARDS / "weaknat_translation.md", "decoding": "greedy CTC (argmax, collapse repeats, "
                "drop blanks)", "tags": ["non-autoregressive", "ctc", "weak-ar-decoders", "custom_code"],
                "unfit_target": "whose target cannot fit the CTC frames"},
    "marian": {"template": CARDS / "marian_baseline.md", "decoding": "greedy autoregressive",
               "tags": ["autoregressive", "marian", "baseline"], "unfit_target": "with targets over the positions"},
    # a WeakNAT with nar_type="vanilla" (`family_of`)
    "weaknat-vanilla": {"template": CARDS / "weaknat_translation.md", "decoding": "greedy vanilla NAR (most probable "
                        "length, argmax per position, repeats kept)", "tags": ["non-autoregressive", "vanilla-nat",
                        "length-prediction", "weak-ar-decoders", "custom_code"],
                        "unfit_target": "with targets over the decoder's positions"},
}
NAR_TYPE_TEXT = {"ctc": ("CTC", "CTC"), "vanilla": ("vanilla, with length prediction", "vanilla NAR")}
SCORE_KEYS = {"sacrebleu": "bleu", "chrf": "chrf"}  # model-index metric type -> key in evaluation's scores
LANGUAGE_NAMES = {"de": "German", "en": "English", "ro": "Romanian", "fr": "French", "cs": "Czech"}


def dataset_identity(dataset: str) -> tuple[str, bool]:
    """(name to show, is it a Hub id); a local directory is shown by its folder name."""
    return (Path(dataset).name, False) if Path(dataset).is_dir() else (dataset, True)


def family_of(config) -> dict:
    """The FAMILIES entry of a config: by model_type, and for a WeakNAT by its NAR type."""
    vanilla = config.model_type == "weaknat" and config.nar_type == "vanilla"
    return FAMILIES["weaknat-vanilla" if vanilla else config.model_type]


def method_text(config) -> tuple[str, str]:
    """How the weak AR decoders were used: (one phrase for the summary, details for the training section)."""
    if config.model_type != "weaknat":
        return "", ""
    if config.weak_ar_layers == 0:
        name = NAR_TYPE_TEXT[config.nar_type][1]
        summary, details = f"as a plain {name} model (no weak AR decoders)", f"none (plain {name} baseline)"
    else:
        summary = "with auxiliary weak autoregressive decoders"
        sharing = "one shared" if config.weak_ar_share_parameters else "one per layer"
        details = (f"{config.weak_ar_layers}-layer, {sharing}, attached to a random "
                   f"{config.weak_ar_layer_sample_ratio:g} of the NAR decoder layers each step"
                   f"{' and to the encoder' if config.weak_ar_on_encoder else ''}, loss weight lambda = "
                   f"{config.nar_loss_weight:g}")
    if config.glancing:
        summary += " and glancing training"
        details += (f"; glancing ratio {config.glancing_start_ratio:g} -> {config.glancing_end_ratio:g} over "
                    f"{config.glancing_anneal_steps} steps")
    return summary, details


def build_model_card(*, model_name: str, config, num_parameters: int, scores: dict, eval_split: str, data: dict,
                     training: dict, filtered: dict, steps: int, example_source: str, repo_or_path: str,
                     learning_curve: str = "learning_curve.png", skipped_steps: int = 0,
                     kept_partner_parameters: int = 0) -> ModelCard:
    """`data`/`training`: the run's data and training arguments as dicts; `scores`: from evaluation.evaluate_split;
    `kept_partner_parameters`: the size of a weak AR decoder the export keeps for ranking (0: none kept)."""
    dataset_name, on_hub = dataset_identity(data["dataset"])
    family = family_of(config)
    source, target = data["source_lang"], data["target_lang"]
    task = f"Translation {source}→{target}"
    results = [EvalResult(task_type="translation", task_name=task, dataset_type=dataset_name, dataset_name=dataset_name,
                          dataset_config=data.get("dataset_config"), dataset_split=eval_split, metric_type=metric,
                          metric_name=name, metric_value=round(scores[SCORE_KEYS[metric]], 2),
                          metric_config=scores[f"{SCORE_KEYS[metric]}_signature"])
               for metric, name in (("sacrebleu", "sacreBLEU"), ("chrf", "chrF"))]
    card_data = ModelCardData(
        model_name=model_name, language=[source, target], license="apache-2.0", library_name="transformers",
        pipeline_tag="translation", metrics=["sacrebleu", "chrf"], datasets=[dataset_name] if on_hub else None,
        tags=family["tags"] + (["distilled"] if data["distilled"] else []),
        eval_results=results,
    )
    summary, weak_ar = method_text(config)
    return ModelCard.from_template(
        card_data, template_path=str(family["template"]), model_id=model_name, repo_or_path=repo_or_path,
        source_name=LANGUAGE_NAMES.get(source, source), target_name=LANGUAGE_NAMES.get(target, target),
        source_lang=source, target_lang=target, method_description=summary, weak_ar_text=weak_ar,
        num_parameters_text=f"{num_parameters:,}", config=config,
        kept_partner_text=f"{kept_partner_parameters:,}" if kept_partner_parameters else "",
        nar_type_text=NAR_TYPE_TEXT.get(getattr(config, "nar_type", None), ("", ""))[0],
        nar_short=NAR_TYPE_TEXT.get(getattr(config, "nar_type", None), ("", ""))[1],
        example_source=example_source.replace('"', '\\"'),
        dataset_name=dataset_name, dataset_id=data["dataset"] if on_hub else dataset_name,
        dataset_config=data.get("dataset_config"), eval_split=eval_split, distilled=data["distilled"],
        decoding=family["decoding"], bleu=scores["bleu"], chrf=scores["chrf"],
        bleu_signature=scores["bleu_signature"], chrf_signature=scores["chrf_signature"],
        eval_sentences=scores["num_sentences"], learning_curve=learning_curve,
        filtered_text=filtered_text(filtered, config, family) if filtered else "none counted",
        optimisation_text=(f"{steps} updates, AdamW betas ({training['adam_beta1']}, {training['adam_beta2']}), lr "
                           f"{training['learning_rate']:g}, inverse-sqrt schedule with {training['warmup_steps']} "
                           f"warmup steps, weight decay {training['weight_decay']:g}, {training['max_tokens']} tokens "
                           f"per device x {training['gradient_accumulation_steps']} accumulation, mixed precision "
                           f"{training['mixed_precision']}"
                           + (f"; {skipped_steps} updates skipped for a non-finite loss or gradients"
                              if skipped_steps else "")),
    )


def filtered_text(filtered: dict, config, family: dict) -> str:
    """The training pairs left out, by reason (data.REASONS' labels; a reason that never occurred is not named)."""
    text = (f"{filtered.get('source_too_long', 0)} with sources over {config.max_position_embeddings} tokens, "
            f"{filtered.get('target_does_not_fit', 0)} {family['unfit_target']}")
    for label, what in (("length_offset_out_of_range", "whose length offset is beyond the length classifier's range"),
                        ("empty_source", "with an empty source"), ("invalid_utf8", "that are not valid UTF-8")):
        if filtered.get(label):
            text += f", {filtered[label]} {what}"
    return text + f" (of {sum(filtered.values())} pairs)"


def export_with_card(model, tokenizer, export_dir: Path, *, run_args: dict, scores: dict, eval_split: str,
                     filtered: dict, steps: int, example_source: str, learning_curve: Path | None = None,
                     repo_id: str | None = None, skipped_steps: int = 0, weights_dtype=None,
                     shown_as: str | None = None, keep_ranking_partner: bool = False) -> Path:
    """`export_for_hub` (a WeakNAT) or a plain MarianMTModel folder (the AR baseline), then README.md (the card), the
    learning curve it shows and eval_results.json. Weights holding NaN or infinity are refused before anything is
    written (NonFiniteWeightsError naming the step and the first bad tensor). `weights_dtype`: a WeakNAT's weights
    stored in that dtype (`export_for_hub`). `shown_as`: the name the card loads the model by in its examples (a Hub
    id or a path; default: `repo_id`, else the export folder). `keep_ranking_partner`: a vanilla WeakNAT keeps its
    shared weak AR decoder to rank its length beam (`export_for_hub`), and the card says so."""
    refuse_non_finite(model.state_dict(), f"an export to {export_dir}", steps)
    export_dir = Path(export_dir)
    num_parameters = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("weak_ar."))
    if keep_ranking_partner:
        check_ranking_partner(model.config)
    partner_parameters = sum(p.numel() for p in model.weak_ar.parameters()) if keep_ranking_partner else 0
    shown_as = shown_as or repo_id
    card = build_model_card(model_name=shown_as.split("/")[-1] if shown_as else export_dir.resolve().parent.name,
                            config=model.config, num_parameters=num_parameters, scores=scores, eval_split=eval_split,
                            data=run_args["data"], training=run_args["training"], filtered=filtered, steps=steps,
                            example_source=example_source, repo_or_path=shown_as or str(export_dir),
                            skipped_steps=skipped_steps, kept_partner_parameters=partner_parameters)
    kept = {k: v for k, v in scores.items() if k != "predictions"}
    with written_whole(export_dir, "the export") as folder:  # a failed write leaves no export that looks complete
        if model.config.model_type == "weaknat":
            export_for_hub(model, folder, tokenizer, weights_dtype=weights_dtype,
                           keep_ranking_partner=keep_ranking_partner)
        else:
            export_marian(model, tokenizer, folder)
        if learning_curve is not None and Path(learning_curve).is_file():
            shutil.copyfile(learning_curve, folder / "learning_curve.png")
        card.save(folder / "README.md")
        (folder / "eval_results.json").write_text(json.dumps({"split": eval_split, "step": steps, **kept}, indent=2))
    return export_dir
