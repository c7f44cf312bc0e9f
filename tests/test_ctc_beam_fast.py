"""The fast CTC beam searches against the plain-Python oracle (`ctc_prefix_beam_search_reference`): the batched
torch search and the plain-Python search over pruned frames give the same hypotheses and scores; the batched one
never waits for the host inside its frame loop; the backend choice of `generate`."""

import pytest
import torch
from test_ctc import BLANK, PAD, assert_beams_match_reference
from torch.profiler import ProfilerActivity, profile
from training_runs import REPO
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

from hf_weaknat.ctc import (
    PRUNED_CPU_MAX_BATCH,
    choose_beam_search_backend,
    ctc_beam_search,
    ctc_frame_candidates,
    ctc_prefix_beam_search,
    ctc_prefix_beam_search_pruned,
    ctc_prefix_beam_search_reference,
)

SHIPPED = REPO / "models" / "weaknat-multi30k-de-en"
TEST_SOURCES = REPO / "training" / "corpora" / "multi30k_distilled" / "test.de"


def hard_log_probs(seed, batch=7, frames=9, vocab=7):
    """Random frames with what makes a CTC search go wrong: rows of length 0 and 1, blank-dominated frames, one
    token held over several frames (repeats and their merges), tokens with zero probability, garbage past the ends.
    Returns (log_probs (batch, frames, vocab), lengths (batch,))."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, frames, vocab, generator=gen)
    logits[0, :, BLANK] += 4  # blank-dominated
    held = torch.randint(1, vocab, (batch,), generator=gen)
    logits[1:4, 2:6] += 3 * torch.nn.functional.one_hot(held[1:4], vocab)[:, None, :]  # a token held over 4 frames
    logits[4, :, vocab - 1] = float("-inf")  # a token that can never be emitted
    lengths = torch.tensor([frames, 0, frames - 2, 1, frames, frames - 4, frames][:batch])
    return logits.log_softmax(-1), lengths


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("beam_size", "token_candidates"), [(1, 1), (2, 2), (3, 6), (4, 3), (5, 2)])
def test_batched_and_pruned_searches_give_the_references_hypotheses_and_scores(seed, beam_size, token_candidates):
    log_probs, lengths = hard_log_probs(seed)
    batched = ctc_prefix_beam_search(log_probs, lengths, BLANK, PAD, beam_size, token_candidates)
    pruned = ctc_prefix_beam_search_pruned(log_probs, lengths, BLANK, PAD, beam_size, token_candidates)
    # the accelerator's way: candidates and a table of their log probs copied to the CPU, the search reading those
    copied = ctc_prefix_beam_search_pruned(log_probs, lengths, BLANK, PAD, beam_size, token_candidates, copy_table=True)
    for b, n in enumerate(lengths.tolist()):
        reference = ctc_prefix_beam_search_reference(log_probs[b, :n], BLANK, beam_size, token_candidates)
        assert_beams_match_reference(batched[0][b], batched[1][b], reference, beam_size)
        assert_beams_match_reference(pruned[0][b], pruned[1][b], reference, beam_size)
    assert torch.equal(pruned[0], copied[0]) and torch.equal(pruned[1], copied[1])


def test_pruned_search_keeps_float64_and_a_blank_id_that_is_not_zero():
    log_probs, lengths = hard_log_probs(5)
    log_probs, blank = log_probs.double(), 3
    prefixes, scores = ctc_prefix_beam_search_pruned(log_probs, lengths, blank, PAD, 4, 3)
    assert scores.dtype == torch.float64
    for b, n in enumerate(lengths.tolist()):
        reference = ctc_prefix_beam_search_reference(log_probs[b, :n], blank, 4, 3)
        assert_beams_match_reference(prefixes[b], scores[b], reference, 4)


def test_frame_candidates_are_each_frames_best_non_blank_tokens_in_one_call():
    log_probs, _ = hard_log_probs(1)
    cand, lp_cand, lp_blank = ctc_frame_candidates(log_probs, BLANK, 3)
    assert cand.shape == lp_cand.shape == (*log_probs.shape[:2], 3) and torch.equal(lp_blank, log_probs[:, :, BLANK])
    expected = log_probs[:, :, 1:].topk(3, dim=-1)
    assert torch.equal(lp_cand, expected.values) and torch.equal(cand, expected.indices + 1)
    everything, lp_all, _ = ctc_frame_candidates(log_probs, 2, None)  # all but the blank, in id order
    assert everything[0, 0].tolist() == [0, 1, 3, 4, 5, 6] and torch.equal(lp_all, log_probs[:, :, [0, 1, 3, 4, 5, 6]])


def host_synchronisations(frames):
    """Ops that make the host wait for the device (or copy host data to it), run by one batched search."""
    log_probs = torch.randn(3, frames, 50, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ctc_prefix_beam_search(log_probs, torch.tensor([frames, frames - 1, 0]), BLANK, PAD, 4, 8)
    waiting = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::lift_fresh", "aten::unique",
               "aten::_unique2", "aten::masked_select"}
    return sorted(e.name for e in prof.events() if e.name in waiting)


def test_batched_search_does_not_synchronise_with_the_host_in_its_frame_loop():
    # the one wait is the output's length, after the loop: the same count for 3 frames as for 12
    assert host_synchronisations(3) == host_synchronisations(12)


def test_auto_backend_is_the_pruned_search_on_cpu_and_up_to_its_batch_limit_elsewhere():
    assert choose_beam_search_backend("cpu", 1) == choose_beam_search_backend("cpu", 512) == "pruned_cpu"
    assert choose_beam_search_backend(torch.device("cuda", 1), PRUNED_CPU_MAX_BATCH) == "pruned_cpu"
    assert choose_beam_search_backend("cuda", PRUNED_CPU_MAX_BATCH + 1) == "batched"
    assert choose_beam_search_backend("cpu", 1, "batched") == "batched"
    assert choose_beam_search_backend("cuda", 512, "pruned_cpu") == "pruned_cpu"
    with pytest.raises(ValueError, match="beam_search_backend must be one of"):
        choose_beam_search_backend("cpu", 1, "gpu")
    # with every token a candidate there is nothing to prune: the batched search runs whatever was asked
    log_probs, lengths = hard_log_probs(2)
    batched = ctc_prefix_beam_search(log_probs, lengths, BLANK, PAD, 3)
    assert all(torch.equal(a, b) for a, b in zip(batched, ctc_beam_search(log_probs, lengths, BLANK, PAD, 3, None,
                                                                           "pruned_cpu")))


@pytest.fixture(scope="module")
def shipped():
    model = AutoModelForSeq2SeqLM.from_pretrained(SHIPPED).eval()
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    sources = TEST_SOURCES.read_text(encoding="utf-8").splitlines()[:50]
    return model, tokenizer(sources, padding=True, return_tensors="pt")


def test_searches_agree_on_the_shipped_models_first_50_test_sentences(shipped):
    model, batch = shipped
    with torch.no_grad():
        log_probs = model(**batch).logits.float().log_softmax(-1)
    lengths = model.frame_mask(batch["attention_mask"]).sum(1)
    blank, pad = model.config.blank_token_id, model.config.pad_token_id
    batched = ctc_prefix_beam_search(log_probs, lengths, blank, pad, 5, 10)
    pruned = ctc_prefix_beam_search_pruned(log_probs, lengths, blank, pad, 5, 10)
    copied = ctc_prefix_beam_search_pruned(log_probs, lengths, blank, pad, 5, 10, copy_table=True)
    assert torch.equal(batched[0], pruned[0]) and torch.equal(pruned[0], copied[0])
    assert torch.equal(pruned[1], copied[1])
    torch.testing.assert_close(batched[1], pruned[1], atol=1e-4, rtol=1e-5)
    b = 32  # and the oracle, on the 4000-token vocabulary (slow: one sentence, of 21 frames)
    reference = ctc_prefix_beam_search_reference(log_probs[b, : lengths[b]], blank, 5, 10)
    assert [p for p, _ in reference] == [[t for t in row if t != pad] for row in batched[0][b].tolist()]


def test_generate_runs_the_backend_its_generation_config_or_keyword_names(shipped):
    model, batch = shipped
    batch = {name: value[:8] for name, value in batch.items()}
    asked = {name: model.generate(**batch, generation_config=GenerationConfig(num_beams=5, beam_search_backend=name),
                                  num_return_sequences=5, return_dict_in_generate=True, output_scores=True)
             for name in ("batched", "pruned_cpu")}
    assert torch.equal(asked["batched"].sequences, asked["pruned_cpu"].sequences)
    assert not torch.equal(asked["batched"].sequences_scores, asked["pruned_cpu"].sequences_scores)  # float64 sums
    torch.testing.assert_close(asked["batched"].sequences_scores, asked["pruned_cpu"].sequences_scores)
    keyword = model.generate(**batch, num_beams=5, beam_search_backend="batched", num_return_sequences=5)
    assert torch.equal(keyword, asked["batched"].sequences)  # also a keyword, as transformers' own options
    with pytest.raises(ValueError, match="beam_search_backend must be one of"):
        model.generate(**batch, generation_config=GenerationConfig(num_beams=2, beam_search_backend="fast"))
