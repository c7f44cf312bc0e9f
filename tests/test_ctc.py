import itertools
from functools import lru_cache

import pytest
import torch

from hf_weaknat.ctc import (
    collapse_repeats_and_blanks,
    ctc_greedy_decode,
    ctc_prefix_beam_search,
    ctc_prefix_beam_search_reference,
    ctc_viterbi_align,
)

BLANK, PAD = 0, -7  # a pad id that can never be a real token makes padding bugs visible


def collapse_py(ids, blank=BLANK):
    """Plain-Python CTC collapse of one valid frame sequence."""
    out, prev = [], None
    for i in ids:
        if i != blank and i != prev:
            out.append(i)
        prev = i
    return out


def rows_without_pad(t):
    return [[x for x in row if x != PAD] for row in t.tolist()]


@lru_cache(maxsize=None)
def all_frame_sequences(frames, vocab):
    """Every frame labelling of the given length, and what each collapses to."""
    seqs = list(itertools.product(range(vocab), repeat=frames))
    return torch.tensor(seqs, dtype=torch.long).view(len(seqs), frames), [tuple(collapse_py(s)) for s in seqs]


def path_scores(log_probs, seqs):
    """log_probs: (frames, vocab), seqs: (n, frames) -> (n,) summed log prob of each labelling."""
    frames = log_probs.shape[0]
    return log_probs[torch.arange(frames), seqs].sum(-1) if frames else torch.zeros(len(seqs))


def random_log_probs(gen, batch, frames, vocab, scale=2.0):
    return torch.log_softmax(scale * torch.randn(batch, frames, vocab, generator=gen), dim=-1)


# ---------------------------------------------------------------- collapse


def test_collapse_merges_adjacent_repeats_and_keeps_repeats_split_by_blank():
    ids = torch.tensor([[1, 1, 0, 1, 2, 2, 0, 0]])
    out = collapse_repeats_and_blanks(ids, torch.ones_like(ids, dtype=torch.bool), BLANK, PAD)
    assert out.tolist() == [[1, 1, 2]]


def test_collapse_ignores_masked_frames_at_end_and_in_the_middle():
    ids = torch.tensor([[1, 2, 2, 3], [1, 5, 1, 4]])
    mask = torch.tensor([[True, True, False, False], [True, False, True, True]])
    out = collapse_repeats_and_blanks(ids, mask, BLANK, PAD)
    # row 1: the masked 5 neither appears nor separates the two 1s
    assert out.tolist() == [[1, 2], [1, 4]]


def test_collapse_all_blank_row_is_empty_and_nothing_kept_gives_zero_width():
    ids = torch.tensor([[0, 0, 0], [3, 0, 3]])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    out = collapse_repeats_and_blanks(ids, mask, BLANK, PAD)
    assert out.shape == (2, 0) and out.dtype == torch.long
    no_frames = torch.zeros(3, 0, dtype=torch.long)
    empty = collapse_repeats_and_blanks(no_frames, no_frames.bool(), BLANK, PAD)
    assert empty.shape == (3, 0)


def test_collapse_pads_rows_of_mixed_lengths_with_pad_id():
    ids = torch.tensor([[1, 2, 3, 4], [0, 2, 2, 0], [0, 0, 0, 0]])
    out = collapse_repeats_and_blanks(ids, torch.ones_like(ids, dtype=torch.bool), BLANK, PAD)
    assert out.tolist() == [[1, 2, 3, 4], [2, PAD, PAD, PAD], [PAD, PAD, PAD, PAD]]


def test_collapse_matches_python_reference_on_random_masked_batches():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (64, 12), generator=gen)
    mask = torch.rand(64, 12, generator=gen) > 0.3  # holes anywhere, not just at the end
    out = collapse_repeats_and_blanks(ids, mask, BLANK, PAD)
    expected = [collapse_py([i for i, m in zip(r, mr) if m]) for r, mr in zip(ids.tolist(), mask.tolist())]
    assert rows_without_pad(out) == expected
    assert out.shape[1] == max(len(e) for e in expected)


def test_greedy_decode_equals_collapse_of_per_frame_argmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 10, 5, generator=gen)
    lengths = torch.randint(0, 11, (8,), generator=gen)
    mask = torch.arange(10)[None] < lengths[:, None]
    out = ctc_greedy_decode(logits, mask, BLANK, PAD)
    expected = [collapse_py(row[:n]) for row, n in zip(logits.argmax(-1).tolist(), lengths.tolist())]
    assert rows_without_pad(out) == expected


# ---------------------------------------------------------------- Viterbi


TARGETS = [[], [1], [2, 3], [1, 1], [3, 3, 3], [1, 2, 1], [2, 2, 1]]


@pytest.mark.parametrize("seed", range(4))
def test_viterbi_alignment_matches_brute_force_on_tiny_cases(seed):
    gen = torch.Generator().manual_seed(seed)
    vocab, max_frames = 4, 6
    batch = len(TARGETS)
    log_probs = random_log_probs(gen, batch, max_frames, vocab)
    frame_lengths = torch.randint(0, max_frames + 1, (batch,), generator=gen)
    frame_lengths[0] = max_frames
    targets = torch.full((batch, 3), 99)  # padding must be ignored, even out of vocab range
    for b, tgt in enumerate(TARGETS):
        targets[b, : len(tgt)] = torch.tensor(tgt, dtype=torch.long)
    target_lengths = torch.tensor([len(t) for t in TARGETS])

    align, fits = ctc_viterbi_align(log_probs, frame_lengths, targets, target_lengths, BLANK)
    assert align.shape == (batch, max_frames)

    for b, tgt in enumerate(TARGETS):
        n = int(frame_lengths[b])
        seqs, collapsed = all_frame_sequences(n, vocab)
        ok = torch.tensor([c == tuple(tgt) for c in collapsed])
        assert bool(fits[b]) == bool(ok.any())
        assert (align[b, n:] == BLANK).all()
        if not ok.any():
            assert (align[b] == BLANK).all()
            continue
        assert collapse_py(align[b, :n].tolist()) == tgt
        best = path_scores(log_probs[b, :n], seqs)[ok].max()
        got = path_scores(log_probs[b, :n], align[b, :n][None])[0]
        torch.testing.assert_close(got, best)


def test_viterbi_reports_unfit_targets_without_nan():
    log_probs = torch.log_softmax(torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(5)), dim=-1)
    targets = torch.tensor([[1, 1], [2, 3], [1, 1]])
    # [1, 1] needs 3 frames (blank between); [2, 3] fits in 2; third row has 3 frames
    align, fits = ctc_viterbi_align(log_probs, torch.tensor([2, 2, 3]), targets, torch.tensor([2, 2, 2]), BLANK)
    assert fits.tolist() == [False, True, True]
    assert (align[0] == BLANK).all()
    assert align[1, :2].tolist() == [2, 3]
    assert align[2, :3].tolist() == [1, 0, 1]


def test_viterbi_handles_empty_targets_zero_frames_and_minus_inf_log_probs():
    log_probs = torch.log_softmax(torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(6)), dim=-1)
    log_probs[:, :, 2] = float("-inf")  # token 2 impossible everywhere, but still structurally alignable
    targets = torch.tensor([[0], [2], [1]])
    align, fits = ctc_viterbi_align(log_probs, torch.tensor([3, 2, 0]), targets, torch.tensor([0, 1, 1]), BLANK)
    assert fits.tolist() == [True, True, False]
    assert align[0].tolist() == [BLANK] * 3
    assert collapse_py(align[1, :2].tolist()) == [2]
    assert (align[2] == BLANK).all()
    # zero-width targets tensor
    no_targets = torch.zeros(3, 0, dtype=torch.long)
    align, fits = ctc_viterbi_align(log_probs, torch.tensor([3, 1, 0]), no_targets, torch.zeros(3).long(), BLANK)
    assert fits.all() and (align == BLANK).all()


# ---------------------------------------------------------------- prefix beam search


def assert_beams_match_reference(prefixes, scores, reference, beam_size):
    got = rows_without_pad(prefixes)
    assert got[: len(reference)] == [p for p, _ in reference]
    expected = torch.tensor([s for _, s in reference], dtype=torch.float64)
    torch.testing.assert_close(scores[: len(reference)].double(), expected, atol=1e-4, rtol=1e-5)
    # slots with no prefix are padding with score -inf
    assert all(p == [] for p in got[len(reference) :])
    assert torch.isneginf(scores[len(reference) :]).all()


@pytest.mark.parametrize("beam_size", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(3))
def test_batched_beam_search_matches_reference_with_mixed_frame_lengths(seed, beam_size):
    gen = torch.Generator().manual_seed(100 * seed + beam_size)
    vocab = 5 + seed % 2
    batch, max_frames = 6, 8
    log_probs = random_log_probs(gen, batch, max_frames, vocab, scale=1.5)
    frame_lengths = torch.tensor([8, 5, 7, 6, 1, 0])
    # garbage past each row's length: would change the result if it leaked in
    for b, n in enumerate(frame_lengths.tolist()):
        log_probs[b, n:, :] = torch.log_softmax(10 * torch.randn(max_frames - n, vocab, generator=gen), -1)
    prefixes, scores = ctc_prefix_beam_search(log_probs, frame_lengths, BLANK, PAD, beam_size)
    assert prefixes.shape[:2] == (batch, beam_size) and scores.shape == (batch, beam_size)
    for b, n in enumerate(frame_lengths.tolist()):
        reference = ctc_prefix_beam_search_reference(log_probs[b, :n], BLANK, beam_size)
        assert_beams_match_reference(prefixes[b], scores[b], reference, beam_size)


def test_beam_search_with_non_zero_blank_id_matches_reference():
    gen = torch.Generator().manual_seed(7)
    log_probs = random_log_probs(gen, 3, 6, 5)
    blank = 4
    prefixes, scores = ctc_prefix_beam_search(log_probs, torch.tensor([6, 6, 4]), blank, PAD, 3)
    for b, n in enumerate([6, 6, 4]):
        reference = ctc_prefix_beam_search_reference(log_probs[b, :n], blank, 3)
        assert_beams_match_reference(prefixes[b], scores[b], reference, 3)


def test_large_beam_search_is_exact_against_brute_force_total_probability():
    gen = torch.Generator().manual_seed(3)
    frames, vocab, batch = 3, 3, 5
    log_probs = random_log_probs(gen, batch, frames, vocab)
    seqs, collapsed = all_frame_sequences(frames, vocab)
    # at most 1 + 2 + 4 + 8 prefixes exist, so a beam of 16 never prunes
    prefixes, scores = ctc_prefix_beam_search(log_probs, torch.full((batch,), frames), BLANK, PAD, 16)
    for b in range(batch):
        per_path = path_scores(log_probs[b], seqs)
        totals = {}
        for c, s in zip(collapsed, per_path.tolist()):
            totals.setdefault(c, []).append(s)
        totals = {c: torch.logsumexp(torch.tensor(v), 0) for c, v in totals.items()}
        best = max(totals, key=lambda c: totals[c])
        assert tuple(rows_without_pad(prefixes[b])[0]) == best
        torch.testing.assert_close(scores[b, 0], totals[best])
        # every prefix found carries exactly its total probability, and all are found
        found = {tuple(p): s for p, s in zip(rows_without_pad(prefixes[b]), scores[b]) if s > float("-inf")}
        assert set(found) == set(totals)
        for c, s in found.items():
            torch.testing.assert_close(s, totals[c])


def test_beam_search_pads_missing_beams_and_handles_zero_frames():
    log_probs = torch.log_softmax(torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(8)), dim=-1)
    prefixes, scores = ctc_prefix_beam_search(log_probs, torch.tensor([1, 0]), BLANK, PAD, 5)
    # one frame over vocab 3: only [], [1], [2] exist
    assert sorted(map(tuple, rows_without_pad(prefixes[0])[:3])) == [(), (1,), (2,)]
    assert prefixes[0, 3:].eq(PAD).all() and torch.isneginf(scores[0, 3:]).all()
    torch.testing.assert_close(torch.logsumexp(scores[0, :3], 0), torch.tensor(0.0))
    assert rows_without_pad(prefixes[1]) == [[]] * 5 and scores[1, 0] == 0 and torch.isneginf(scores[1, 1:]).all()
    assert (scores[0, :-1] >= scores[0, 1:]).all()


@pytest.mark.parametrize("token_candidates", [1, 2, 3])
def test_pruned_beam_search_matches_pruned_reference_including_merges_of_pruned_tokens(token_candidates):
    gen = torch.Generator().manual_seed(20 + token_candidates)
    batch, max_frames, vocab, beam_size = 6, 8, 6, 4
    log_probs = random_log_probs(gen, batch, max_frames, vocab, scale=1.0)
    frame_lengths = torch.tensor([8, 8, 8, 7, 6, 3])
    prefixes, scores = ctc_prefix_beam_search(log_probs, frame_lengths, BLANK, PAD, beam_size, token_candidates)
    for b, n in enumerate(frame_lengths.tolist()):
        reference = ctc_prefix_beam_search_reference(log_probs[b, :n], BLANK, beam_size, token_candidates)
        assert_beams_match_reference(prefixes[b], scores[b], reference, beam_size)


def test_token_candidates_covering_vocab_equals_unpruned_and_pruning_restricts_tokens():
    gen = torch.Generator().manual_seed(11)
    vocab = 8
    log_probs = random_log_probs(gen, 4, 7, vocab)
    lengths = torch.tensor([7, 7, 3, 5])
    full = ctc_prefix_beam_search(log_probs, lengths, BLANK, PAD, 4)
    same = ctc_prefix_beam_search(log_probs, lengths, BLANK, PAD, 4, token_candidates=vocab - 1)
    assert torch.equal(full[0], same[0]) and torch.equal(full[1], same[1])

    pruned, pruned_scores = ctc_prefix_beam_search(log_probs, lengths, BLANK, PAD, 4, token_candidates=2)
    assert torch.isfinite(pruned_scores[:, 0]).all()
    nonblank = log_probs[:, :, 1:].topk(2, dim=-1).indices + 1  # (batch, frames, 2)
    for b, n in enumerate(lengths.tolist()):
        allowed = set(nonblank[b, :n].flatten().tolist())
        assert all(set(p) <= allowed for p in rows_without_pad(pruned[b]))


@pytest.mark.parametrize("token_candidates", [None, 4])
def test_beam_search_never_emits_impossible_tokens_or_blank(token_candidates):
    gen = torch.Generator().manual_seed(9)
    log_probs = random_log_probs(gen, 2, 5, 5)
    log_probs[:, :, 3:] = float("-inf")  # tokens 3 and 4 have zero probability
    log_probs = log_probs.log_softmax(-1)
    prefixes, scores = ctc_prefix_beam_search(log_probs, torch.tensor([5, 4]), BLANK, PAD, 6, token_candidates)
    assert not torch.isnan(scores).any()
    for b, n in enumerate([5, 4]):
        reference = ctc_prefix_beam_search_reference(log_probs[b, :n], BLANK, 6, token_candidates)
        assert_beams_match_reference(prefixes[b], scores[b], reference, 6)
        assert all(set(p) <= {1, 2} for p in rows_without_pad(prefixes[b]))
