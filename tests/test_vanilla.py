"""The second NAR type (`nar_type="vanilla"`): length prediction, uniform copy, token and length losses, glancing on
the reference, the length beam, export and training, with the same weak AR decoders as CTC."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of, read_lines, record_weak_ar_memories, tiny_config
from safetensors import safe_open
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

from hf_weaknat import WeakNATConfig, WeakNATForConditionalGeneration, WeakNATModel, export_for_hub
from hf_weaknat.glancing import glanced_positions, glancing_target_inputs
from hf_weaknat.length_prediction import (drop_adjacent_repeats, length_beam_lengths, length_classes,
                                          model_target_inputs, target_inputs, top_lengths, uniform_copy_indices)

SOURCES = [[7, 8, 9, 10, 11, 2], [12, 13, 2], [14, 15, 16, 2]]
TARGETS = [[20, 21, 22, 23, 2], [24, 2], [25, 25, 26, 2]]


def vanilla(**overrides):
    return tiny_config(nar_type="vanilla", max_length_offset=8, **overrides)


def strip(ids, pad=0) -> list[list[int]]:
    return [[t for t in row if t != pad] for row in ids.tolist()]


# ---------------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad", [dict(nar_type="levenshtein"), dict(decoder_input="mask"), dict(max_length_offset=0),
                                 dict(length_loss_factor=-0.1)])
def test_invalid_vanilla_settings_raise_naming_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        tiny_config(**bad)


def test_each_nar_type_builds_only_its_own_modules():
    ctc, plain = WeakNATModel(tiny_config()), WeakNATModel(vanilla())
    assert ctc.upsampler is not None and ctc.length_predictor is None
    assert plain.upsampler is None and plain.length_predictor is not None
    assert not [k for k in plain.state_dict() if "upsampler" in k]
    assert plain.length_predictor.proj.weight.shape == (2 * 8 + 1, 32)  # offsets -8..8
    assert plain.decoder.embed_positions.num_embeddings == plain.config.max_position_embeddings
    assert WeakNATConfig().nar_type == "ctc"  # old configs (no nar_type) load as CTC


# ---------------------------------------------------------------------------------------------------------- pieces


def test_uniform_copy_follows_fairseq_uniform_assignment():
    source_lengths, target_lengths = torch.tensor([6, 3, 4, 5]), torch.tensor([4, 7, 1, 5])
    index = uniform_copy_indices(source_lengths, target_lengths, 7)
    for row, (s, t) in enumerate(zip(source_lengths.tolist(), target_lengths.tolist())):
        step = (s - 1) / (t - 1) if t > 1 else 0.0  # fairseq divides by zero for t == 1; we copy position 0
        expected = [round(step * j) for j in range(t)] + [0] * (7 - t)
        assert index[row].tolist() == [int(torch.round(torch.tensor(e))) for e in expected]
    assert index[0, 3] == 5 and index[1, 6] == 2  # first and last source positions are always copied


def test_decoder_inputs_copy_source_embeddings_or_are_placeholders():
    embeds = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    inputs, target_mask = target_inputs(embeds, mask, torch.tensor([3, 2]), "uniform_copy")
    assert target_mask.tolist() == [[True, True, True], [True, True, False]]
    assert torch.equal(inputs[0], embeds[0, [0, 2, 3]]) and torch.equal(inputs[1, :2], embeds[1, [0, 1]])
    assert not inputs[1, 2].any()
    placeholders, _ = target_inputs(embeds, mask, torch.tensor([3, 2]), "placeholder")
    assert placeholders.shape == (2, 3, 3) and not placeholders.any()


def test_length_classes_are_offsets_clamped_into_range():
    classes = length_classes(torch.tensor([5, 5, 5, 5]), torch.tensor([5, 7, 1, 30]), max_offset=3)
    assert classes.tolist() == [3, 5, 0, 6]  # offsets 0, +2, -4 (clamped to -3), +25 (clamped to +3)


def test_top_lengths_are_distinct_valid_and_best_first():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, 3.0], [9.0, 0.0, 1.0, 2.0, 3.0]])  # offsets -2..2
    lengths, scores = top_lengths(logits, torch.tensor([4, 1]), max_length=5, k=3)
    assert lengths[0].tolist() == [3, 5, 4]  # length 6 (offset +2) is over max_length: never a candidate
    assert lengths[1].tolist() == [3, 2, 1]  # a one-token source: offsets -2 and -1 would give 0 and -1 tokens
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_drop_adjacent_repeats_keeps_each_run_once():
    tokens = torch.tensor([[5, 5, 6, 6, 6, 5, 0], [7, 0, 0, 0, 0, 0, 0]])
    assert drop_adjacent_repeats(tokens, 0).tolist() == [[5, 6, 5], [7, 0, 0]]


# ---------------------------------------------------------------------------------------------------------- training


def test_forward_backward_is_finite_with_named_token_and_length_losses():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(vanilla(nar_loss_weight=0.3, length_loss_factor=0.2)).train()
    out = model(**batch_of(SOURCES, TARGETS), training_step=0)
    assert out.ctc_loss is None and out.logits.shape == (3, 5, 60)
    for term in (out.loss, out.token_loss, out.length_loss, out.ar_loss):
        assert torch.isfinite(term) and term > 0
    torch.testing.assert_close(out.loss, 0.3 * (out.token_loss + 0.2 * out.length_loss) + 0.7 * out.ar_loss)
    assert out.frame_mask.sum(1).tolist() == [5, 2, 4] and out.length_logits.shape == (3, 17)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert model.model.length_predictor.proj.weight.grad.abs().sum() > 0


def test_token_and_length_losses_are_what_they_say():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(vanilla(weak_ar_layers=0, dropout=0.0)).eval()
    batch = batch_of(SOURCES, TARGETS)
    out = model(**batch)
    labels = batch["labels"]
    expected_tokens = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                      label_smoothing=0.1)
    classes = torch.tensor([5 - 6 + 8, 2 - 3 + 8, 4 - 4 + 8])
    torch.testing.assert_close(out.token_loss, expected_tokens)
    torch.testing.assert_close(out.length_loss, F.cross_entropy(out.length_logits, classes))
    torch.testing.assert_close(out.loss, out.token_loss + 0.1 * out.length_loss)


def test_partners_read_only_their_layers_target_length_states():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(vanilla(weak_ar_layer_sample_ratio=1.0, dropout=0.0)).train()
    memories, handles = record_weak_ar_memories(model)
    out = model(**batch_of(SOURCES, TARGETS), output_hidden_states=True)
    for handle in handles:
        handle.remove()
    (memory,) = memories
    for i, (read, states) in enumerate(zip(memory.split(3), out.decoder_hidden_states[1:])):
        assert read.shape[1] == 5  # the longest target: one state per target position
        assert torch.equal(read, states), f"partner {i} does not read NAR layer {i}'s states"


def test_glancing_reveals_ratio_times_hamming_distance_reference_embeddings():
    torch.manual_seed(0)
    labels = torch.tensor([[5, 6, 7, 8, 2], [9, 2, -100, -100, -100]])
    mask = labels != -100
    logits = torch.randn(2, 5, 12)
    logits[0, :2, [5, 6]] = 100.0  # the first two positions of row 0 are right
    reference = labels.masked_fill(~mask, 0)
    wrong = ((logits.argmax(-1) != reference) & mask).sum(1)
    glanced = glanced_positions(logits, mask, reference, ratio=0.5)
    assert glanced.sum(1).tolist() == (wrong.float() * 0.5).long().tolist()
    assert not (glanced & ~mask).any()
    embed = torch.nn.Embedding(12, 4)
    inputs = torch.zeros(2, 5, 4)
    torch.manual_seed(1)
    out = glancing_target_inputs(inputs, mask, logits, labels, 1.0, embed)
    changed = out.abs().sum(-1) > 0
    assert changed.sum(1).tolist() == wrong.tolist()
    assert torch.equal(out[changed], embed(reference)[changed])


def test_glancing_vanilla_model_trains():
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(vanilla(glancing=True, glancing_anneal_steps=10)).train()
    out = model(**batch_of(SOURCES, TARGETS), training_step=3)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.token_loss is not None


# ---------------------------------------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return WeakNATForConditionalGeneration(vanilla(vocab_size=40)).eval()


def test_greedy_decodes_at_the_predicted_length_and_batched_equals_unbatched(untrained):
    batch = batch_of(SOURCES)
    out = untrained(**batch)
    lengths = out.frame_mask.sum(1)
    candidates = batch["attention_mask"].sum(1, keepdim=True) + torch.arange(17) - 8  # src_len + offset
    valid = (candidates >= 1) & (candidates <= 24)
    best = out.length_logits.masked_fill(~valid, float("-inf")).argmax(-1)
    assert lengths.tolist() == candidates.gather(1, best[:, None]).squeeze(1).tolist()  # most probable valid length
    ids = untrained.generate(**batch)
    assert [len(r) for r in strip(ids)] == [int(n) for n in lengths]  # pad is never the argmax of a trained model
    for row, source in zip(strip(ids), SOURCES):
        assert strip(untrained.generate(**batch_of([source])))[0] == row
    beams = untrained.generate(**batch, num_beams=4, num_return_sequences=4)
    for i, source in enumerate(SOURCES):
        alone = untrained.generate(**batch_of([source]), num_beams=4, num_return_sequences=4)
        assert strip(alone) == strip(beams[4 * i: 4 * i + 4])


def test_length_beam_returns_distinct_lengths_ranked_by_average_log_probability(untrained):
    batch = batch_of(SOURCES)
    out = untrained.generate(**batch, num_beams=5, num_return_sequences=3, return_dict_in_generate=True,
                             output_scores=True, length_beam_ranking="average")
    assert out.sequences.shape[0] == 9 and out.sequences_scores.shape == (9,)
    scores = out.sequences_scores.view(3, 3)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    for i in range(3):
        lengths = [len(r) for r in strip(out.sequences[3 * i: 3 * i + 3])]
        assert len(set(lengths)) == 3
    # each score is the average log-probability of the sequence's tokens, decoded at its length
    best = out.sequences[0][out.sequences[0] != 0]
    encoder = untrained.model.encode(torch.tensor([SOURCES[0]]))[0]
    source_mask = torch.ones(1, 6, dtype=torch.long)
    inputs = model_target_inputs(untrained.model, source_mask, torch.tensor([len(best)]), torch.tensor([SOURCES[0]]))
    hidden = untrained.model.decoder(*inputs, encoder.last_hidden_state, source_mask).last_hidden_state
    log_probs = F.log_softmax(untrained.ctc_head(hidden)[0], -1)
    assert torch.equal(log_probs.argmax(-1), best)
    torch.testing.assert_close(log_probs.gather(1, best[:, None]).mean(), out.sequences_scores[0])


def test_sampling_is_seeded_and_gives_num_return_sequences_per_sentence(untrained):
    batch = batch_of(SOURCES)
    torch.manual_seed(3)
    first = untrained.generate(**batch, do_sample=True, num_return_sequences=2, top_k=5)
    torch.manual_seed(3)
    again = untrained.generate(**batch, do_sample=True, num_return_sequences=2, top_k=5)
    assert torch.equal(first, again) and first.shape[0] == 6


def test_drop_repeats_is_off_by_default_and_a_flag(untrained):
    batch = batch_of(SOURCES)
    raw = untrained.generate(**batch)
    merged = untrained.generate(**batch, drop_repeats=True)
    assert strip(merged) == strip(drop_adjacent_repeats(raw, 0))
    assert any(a == b for row in strip(raw) for a, b in zip(row, row[1:]))  # the untrained model repeats
    assert strip(untrained.generate(**batch, drop_repeats=False)) == strip(raw)


def test_a_window_length_beam_decodes_the_lengths_around_the_most_probable_one(untrained):
    batch = batch_of(SOURCES)
    greedy = [len(r) for r in strip(untrained.generate(**batch))]
    out = untrained.generate(**batch, num_beams=3, num_return_sequences=3, length_beam="window")
    for i, length in enumerate(greedy):
        assert sorted(len(r) for r in strip(out[3 * i: 3 * i + 3])) == [length - 1, length, length + 1]
    config_entry = untrained.generate(**batch, generation_config=GenerationConfig(
        num_beams=3, num_return_sequences=3, length_beam="window"))
    assert torch.equal(config_entry, out)  # a keyword or a generation_config entry
    with pytest.raises(ValueError, match="length_beam must be one of"):
        untrained.generate(**batch, num_beams=3, length_beam="nearby")


@pytest.mark.parametrize("ranking", ["joint", "average_plus_length", None])
def test_length_beam_rankings_score_what_they_say(untrained, ranking):
    """None: no ranking asked for, which ranks by joint (the study's measurement over seeds, docs/study.md)."""
    batch = batch_of(SOURCES[:1])
    asked = {} if ranking is None else {"length_beam_ranking": ranking}
    out = untrained.generate(**batch, num_beams=4, num_return_sequences=4, return_dict_in_generate=True,
                             output_scores=True, **asked)
    assert (out.sequences_scores[:-1] >= out.sequences_scores[1:]).all()
    encoder = untrained.model.encode(batch["input_ids"])[0]
    length_log_probs = F.log_softmax(untrained.model.length_predictor(encoder.last_hidden_state,
                                                                      batch["attention_mask"]), -1)[0]
    for sequence, score in zip(out.sequences, out.sequences_scores):
        tokens = sequence[sequence != 0]
        inputs = model_target_inputs(untrained.model, batch["attention_mask"], torch.tensor([len(tokens)]),
                                     batch["input_ids"])
        hidden = untrained.model.decoder(*inputs, encoder.last_hidden_state, batch["attention_mask"]).last_hidden_state
        picked = F.log_softmax(untrained.ctc_head(hidden)[0], -1).gather(1, tokens[:, None])
        length = length_log_probs[len(tokens) - len(SOURCES[0]) + 8]
        expected = picked.mean() + length if ranking == "average_plus_length" else picked.sum() + length
        torch.testing.assert_close(score, expected)


def test_length_beam_ranked_by_the_partner_scores_each_candidate_by_its_partners_average_log_probability(untrained):
    from hf_weaknat.weak_ar import Memory

    batch = batch_of(SOURCES[:1])
    out = untrained.generate(**batch, num_beams=4, num_return_sequences=4, return_dict_in_generate=True,
                             output_scores=True, length_beam_ranking="partner")
    assert (out.sequences_scores[:-1] >= out.sequences_scores[1:]).all()
    encoder = untrained.model.encode(batch["input_ids"])[0].last_hidden_state
    for sequence, score in zip(out.sequences, out.sequences_scores):
        tokens = sequence[sequence != 0][None]
        inputs = model_target_inputs(untrained.model, batch["attention_mask"], torch.tensor([tokens.shape[1]]),
                                     batch["input_ids"])
        states = untrained.model.decoder(*inputs, encoder, batch["attention_mask"],
                                         return_layer_states=True).layer_states[-1]
        # the training code's cross-entropy of the last layer's partner on this candidate (no label smoothing)
        last = Memory(untrained.config.decoder_layers - 1, states, inputs[1])
        summed, count = untrained.weak_ar.token_losses(tokens, [last], untrained.model.shared)
        torch.testing.assert_close(score, -summed[0] / count)


def test_the_partner_ranking_picks_what_a_model_that_learned_its_pairs_says_and_needs_partners(memorized_vanilla,
                                                                                               tokenizer):
    model, sources, targets = memorized_vanilla
    encoded = tokenizer(sources, padding=True, return_tensors="pt")
    ranked = model.generate(**encoded, num_beams=3, length_beam_ranking="partner")
    assert tokenizer.batch_decode(ranked, skip_special_tokens=True) == targets
    without = WeakNATForConditionalGeneration(WeakNATConfig(**{**model.config.to_dict(), "weak_ar_layers": 0})).eval()
    with pytest.raises(ValueError, match="this model has none: an export drops them"):
        without.generate(**encoded, num_beams=3, length_beam_ranking="partner")
    with pytest.raises(ValueError, match="length_beam_ranking must be one of"):
        model.generate(**encoded, num_beams=3, length_beam_ranking="shortest")


def test_target_lengths_decode_each_sentence_at_the_given_length(untrained):
    batch = batch_of(SOURCES)
    ids = untrained.generate(**batch, target_lengths=torch.tensor([3, 9, 1]))
    assert [len(r) for r in strip(ids)] == [3, 9, 1]
    with pytest.raises(ValueError, match="one length in"):
        untrained.generate(**batch, target_lengths=torch.tensor([3, 0, 1]))
    with pytest.raises(ValueError, match="no length beam"):
        untrained.generate(**batch, target_lengths=torch.tensor([3, 9, 1]), num_beams=2)
    with pytest.raises(ValueError, match="for vanilla models"):
        WeakNATForConditionalGeneration(tiny_config(vocab_size=40)).eval().generate(**batch, target_lengths=[3, 9, 1])


def test_a_source_without_content_translates_to_nothing(untrained):
    assert untrained.generate(**batch_of([[2], [7, 8, 2]]))[0].eq(0).all()


# ---------------------------------------------------------------------------------------------------------- memorize


@pytest.fixture(scope="module")
def memorized_vanilla(tokenizer):
    """A tiny vanilla NAR + weak AR that learned five real de->en pairs."""
    de, en = read_lines("train.de", 200), read_lines("train.en", 200)
    pairs = sorted(zip(de, en), key=lambda p: len(p[0]))[:5]
    sources, targets = [p[0] for p in pairs], [p[1] for p in pairs]
    torch.manual_seed(0)
    config = tiny_config(nar_type="vanilla", vocab_size=len(tokenizer), d_model=64, encoder_ffn_dim=128,
                         decoder_ffn_dim=128, dropout=0.0, max_length_offset=16)
    model = WeakNATForConditionalGeneration(config)
    batch = tokenizer(sources, text_target=targets, padding=True, return_tensors="pt")
    labels = batch["labels"].masked_fill(batch["labels"] == tokenizer.pad_token_id, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    encoded = tokenizer(sources, padding=True, return_tensors="pt")
    for step in range(600):
        model.train()
        model(batch["input_ids"], batch["attention_mask"], labels=labels, training_step=step).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 100 and step % 25 == 0:
            model.eval()
            if tokenizer.batch_decode(model.generate(**encoded), skip_special_tokens=True) == targets:
                break
    return model.eval(), sources, targets


def test_a_tiny_vanilla_model_overfits_a_few_pairs_and_translates_them_back(memorized_vanilla, tokenizer):
    model, sources, targets = memorized_vanilla
    encoded = tokenizer(sources, padding=True, return_tensors="pt")
    assert tokenizer.batch_decode(model.generate(**encoded), skip_special_tokens=True) == targets
    assert tokenizer.batch_decode(model.generate(**encoded, num_beams=3), skip_special_tokens=True) == targets


NO_PACKAGE_SCRIPT = """
import json, sys
sys.modules["hf_weaknat"] = None  # the export's own code only
from transformers import AutoModelForSeq2SeqLM, pipeline
directory, sources = sys.argv[1], json.loads(sys.argv[2])
generate_kwargs = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
model = AutoModelForSeq2SeqLM.from_pretrained(directory, trust_remote_code=True)
translator = pipeline(model=directory, trust_remote_code=True)
print(json.dumps({"module": type(model).__module__, "nar_type": model.config.nar_type,
                  "translations": [r["translation_text"] for r in translator(sources, **generate_kwargs)]}))
"""


def test_export_has_no_weak_ar_tensors_gives_bit_identical_logits_and_loads_remotely(memorized_vanilla, tokenizer,
                                                                                      tmp_path):
    model, sources, targets = memorized_vanilla
    directory = export_for_hub(model, tmp_path / "export", tokenizer=tokenizer)
    with safe_open(directory / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys and not any("weak_ar" in k or "upsampler" in k for k in keys)
    assert any("length_predictor" in k for k in keys)
    assert (directory / "length_prediction.py").is_file()
    loaded = AutoModelForSeq2SeqLM.from_pretrained(directory).eval()
    assert loaded.config.nar_type == "vanilla" and loaded.weak_ar is None
    batch = tokenizer(sources, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    result = subprocess.run([sys.executable, "-c", NO_PACKAGE_SCRIPT, str(directory), json.dumps(sources)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.") and report["nar_type"] == "vanilla"
    assert report["translations"] == targets
    from training.evidence.analyze import translate  # the evidence tools take either NAR type

    assert translate(directory, sources, num_beams=3) == targets


def test_an_export_that_keeps_the_ranking_partner_ranks_its_length_beam_as_the_trained_model_does(memorized_vanilla,
                                                                                                  tokenizer, tmp_path):
    model, sources, targets = memorized_vanilla
    directory = export_for_hub(model, tmp_path / "export", tokenizer=tokenizer, keep_ranking_partner=True)
    with safe_open(directory / "model.safetensors", "pt") as f:
        kept = {k for k in f.keys() if k.startswith("weak_ar.")}
    assert kept == {k for k in model.state_dict() if k.startswith("weak_ar.")}  # the one shared decoder, whole
    loaded = AutoModelForSeq2SeqLM.from_pretrained(directory).eval()
    assert loaded.weak_ar is not None and not loaded.config.glancing
    encoded = tokenizer(sources, padding=True, return_tensors="pt")
    options = dict(num_beams=3, length_beam_ranking="partner", return_dict_in_generate=True, output_scores=True)
    theirs, ours = model.generate(**encoded, **options), loaded.generate(**encoded, **options)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores)
    assert tokenizer.batch_decode(ours.sequences, skip_special_tokens=True) == targets
    assert torch.equal(loaded.generate(**encoded), model.generate(**encoded))  # greedy never runs it
    ranking = json.dumps({"num_beams": 3, "length_beam_ranking": "partner"})  # a Hub user's way: remote code only
    result = subprocess.run([sys.executable, "-c", NO_PACKAGE_SCRIPT, str(directory), json.dumps(sources), ranking],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.") and report["translations"] == targets


@pytest.mark.parametrize("config, refusal", [
    (vanilla(weak_ar_layers=0), "no weak AR partner to keep"),
    (vanilla(weak_ar_share_parameters=False), "needs shared partners"),
    (tiny_config(), "'ctc' and would never run it"),
])
def test_keeping_the_ranking_partner_is_refused_where_there_is_none_or_no_use_for_it(config, refusal, tmp_path):
    with pytest.raises(ValueError, match=refusal):
        export_for_hub(WeakNATForConditionalGeneration(config), tmp_path / "export", keep_ranking_partner=True)
    assert not (tmp_path / "export").exists()


# ---------------------------------------------------------------------------------------------------------- training/


def test_the_data_filter_keeps_vanilla_targets_within_positions_and_length_offsets():
    from training import data

    source, target = [5] * 10, [6] * 30
    assert data.fit_reason(source, target, None, 48, max_length_offset=32) == data.FITS  # no CTC frame rule:
    assert data.fit_reason(source, target, 3, 48) == data.TARGET_DOES_NOT_FIT  # 30 tokens, 29 repeats > 30 frames
    assert data.fit_reason(source, target, None, 48, max_length_offset=16) == data.LENGTH_OFFSET_OUT_OF_RANGE
    assert data.fit_reason(source, [6] * 60, None, 48, max_length_offset=64) == data.TARGET_DOES_NOT_FIT
    assert data.REASONS[data.LENGTH_OFFSET_OUT_OF_RANGE] == "length_offset_out_of_range"
    config = vanilla()
    assert data.frames_per_token(config) is None and data.length_offset_range(config) == 8
    assert data.frames_per_token(tiny_config()) == 3 and data.length_offset_range(tiny_config()) is None


def test_train_py_trains_exports_and_the_export_loads_with_remote_code(tmp_path):
    from huggingface_hub import ModelCard
    from training_runs import DEMO, TINY, TRAIN, records, run

    run_dir = tmp_path / "run"
    run([sys.executable, TRAIN, DEMO, *TINY, "--nar_type", "vanilla", "--max_length_offset", "32", "--max_steps",
         "6", "--eval_steps", "6", "--save_steps", "6", "--vocab_size", "300", "--output_dir", str(run_dir)])
    train = [r for r in records(run_dir) if r["split"] == "train"]
    assert train and all(r["token_loss"] > 0 and r["length_loss"] > 0 and r["ar_loss"] > 0 for r in train)
    assert all(r["ctc_loss"] is None for r in train)
    stats = json.loads((run_dir / "data_stats.json").read_text())["train_pairs"]
    assert "length_offset_out_of_range" in stats and stats["kept"] > 0
    export = run_dir / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["nar_type"] == "vanilla" and config["weak_ar_layers"] == 0
    card = ModelCard.load(export / "README.md")
    assert "non-autoregressive (vanilla, with length prediction)" in card.text and "vanilla-nat" in card.data.tags
    sources = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee."]
    result = subprocess.run([sys.executable, "-c", NO_PACKAGE_SCRIPT, str(export), json.dumps(sources)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.") and report["nar_type"] == "vanilla"
    assert len(report["translations"]) == 2
    from training.export import main as export_main

    ranked = export_main(["--run_dir", str(run_dir), "--checkpoint", "latest", "--keep_ranking_partner", "true",
                          "--output_dir", str(tmp_path / "ranked")])
    assert json.loads((ranked / "config.json").read_text())["weak_ar_layers"] == 1
    assert "keeps the training's shared weak AR decoder" in ModelCard.load(ranked / "README.md").text
    model = AutoModelForSeq2SeqLM.from_pretrained(ranked).eval()
    tokenizer = AutoTokenizer.from_pretrained(ranked)
    assert model.generate(**tokenizer(sources, padding=True, return_tensors="pt"), num_beams=3,
                          length_beam_ranking="partner").shape[0] == 2


def test_a_length_beam_wider_than_the_length_classes_is_refused():
    model = WeakNATForConditionalGeneration(tiny_config(nar_type="vanilla", max_length_offset=1)).eval()
    with pytest.raises(ValueError, match="max_length_offset"):
        model.generate(**batch_of(SOURCES), num_beams=4)


# ------------------------------------------------------------------- length beam options, diagnostics (evidence tool)


def test_a_window_length_beam_is_fairseqs_lengths_around_the_most_probable_one():
    logits = torch.full((2, 17), -5.0)  # offsets -8..8
    logits[0, 8 + 2] = 5.0  # source 6 + 2 -> 8
    logits[1, 8 - 2] = 5.0  # source 3 - 2 -> 1: the window is clamped at 1
    lengths, scores = length_beam_lengths(logits, torch.tensor([6, 3]), max_length=40, k=5, how="window")
    assert lengths.tolist() == [[6, 7, 8, 9, 10], [1, 1, 1, 2, 3]]
    expected = F.log_softmax(logits, -1).gather(1, lengths - torch.tensor([[6], [3]]) + 8)
    assert torch.allclose(scores, expected)
    top, _ = length_beam_lengths(logits, torch.tensor([6, 3]), max_length=40, k=5, how="top_k")
    assert top[:, 0].tolist() == [8, 1] and len(set(top[1].tolist())) == 5  # top-k: distinct, may sit on one side


def test_repetition_positions_locate_repeats_by_quarter_and_length():
    from training.evidence.vanilla_diagnostics import repetition_positions

    found = repetition_positions(["a a b c d e f g", "a b c d e f g g", "a b"], ["x " * 5, "x " * 15, "x"])
    assert found["share_of_repeats_by_quarter"] == [0.5, 0.0, 0.0, 0.5]
    assert found["sentences_with_a_repeat"] == pytest.approx(2 / 3)
    assert found["rate_by_reference_length"]["0-10"] == pytest.approx(1 / 10)  # "a a b c d e f g" + "a b"


def test_diagnostics_of_a_model_that_learned_its_pairs_find_exact_lengths_and_rank_with_its_partner(
        memorized_vanilla, tokenizer):
    from training.evidence.vanilla_diagnostics import RANKINGS, diagnose

    model, sources, targets = memorized_vanilla
    # a distillation teacher whose translation of the first source is one token shorter than the reference
    teacher_translations = [" ".join(targets[0].split()[:-1]), *targets[1:]]
    found = diagnose(model, tokenizer, sources, targets, num_beams=3, teacher_translations=teacher_translations)
    assert found["length_accuracy"]["exact"] == 1.0 and found["length_accuracy"]["mean_error"] == 0
    assert found["length_accuracy_vs_teacher"]["too_long"] == pytest.approx(1 / len(sources))
    assert found["translations"]["greedy"] == targets == found["translations"]["oracle"]
    assert found["translations"]["teacher_length"][1:] == targets[1:]  # decoded at the teacher's lengths
    assert found["translations"]["teacher_length"][0] != targets[0]
    assert set(found["systems"]) == {"greedy", "oracle", "teacher_length"} | {f"{c}/{r}" for c in ("top_k", "window")
                                                             for r in RANKINGS if r != "teacher"}
    assert found["systems"]["greedy"]["bleu"] == pytest.approx(100.0)
    assert found["systems"]["oracle"]["p_vs_greedy"] == 1.0  # the same translations: no difference to test
    assert set(found["translations"]) == set(found["systems"])
    # the partner trained on these pairs reading the NAR states at the right length prefers the right candidate
    assert found["systems"]["top_k/partner"]["bleu"] == pytest.approx(100.0)


def test_the_diagnostics_summary_gives_mean_and_std_over_seeds_and_a_p_per_seed_pair(tmp_path):
    from training.evidence.vanilla_diagnostics import summarize

    references = [f"a man {i} rides a red bicycle fast" for i in range(30)]  # 8 words
    references += [f"a man number {i} rides a red bicycle down the long and busy street of the old town "
                   "past the market" for i in range(10)]  # 21 words
    wrong = [f"the dog {i} sits" for i in range(40)]

    def result(bleu: float, translations: list[str]) -> dict:
        accuracy = {"exact": 0.25, "within_1": 0.5, "within_2": 0.75, "mean_error": -1.0}
        return {"length_accuracy": accuracy, "length_accuracy_vs_teacher": accuracy,
                "repetition": {"greedy": {"share_of_repeats_by_quarter": [0, 0, 0.5, 0.5],
                                          "sentences_with_a_repeat": 0.7}},
                "systems": {"greedy": {"bleu": bleu, "repetition_rate": 0.1},
                            "top_k/joint": {"bleu": bleu, "repetition_rate": 0.1},
                            "top_k/average": {"bleu": bleu - 1, "repetition_rate": 0.1},
                            "top_k/partner": {"bleu": bleu + 2, "repetition_rate": 0.05}},
                "translations": {"greedy": translations, "top_k/joint": translations, "top_k/average": wrong,
                                 "top_k/partner": translations}}

    for arm, seed, bleu, translations in (("vanilla", 1, 20.0, wrong), ("vanilla", 2, 22.0, wrong),
                                          ("vanilla_weak_ar", 1, 30.0, references),
                                          ("vanilla_weak_ar", 2, 30.0, wrong)):
        found = result(bleu, translations)
        if arm == "vanilla":  # a model trained without partners has no partner ranking
            del found["systems"]["top_k/partner"], found["translations"]["top_k/partner"]
        (tmp_path / f"{arm}-seed{seed}.json").write_text(json.dumps(found))
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:]
            for line in summarize(tmp_path, references).splitlines() if line.startswith("| ")}
    greedy = rows["BLEU (repeated tokens), greedy"]
    assert greedy[:2] == ["21.00 ± 1.41 (10.0 ± 0.0%)", "30.00 ± 0.00 (10.0 ± 0.0%)"]
    assert float(greedy[2]) <= 0.01 and float(greedy[3]) == 1.0  # seed 1: references vs wrong; seed 2: identical
    assert rows["BLEU (repeated tokens), top_k/partner"][0] == "—"
    assert rows["length accuracy vs the reference: exact (%)"][:2] == ["25.0 ± 0.0", "25.0 ± 0.0"]
    assert rows["length accuracy vs the reference: within 2 (%)"][:2] == ["75.0 ± 0.0", "75.0 ± 0.0"]
    short, long = (rows[f"greedy BLEU, references of {name} words ({count} sentences)"]
                   for name, count in (("0-10", 30), ("20-inf", 10)))
    for bucket in short, long:  # seed 1 of the partner arm is the references themselves, seed 2 the wrong outputs
        assert float(bucket[0].split(" ± ")[0]) < 1 and float(bucket[1].split(" ± ")[0]) > 49
        assert float(bucket[2]) <= 0.01 and float(bucket[3]) == 1.0
    assert not any(label.startswith("greedy BLEU, references of 10-20") for label in rows)  # no sentence, no row
    gain = rows["vanilla_weak_ar top_k/partner vs vanilla top_k/joint"]
    assert gain[0] == "11.00 ± 1.41" and float(gain[1]) <= 0.01 and float(gain[2]) == 1.0
    # the default ranking's evidence: joint against average within each run, for each way of picking lengths
    top_k, window = rows["vanilla_weak_ar seed 1"]
    assert top_k.startswith("+1.00 (") and float(top_k[7:-1]) <= 0.01 and window == "—"
    assert rows["vanilla seed 2"] == ["+1.00 (1.000)", "—"]  # the same translations either way


def test_a_fresh_partner_probe_learns_to_read_the_frozen_layers_and_leaves_the_model_as_it_was(
        memorized_vanilla, tokenizer, tmp_path):
    from training.evidence.partner_probe import probe

    model, sources, targets = memorized_vanilla
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, copies in (("train", 8), ("valid", 1)):
        (corpus / f"{split}.de").write_text("".join(s + "\n" for s in sources * copies), encoding="utf-8")
        (corpus / f"{split}.en").write_text("".join(t + "\n" for t in targets * copies), encoding="utf-8")
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    found = probe(model, tokenizer, corpus, updates=40, max_tokens=200, learning_rate=3e-3, warmup=1, eval_every=20,
                  layers=[model.config.decoder_layers - 1])
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())
    assert found["train_pairs"] == 40 and found["validation_pairs"] == 5 and found["layers"] == [4]
    assert [point["step"] for point in found["probe"]] == [20, 40]
    assert found["probe"][1]["loss"] < found["probe"][0]["loss"] < math.log(len(tokenizer))
    # the model's own partner learned these pairs with the layers: it reads them better than 40 fresh updates can
    assert found["own_partners_loss_by_layer"][0] < found["probe_loss"]


def test_the_probe_summary_gives_each_arms_loss_over_seeds_and_the_difference_per_seed_pair(tmp_path):
    from training.evidence.partner_probe import summarize

    for arm, seed, fresh, own in (("vanilla", 1, 3.0, None), ("vanilla", 2, 3.2, None),
                                  ("vanilla_weak_ar", 1, 2.9, 2.5), ("vanilla_weak_ar", 2, 3.0, 2.7)):
        (tmp_path / f"{arm}-seed{seed}.json").write_text(json.dumps({
            "decoder_layers": 3, "layers": [3], "probe_loss_by_layer": [fresh], "probe_loss": fresh,
            "probe": [{"step": 5, "loss_by_layer": [fresh - seed / 10]}, {"step": 10, "loss_by_layer": [fresh]}],
            "own_partners_loss_by_layer": own and [own], "updates": 10, "max_tokens": 100, "learning_rate": 1e-3,
            "train_pairs": 50, "validation_pairs": 5}))
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")]
             for line in summarize(tmp_path).splitlines() if line.startswith("| ")]
    rows = {row[0]: row[1:] for row in cells}
    assert rows["fresh partner, layer 3, after 10 updates"] == ["3.100 ± 0.141", "2.950 ± 0.071", "-0.100", "-0.200"]
    assert rows["fresh partner, layer 3, lowest on its curve"] == ["2.950 ± 0.071", "2.800 ± 0.000", "-0.100",
                                                                  "-0.200"]
    assert rows["own partners (trained with the model), layer 3"] == ["—", "2.600 ± 0.141", "", ""]
    (tmp_path / "vanilla-seed3.json").write_text(json.dumps({"decoder_layers": 3, "layers": [1, 2, 3]}))
    with pytest.raises(SystemExit, match="different layers"):
        summarize(tmp_path)
