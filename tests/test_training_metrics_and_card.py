"""Offline metric equals plain sacrebleu; the model card carries the model-index results and the run's facts."""

import sacrebleu
from huggingface_hub import ModelCard

from hf_weaknat import WeakNATConfig
from training.evaluation import TranslationScores, score_translations
from training.model_card import build_model_card

REFERENCES = ["The cat sat on the mat.", "Two dogs are playing in the snow.", "A man rides a red bicycle.",
              "Children are laughing at the park.", "\"Quoted\" words, and commas."]
PREDICTIONS = ["The cat sat on a mat.", "Two dogs play in snow.", "A man is riding a red bike.",
               "Children laugh in the park.", "\"Quoted\" words and commas."]


def test_metric_equals_plain_sacrebleu_and_reports_signatures():
    scores = score_translations(PREDICTIONS, REFERENCES)
    bleu_metric = sacrebleu.BLEU()
    bleu = bleu_metric.corpus_score(PREDICTIONS, [REFERENCES])
    chrf = sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES])
    assert 0 < bleu.score < 100  # a score that can tell right from wrong
    assert scores["bleu"] == bleu.score and scores["chrf"] == chrf.score
    assert scores["bleu_signature"] == str(bleu_metric.get_signature())
    assert "tok:13a" in scores["bleu_signature"] and "nc:6" in scores["chrf_signature"]


def test_metric_works_incrementally_like_any_evaluate_metric():
    metric = TranslationScores(keep_in_memory=True)
    metric.add_batch(predictions=PREDICTIONS[:2], references=REFERENCES[:2])
    metric.add_batch(predictions=PREDICTIONS[2:], references=REFERENCES[2:])
    assert metric.compute()["bleu"] == sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score


def make_card(config, distilled=False, dataset="wmt/wmt14", kept_partner_parameters=0):
    scores = score_translations(PREDICTIONS, REFERENCES) | {"num_sentences": len(REFERENCES)}
    data = {"dataset": dataset, "dataset_config": "de-en", "source_lang": "de", "target_lang": "en",
            "distilled": distilled}
    training = {"adam_beta1": 0.9, "adam_beta2": 0.98, "learning_rate": 5e-4, "warmup_steps": 10000,
                "weight_decay": 0.01, "max_tokens": 4096, "gradient_accumulation_steps": 4, "mixed_precision": "bf16"}
    card = build_model_card(model_name="weaknat-demo", config=config, num_parameters=1234567, scores=scores,
                            eval_split="test", data=data, training=training, steps=300000,
                            filtered={"kept": 90, "source_too_long": 4, "target_does_not_fit": 6},
                            example_source="Ein Mann fährt Fahrrad.", repo_or_path="user/weaknat-demo",
                            kept_partner_parameters=kept_partner_parameters)
    return card, scores


def test_model_card_has_model_index_results_with_signatures(tmp_path):
    card, scores = make_card(WeakNATConfig(vocab_size=100, glancing=True), distilled=True)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    results = {r.metric_type: r for r in loaded.data.eval_results}
    assert set(results) == {"sacrebleu", "chrf"}
    assert results["sacrebleu"].metric_value == round(scores["bleu"], 2)
    assert results["sacrebleu"].metric_config == scores["bleu_signature"]
    assert results["chrf"].metric_value == round(scores["chrf"], 2)
    assert results["chrf"].metric_config == scores["chrf_signature"]
    for result in results.values():
        assert (result.dataset_type, result.dataset_config, result.dataset_split) == ("wmt/wmt14", "de-en", "test")
        assert result.task_type == "translation"
    assert loaded.data.model_name == "weaknat-demo" and loaded.data.datasets == ["wmt/wmt14"]
    assert "distilled" in loaded.data.tags and loaded.data.language == ["de", "en"]
    text = loaded.text
    assert "1,234,567 parameters" in text and "![Learning curve](learning_curve.png)" in text
    assert "knowledge distillation" in text and "glancing" in text and "greedy CTC" in text
    assert "4 with sources over 512 tokens, 6 whose target cannot fit" in text
    assert 'pipeline(model="user/weaknat-demo", trust_remote_code=True)' in text


def test_model_card_states_plain_ctc_and_undistilled_local_data(tmp_path):
    corpus = tmp_path / "multi30k"
    corpus.mkdir()
    card, _ = make_card(WeakNATConfig(vocab_size=100, weak_ar_layers=0), dataset=str(corpus))
    assert "plain CTC" in card.text and "not distilled" in card.text
    assert card.data.datasets is None  # a local folder is no Hub dataset id
    assert card.data.eval_results[0].dataset_name == "multi30k"


def test_model_card_says_whether_the_export_kept_a_partner_to_rank_the_length_beam():
    config = WeakNATConfig(vocab_size=100, nar_type="vanilla")
    dropped, _ = make_card(config)
    kept, _ = make_card(config, kept_partner_parameters=876543)
    assert "exactly the parameters of a plain vanilla NAR model" in dropped.text and "876,543" not in dropped.text
    assert "keeps the training's shared weak AR decoder" in kept.text and "876,543 parameters" in kept.text
    assert 'length_beam_ranking="partner"' in kept.text and "exactly the parameters" not in kept.text
