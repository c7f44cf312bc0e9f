"""Pipeline-style translation: the v4 translation contract on transformers 5.x, and bad input row by row."""

import pytest
import torch
from transformers import GenerationConfig, pipeline

from hf_weaknat import WeakNATTranslationPipeline


@pytest.fixture(scope="module")
def translator(memorized, tokenizer):
    return pipeline("weaknat-translation", model=memorized[0], tokenizer=tokenizer)


def test_registered_task_builds_our_pipeline(translator):
    assert isinstance(translator, WeakNATTranslationPipeline)


def test_string_in_gives_a_list_with_one_translation(translator, memorized):
    _, sources, targets = memorized
    assert translator(sources[0]) == [{"translation_text": targets[0]}]


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_list_in_gives_one_translation_per_sentence_for_any_batch_size(translator, memorized, batch_size):
    _, sources, targets = memorized
    assert translator(sources, batch_size=batch_size) == [{"translation_text": t} for t in targets]


def test_beam_search_and_n_best_through_the_pipeline(translator, memorized):
    _, sources, targets = memorized
    assert translator(sources[:2], num_beams=4) == [{"translation_text": t} for t in targets[:2]]
    three = translator(sources[0], num_beams=4, num_return_sequences=3)
    assert len(three) == 3 and three[0] == {"translation_text": targets[0]}


def test_empty_and_whitespace_sentences_translate_to_empty_text(translator, memorized):
    _, sources, targets = memorized
    out = translator(["", "   \t ", sources[1]], batch_size=3)
    assert out == [{"translation_text": ""}, {"translation_text": ""}, {"translation_text": targets[1]}]


def test_overlong_source_is_truncated_with_a_warning_and_the_batch_still_works(translator, memorized):
    _, sources, targets = memorized
    limit = translator.model.config.max_position_embeddings
    long_text = " ".join(["Ein Mann fährt Fahrrad."] * limit)
    with pytest.warns(UserWarning, match=f"limit of {limit}"):
        out = translator([sources[2], long_text, ""], batch_size=3)
    assert out[0] == {"translation_text": targets[2]} and out[2] == {"translation_text": ""}
    assert isinstance(out[1]["translation_text"], str)


@pytest.mark.parametrize("bad", [None, 3, ["ok", 5], [b"bytes"]])
def test_non_string_input_raises_a_clear_type_error(translator, bad):
    with pytest.raises(TypeError, match="str or list"):
        translator(bad)


def test_generation_arguments_reach_generate_as_in_the_v4_translation_pipeline(translator, memorized):
    _, sources, targets = memorized
    assert translator(sources[:2], max_length=40, num_beams=2) == [{"translation_text": t} for t in targets[:2]]
    assert translator(sources[0], generation_config=GenerationConfig(num_beams=3)) == [{"translation_text": targets[0]}]
    assert translator(sources[0], max_new_tokens=200, early_stopping=True) == [{"translation_text": targets[0]}]
    short = translator(sources[0], max_new_tokens=2)[0]["translation_text"]
    assert short and len(short) < len(targets[0]) and targets[0].startswith(short.split()[0])
    torch.manual_seed(0)
    sampled = translator(sources[0], do_sample=True, num_return_sequences=3, temperature=1.5)
    assert len(sampled) == 3 and all(isinstance(r["translation_text"], str) for r in sampled)
    with_dict = translator(sources[0], return_dict_in_generate=True, output_scores=True, num_beams=2)
    assert with_dict == [{"translation_text": targets[0]}]


def test_generation_arguments_given_at_construction_apply_to_every_call(memorized, tokenizer):
    model, sources, targets = memorized
    two_best = pipeline("weaknat-translation", model=model, tokenizer=tokenizer, num_beams=4, num_return_sequences=2)
    out = two_best(sources[0])
    assert len(out) == 2 and out[0] == {"translation_text": targets[0]}


@pytest.mark.parametrize("kwargs,error", [(dict(foo=5), "not used by the model: \\['foo'\\]"),
                                          (dict(prefix_allowed_tokens_fn=print), "prefix_allowed_tokens_fn"),
                                          (dict(repetition_penalty=1.2), "repetition_penalty")])
def test_bad_generation_arguments_raise_generates_error_before_any_sentence_is_translated(translator, kwargs, error,
                                                                                      monkeypatch):
    monkeypatch.setattr(type(translator), "preprocess", lambda *a, **k: pytest.fail("preprocessed"))
    with pytest.raises(ValueError, match=error):
        translator(["Ein Hund.", "Zwei Katzen."], **kwargs)


def test_an_empty_list_translates_to_an_empty_list(translator):
    assert translator([]) == [] and translator([], batch_size=4, num_beams=2) == []
    with pytest.raises(ValueError, match="foo"):
        translator([], foo=1)


def test_a_string_no_encoding_can_hold_is_repaired_with_a_warning_naming_the_item(translator, memorized):
    _, sources, targets = memorized
    with pytest.warns(UserWarning, match="item 1: 1 character"):
        out = translator([sources[0], "mann \ud800 fährt", sources[1]], batch_size=3)
    assert out[0] == {"translation_text": targets[0]} and out[2] == {"translation_text": targets[1]}
    assert isinstance(out[1]["translation_text"], str)
    with pytest.warns(UserWarning, match="the input: 2 character"):
        assert isinstance(translator("\udcff Hund \ud800")[0]["translation_text"], str)
