"""generate() in transformers' terms: GenerationConfig, the standard arguments, GenerateOutput, clear errors.

A one-pass CTC model honours what acts on its output (length bounds, n-best, masked tokens, sampling, scores) and
rejects with a reason what acts on the steps of an autoregressive decoder. Inputs are checked before torch sees them.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import pad_batch, tiny_config
from transformers import (AutoModelForSeq2SeqLM, GenerationConfig, MarianConfig, MarianMTModel, pipeline)
from transformers.generation import GenerateBeamEncoderDecoderOutput, GenerateEncoderDecoderOutput

from hf_weaknat import WeakNATForConditionalGeneration, export_for_hub
from hf_weaknat.ctc import ctc_beam_search
from hf_weaknat.generation import ONE_PASS_UNSUPPORTED_ARGUMENTS, ONE_PASS_UNSUPPORTED_CONFIG

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def untrained():
    """An untrained model is unsure of every frame, so greedy, beam and sampling differ."""
    torch.manual_seed(0)
    return WeakNATForConditionalGeneration(tiny_config(weak_ar_layers=0)).eval()


@pytest.fixture(scope="module")
def batch():
    rows = [[7, 8, 9, 10, 11, 2], [12, 13, 2], [14, 15, 16, 17, 2]]
    ids = pad_batch(rows, 0)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.fixture(scope="module")
def export_dir(memorized, tokenizer, tmp_path_factory):
    model, _, _ = memorized
    return export_for_hub(model, tmp_path_factory.mktemp("export"), tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------------- the issue


def test_every_call_a_new_user_makes_works_on_an_export(export_dir, memorized, tokenizer):
    _, sources, targets = memorized
    model = AutoModelForSeq2SeqLM.from_pretrained(export_dir).eval()
    batch = tokenizer(sources, padding=True, return_tensors="pt")
    texts = lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
    assert model.can_generate()
    assert texts(model.generate(**batch, max_new_tokens=20)) == targets
    assert texts(model.generate(**batch, max_length=50)) == targets
    assert texts(model.generate(**batch, num_beams=4, early_stopping=True)) == targets
    assert texts(model.generate(**batch, generation_config=GenerationConfig(num_beams=2))) == targets
    assert texts(model.generate(**batch, do_sample=False)) == targets
    out = model.generate(**batch, return_dict_in_generate=True, output_scores=True)
    assert isinstance(out, GenerateEncoderDecoderOutput) and texts(out.sequences) == targets
    beam = model.generate(**batch, num_beams=3, return_dict_in_generate=True, output_scores=True)
    assert isinstance(beam, GenerateBeamEncoderDecoderOutput) and texts(beam.sequences) == targets
    translator = pipeline("weaknat-translation", model=str(export_dir))
    assert translator(sources[0], max_length=40) == [{"translation_text": targets[0]}]


def test_generation_config_json_is_in_every_export_and_round_trips(tmp_path, batch):
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config())  # a training model, weak AR decoders included
    model.generation_config.num_beams = 3
    model.generation_config.beam_token_candidates = 4  # a custom entry: this model's own decoding option
    directory = export_for_hub(model, tmp_path / "export")
    saved = json.loads((directory / "generation_config.json").read_text())
    assert saved["num_beams"] == 3 and saved["beam_token_candidates"] == 4
    assert saved["max_length"] == model.config.max_frames
    loaded = AutoModelForSeq2SeqLM.from_pretrained(directory).eval()
    assert loaded.generation_config.to_diff_dict() == model.generation_config.to_diff_dict()
    # the saved defaults are the call's defaults
    assert torch.equal(loaded.generate(**batch), loaded.generate(**batch, num_beams=3, beam_token_candidates=4))


def test_an_export_made_before_generation_config_json_gets_a_bound_that_never_truncates():
    old = WeakNATForConditionalGeneration.from_pretrained(FIXTURES / "pre_split_export")
    assert old.generation_config.max_length == old.config.max_frames  # not transformers' model-agnostic 20


def test_keyword_arguments_override_the_generation_config_which_overrides_the_models(untrained, batch):
    beams = {n: untrained.generate(**batch, num_beams=n) for n in (1, 2, 4)}
    assert not torch.equal(beams[1], beams[4])  # the untrained model's search matters
    untrained.generation_config.num_beams = 4
    try:
        assert torch.equal(untrained.generate(**batch), beams[4])
        assert torch.equal(untrained.generate(**batch, generation_config=GenerationConfig(num_beams=2)), beams[2])
        assert torch.equal(untrained.generate(**batch, generation_config=GenerationConfig(num_beams=2), num_beams=1),
                           beams[1])
    finally:
        untrained.generation_config.num_beams = None


# ---------------------------------------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("argument", ["max_length", "max_new_tokens"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_max_length_and_max_new_tokens_truncate_the_one_pass_output(untrained, batch, argument, num_beams):
    full = untrained.generate(**batch, num_beams=num_beams)
    assert full.shape[1] > 5
    cut = untrained.generate(**batch, num_beams=num_beams, **{argument: 5})
    assert torch.equal(cut, full[:, :5])
    assert untrained.generate(**batch, **{argument: 1000}).shape == untrained.generate(**batch).shape


def test_min_length_ranks_beam_hypotheses_that_reach_it_first(untrained, batch):
    out = untrained.generate(**batch, num_beams=6, num_return_sequences=6, return_dict_in_generate=True,
                             output_scores=True)
    lengths = (out.sequences != 0).sum(1).view(3, 6)
    minimum = int(lengths.float().median()) + 1
    ranked = untrained.generate(**batch, num_beams=6, num_return_sequences=6, min_new_tokens=minimum,
                                return_dict_in_generate=True, output_scores=True)
    reach = ((ranked.sequences != 0).sum(1) >= minimum).view(3, 6)
    for row in range(3):  # those that reach the minimum come first, each group still best first
        assert reach[row].tolist() == sorted(reach[row].tolist(), reverse=True)
        scores = ranked.sequences_scores.view(3, 6)[row]
        for group in (reach[row], ~reach[row]):
            assert torch.equal(scores[group], scores[group].sort(descending=True).values)
    with pytest.raises(ValueError, match="min_length.*beam search"):
        untrained.generate(**batch, min_length=3)


# ---------------------------------------------------------------------------------------------------------- decoding


def test_beam_sequences_scores_are_sorted_and_are_the_beam_searchs_own_log_probabilities(untrained, batch):
    out = untrained.generate(**batch, num_beams=4, num_return_sequences=4, return_dict_in_generate=True,
                             output_scores=True)
    scores = out.sequences_scores.view(3, 4)
    assert torch.equal(scores, scores.sort(dim=1, descending=True).values)
    with torch.no_grad():
        log_probs = untrained(**batch).logits.float().log_softmax(-1)
    frames = untrained.frame_mask(batch["attention_mask"]).sum(1)
    sequences, own = ctc_beam_search(log_probs, frames, 4, 0, 4, 8)  # the search generate's "auto" runs
    assert torch.equal(out.sequences, sequences.flatten(0, 1)) and torch.equal(out.sequences_scores, own.flatten())
    # scores[t] is what the search read at frame t; a prefix's score never exceeds its full CTC likelihood
    assert torch.allclose(torch.stack(out.scores, 1), log_probs)
    lengths = (out.sequences != 0).sum(1)
    full = -F.ctc_loss(log_probs.double().repeat_interleave(4, 0).transpose(0, 1), out.sequences,
                       frames.repeat_interleave(4), lengths, blank=4, reduction="none")
    assert (out.sequences_scores.double() <= full + 1e-4).all()


def test_sampling_with_a_seed_is_reproducible_and_differs_from_greedy(untrained, batch):
    torch.manual_seed(123)
    first = untrained.generate(**batch, do_sample=True, num_return_sequences=3)
    torch.manual_seed(123)
    again = untrained.generate(**batch, do_sample=True, num_return_sequences=3)
    assert first.shape[0] == 9 and torch.equal(first, again)
    greedy = untrained.generate(**batch)
    assert not torch.equal(first[::3, : greedy.shape[1]], greedy)
    assert len({tuple(r.tolist()) for r in first[:3]}) > 1  # several different samples of one sentence
    # top_k=1 keeps only each frame's argmax: the sample is the greedy output
    assert torch.equal(untrained.generate(**batch, do_sample=True, top_k=1), greedy)


def test_sampling_warpers_shape_every_frame_distribution(untrained, batch):
    torch.manual_seed(0)
    out = untrained.generate(**batch, do_sample=True, temperature=0.7, top_k=5, top_p=0.9,
                             return_dict_in_generate=True, output_scores=True)
    kept = torch.isfinite(torch.stack(out.scores, 1))  # what the sampler read: the warped logits
    assert (kept.sum(-1) <= 5).all() and (kept.sum(-1) >= 1).all()
    for extra in (dict(min_p=0.1), dict(typical_p=0.9), dict(epsilon_cutoff=0.01), dict(eta_cutoff=0.01)):
        assert untrained.generate(**batch, do_sample=True, **extra).shape[0] == 3


@pytest.mark.parametrize("num_beams,do_sample", [(1, False), (3, False), (1, True)])
def test_suppressed_tokens_and_bad_words_never_appear(untrained, batch, num_beams, do_sample):
    common = untrained.generate(**batch, num_beams=num_beams)
    frequent = [int(t) for t in common[common != 0].unique()[:2]]
    torch.manual_seed(0)
    out = untrained.generate(**batch, num_beams=num_beams, do_sample=do_sample, suppress_tokens=[frequent[0]],
                             bad_words_ids=[[frequent[1]]])
    assert not torch.isin(out, torch.tensor(frequent)).any()


def test_token_masks_that_a_ctc_model_cannot_honour_are_refused(untrained, batch):
    with pytest.raises(ValueError, match="blank"):
        untrained.generate(**batch, suppress_tokens=[untrained.config.blank_token_id])
    with pytest.raises(ValueError, match="several tokens"):
        untrained.generate(**batch, bad_words_ids=[[7, 8]])
    with pytest.raises(ValueError, match="vocabulary of 60"):
        untrained.generate(**batch, suppress_tokens=[60])


def test_return_dict_holds_the_single_pass_attentions_hidden_states_and_logits(batch):
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(weak_ar_layers=0, attn_implementation="eager")).eval()
    out = model.generate(**batch, return_dict_in_generate=True, output_attentions=True, output_hidden_states=True,
                         output_logits=True, output_scores=True)
    assert isinstance(out, GenerateEncoderDecoderOutput) and torch.equal(out.sequences, model.generate(**batch))
    assert len(out.encoder_hidden_states) == 3 and len(out.encoder_attentions) == 2
    assert len(out.decoder_hidden_states) == 1 and len(out.decoder_hidden_states[0]) == 5  # one pass, 4 layers
    assert out.cross_attentions[0][0].shape == (3, 4, 18, 6)  # (batch, heads, frames, src_len)
    with torch.no_grad():
        logits = model(**batch).logits
    assert len(out.logits) == 18 and torch.equal(torch.stack(out.logits, 1), logits)
    assert torch.equal(torch.stack(out.scores, 1), logits)  # greedy reads the raw logits


def test_accepted_no_op_arguments_change_nothing(untrained, batch):
    plain = untrained.generate(**batch, num_beams=3)
    same = untrained.generate(**batch, num_beams=3, early_stopping=True, use_cache=False, synced_gpus=True,
                              length_penalty=1.0, labels=batch["input_ids"], renormalize_logits=True)
    assert torch.equal(plain, same)


def test_generated_ids_can_feed_a_training_step(untrained, batch):
    """Back-translation: sampled outputs become training inputs, so they must not be inference-mode tensors."""
    model = WeakNATForConditionalGeneration(tiny_config(weak_ar_layers=0))
    torch.manual_seed(0)
    sources = model.eval().generate(**batch, do_sample=True)
    sources[:, -1] = 2
    out = model.train()(input_ids=sources, labels=batch["input_ids"].masked_fill(batch["input_ids"] == 0, -100))
    out.loss.backward()


# ---------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", sorted(ONE_PASS_UNSUPPORTED_ARGUMENTS))
def test_arguments_of_step_by_step_decoding_raise_a_value_error_saying_why(untrained, batch, name):
    with pytest.raises(ValueError, match=f"`{name}` is not supported.*: .*"):
        untrained.generate(**batch, **{name: object()})


UNSUPPORTED_VALUES = {"max_time": 1.0, "stop_strings": ["."], "repetition_penalty": 1.3,
                      "encoder_repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "encoder_no_repeat_ngram_size": 2,
                      "exponential_decay_length_penalty": (2, 1.1), "forced_bos_token_id": 1, "forced_eos_token_id": 2,
                      "begin_suppress_tokens": [5], "sequence_bias": {(5,): 1.0}, "guidance_scale": 2.0,
                      "token_healing": True, "use_mtp": True, "prompt_lookup_num_tokens": 3, "assistant_early_exit": 1,
                      "penalty_alpha": 0.6, "dola_layers": "low", "num_beam_groups": 2, "diversity_penalty": 0.5,
                      "constraints": [object()], "force_words_ids": [[5]], "watermarking_config": {"bias": 2.0}}


@pytest.mark.parametrize("name", sorted(ONE_PASS_UNSUPPORTED_CONFIG))
def test_generation_config_fields_of_step_by_step_decoding_raise_a_value_error_saying_why(untrained, batch, name):
    with pytest.raises(ValueError, match=f"`{name}=.*` is not supported"):
        untrained.generate(**batch, num_beams=4, **{name: UNSUPPORTED_VALUES[name]})


@pytest.mark.parametrize("name,value", [("decoder_input_ids", torch.tensor([[0]])), ("past_key_values", (1,))])
def test_decoder_inputs_raise_a_value_error_saying_why(untrained, batch, name, value):
    with pytest.raises(ValueError, match=f"`{name}` is not supported.*non-autoregressive|`{name}` is not supported.*"
                                         "cache"):
        untrained.generate(**batch, **{name: value})


def test_unknown_argument_raises_the_same_error_as_transformers_own_models(untrained, batch):
    marian = MarianMTModel(MarianConfig(vocab_size=60, d_model=16, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                        decoder_ffn_dim=16, decoder_start_token_id=0, pad_token_id=0)).eval()
    errors = []
    for model in (marian, untrained):
        with pytest.raises(ValueError) as caught:
            model.generate(**batch, num_beams=2, max_new_tokens=3, typo_argument=1)
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "typo_argument" in errors[0]


def test_beam_settings_that_transformers_rejects_are_rejected_alike(untrained, batch):
    with pytest.raises(ValueError, match="num_beams"):
        untrained.generate(**batch, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="Greedy methods"):
        untrained.generate(**batch, num_return_sequences=2)
    with pytest.raises(ValueError, match="beam sampling"):
        untrained.generate(**batch, num_beams=2, do_sample=True)
    with pytest.raises(TypeError, match="GenerationConfig"):
        untrained.generate(**batch, generation_config={"num_beams": 2})


# Issue 10, case 6: inputs are checked before torch sees them


def test_token_lists_instead_of_tensors_raise_a_type_error_with_the_fix(untrained, tokenizer):
    with pytest.raises(TypeError, match='input_ids.*list.*return_tensors="pt"'):
        untrained.generate(**tokenizer(["Ein Mann.", "Zwei Hunde spielen."]))
    with pytest.raises(TypeError, match="integer token ids"):
        untrained.generate(input_ids=torch.tensor([[7.0, 8.0, 2.0]]))


@pytest.mark.parametrize("bad_id", [60, 1000, -1])
def test_ids_outside_the_vocabulary_raise_a_value_error_naming_the_id_and_the_size(untrained, bad_id):
    ids = torch.tensor([[7, 8, 2], [9, bad_id, 2]])
    with pytest.raises(ValueError, match=rf"id {bad_id} \(row 1\).*vocabulary of 60"):
        untrained.generate(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("num_beams,n", [(1, 1), (3, 2)])
def test_an_empty_batch_or_a_zero_length_source_gives_an_empty_result(untrained, num_beams, n):
    empty = untrained.generate(input_ids=torch.zeros(0, 4, dtype=torch.long), num_beams=num_beams,
                               num_return_sequences=n)
    assert empty.shape == (0, 0) and empty.dtype == torch.long
    nothing = torch.zeros(2, 0, dtype=torch.long)
    out = untrained.generate(input_ids=nothing, attention_mask=nothing, num_beams=num_beams, num_return_sequences=n,
                             return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == (2 * n, 0)


def test_remote_code_generate_and_pipeline_take_the_generation_arguments(export_dir, memorized, tmp_path):
    """Without this package: the export's own code honours the same arguments."""
    _, sources, targets = memorized
    script = textwrap.dedent("""
        import json, sys
        sys.modules["hf_weaknat"] = None
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig, pipeline
        directory, sources = sys.argv[1], json.loads(sys.argv[2])
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(directory, trust_remote_code=True).eval()
        batch = tokenizer(sources, padding=True, return_tensors="pt")
        out = model.generate(**batch, num_beams=3, max_new_tokens=20, return_dict_in_generate=True,
                             output_scores=True)
        translator = pipeline("translation", model=directory, trust_remote_code=True)
        try:
            model.generate(**batch, prefix_allowed_tokens_fn=lambda *a: [])
            refused = ""
        except ValueError as error:
            refused = str(error)
        print(json.dumps({
            "module": type(model).__module__, "can_generate": model.can_generate(),
            "beam": tokenizer.batch_decode(out.sequences, skip_special_tokens=True),
            "pipeline": [r["translation_text"] for r in translator(sources, max_length=40, num_beams=2)],
            "config": [r["translation_text"] for r in translator(sources, generation_config=GenerationConfig())],
            "truncated": translator(sources[0], max_new_tokens=1)[0]["translation_text"],
            "refused": refused,
        }))
    """)
    result = subprocess.run([sys.executable, "-c", script, str(export_dir), json.dumps(sources)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.") and report["can_generate"]
    assert report["beam"] == targets and report["pipeline"] == targets and report["config"] == targets
    assert len(report["truncated"]) < len(targets[0])
    assert "prefix_allowed_tokens_fn" in report["refused"]
