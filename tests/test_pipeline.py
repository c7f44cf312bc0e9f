"""Pipeline-style translation: the v4 translation contract on transformers 5.x, and bad input row by row."""

import pytest
from transformers import pipeline

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


def test_unknown_generation_argument_is_rejected(translator):
    with pytest.raises(TypeError, match="max_new_tokens"):
        translator("Ein Hund.", max_new_tokens=5)
