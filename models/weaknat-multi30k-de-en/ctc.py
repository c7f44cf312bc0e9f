"""CTC in pure torch: the upsampler, the fit rule, the loss, greedy decoding, sampling, Viterbi alignment and prefix
beam search.

Shapes use the names batch, frames (decoder output positions), vocab and
tgt_len. This file is shipped as Hugging Face remote code next to the model,
so it depends on nothing but the standard library and torch. The slow
plain-Python references at the end exist for the tests.
"""

import math
from collections import defaultdict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------------
# Upsampling: CTC needs more decoder frames than target tokens (used by modeling_weaknat.WeakNATModel)


class WeakNATUpsampler(nn.Module):
    """Turns final encoder states (batch, src_len, d) into decoder frames (batch, ratio * src_len, d).

    Frames 0..ratio-1 come from source position 0, and so on: with right padding the valid frames of a row are its
    first `ratio * src_len` frames, and frames made from padded source positions never reach a loss or an output.
    """

    def __init__(self, config):
        super().__init__()
        self.ratio, self.method = config.upsample_ratio, config.upsample_method
        linear = self.method == "linear"
        self.proj = nn.Linear(config.d_model, config.upsample_ratio * config.d_model) if linear else None

    def forward(self, encoder_states, attention_mask):
        batch, src_len, d = encoder_states.shape
        if self.method == "linear":
            frames = self.proj(encoder_states).view(batch, src_len * self.ratio, d)  # (batch, frames, d)
        else:
            frames = encoder_states.repeat_interleave(self.ratio, dim=1)
        return frames, self.frame_mask(attention_mask)

    def frame_mask(self, attention_mask):
        """(batch, src_len) source mask -> (batch, frames) bool mask of the frames made from real tokens."""
        return attention_mask.bool().repeat_interleave(self.ratio, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# The fit rule, the loss and decoding


def ctc_min_frames(targets, target_lengths):
    """The fewest frames CTC can emit each target from: one per token, plus a blank between adjacent repeats.

    targets: (batch, tgt_len) long, anything past `target_lengths` (batch,) is ignored. Returns (batch,) long.
    The one definition of "a target fits its frames" (`frames >= ctc_min_frames(...)`), used by the CTC loss,
    glancing's alignment and the training data filter alike.
    """
    positions = torch.arange(targets.shape[1], device=targets.device)
    real_pairs = positions[1:] < target_lengths[:, None]
    repeats = ((targets[:, 1:] == targets[:, :-1]) & real_pairs).sum(dim=1)
    return target_lengths + repeats


def ctc_loss(logits, frame_mask, labels, blank_id):
    """Per-sentence CTC loss divided by target length, averaged over the pairs whose target fits its frames.

    logits (batch, frames, vocab); frame_mask (batch, frames) bool; labels (batch, tgt_len), right-padded with -100.
    Returns (loss, fits): pairs that do not fit (`ctc_min_frames`) are left out of the mean and reported in
    `fits` (batch,), never turned into inf/NaN.
    """
    target_mask = labels != -100
    target_lengths, frame_lengths = target_mask.sum(1), frame_mask.sum(1)
    fits = frame_lengths >= ctc_min_frames(labels, target_lengths)
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (frames, batch, vocab), float32 for CTC
    per_pair = F.ctc_loss(log_probs, labels.masked_fill(~target_mask, 0), frame_lengths, target_lengths,
                          blank=blank_id, reduction="none", zero_infinity=True)
    per_pair = per_pair / target_lengths.clamp(min=1)
    return (per_pair * fits).sum() / fits.sum().clamp(min=1), fits


def collapse_repeats_and_blanks(frame_ids, frame_mask, blank_id, pad_id):
    """Turn a frame-level CTC labelling into a token sequence.

    frame_ids: (batch, frames) long; frame_mask: (batch, frames) bool, True = valid.
    A valid frame is kept if it is not blank and differs from the previous valid
    frame (so "a a _ a" gives "a a"). Invalid frames are skipped entirely.
    Returns (batch, out_len) long, right-padded with pad_id; out_len is the
    largest kept count in the batch (possibly 0).
    """
    batch, frames = frame_ids.shape
    frame_mask = frame_mask.bool()
    pos = torch.arange(frames, device=frame_ids.device).expand(batch, frames)
    # index of the previous *valid* frame (-1 if none), so that masked frames
    # never act as separators even if they are not at the end of the row
    last_valid = torch.where(frame_mask, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    prev_idx = torch.cat([torch.full_like(pos[:, :1], -1), last_valid[:, :-1]], dim=1)
    prev_ids = frame_ids.gather(1, prev_idx.clamp(min=0))
    keep = frame_mask & (frame_ids != blank_id) & ((prev_idx < 0) | (frame_ids != prev_ids))
    # a stable sort moves the kept frames to the front, preserving their order
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    kept = frame_ids.gather(1, order)
    counts = keep.sum(dim=1)
    out_len = int(counts.max()) if counts.numel() > 0 else 0
    kept = kept[:, :out_len]
    return torch.where(pos[:, :out_len] < counts[:, None], kept, torch.full_like(kept, pad_id))


def ctc_greedy_decode(logits, frame_mask, blank_id, pad_id):
    """Best-path decoding: per-frame argmax, then collapse.

    logits: (batch, frames, vocab) (argmax is invariant to log_softmax, so raw
    logits are fine); frame_mask: (batch, frames) bool.
    Returns (batch, out_len) long, right-padded with pad_id.
    """
    return collapse_repeats_and_blanks(logits.argmax(dim=-1), frame_mask, blank_id, pad_id)


def ctc_sample_decode(logits, frame_mask, blank_id, pad_id, generator=None):
    """Sampling: draw every valid frame's label from softmax(logits) independently, then collapse.

    CTC frames are conditionally independent given the source, so the drawn labelling is an exact sample of an
    alignment and its collapse an exact sample of the model's output distribution (no beam, no approximation).
    logits: (batch, frames, vocab), already warped (temperature, top-k... as -inf); frame_mask: (batch, frames) bool.
    The draws use torch's global RNG (`torch.manual_seed`) or `generator`. Returns (batch, out_len) long, right-padded.
    """
    valid = frame_mask.bool()
    frame_ids = torch.full(valid.shape, blank_id, dtype=torch.long, device=logits.device)
    if valid.any():
        probs = F.softmax(logits[valid].float(), dim=-1)  # (valid frames, vocab)
        frame_ids[valid] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return collapse_repeats_and_blanks(frame_ids, valid, blank_id, pad_id)


def _shift_right(x, k):
    """(batch, n) -> (batch, n): x[:, s - k], with -inf shifted in on the left."""
    return torch.cat([torch.full_like(x[:, :k], NEG_INF), x[:, : x.shape[1] - k]], dim=1)


def _extended_labels(targets, target_lengths, blank_id):
    """The CTC lattice's states: blank, y1, blank, y2, ..., yL, blank. targets (batch, tgt_len), padding ignored.

    Returns (ext (batch, 2 * tgt_len + 1) label of each state, state_ok (batch, states) within the row's target,
    can_skip (batch, states) whether a path may jump over the blank before the state).
    """
    batch, tgt_len = targets.shape
    n_states = 2 * tgt_len + 1
    ext = torch.full((batch, n_states), blank_id, dtype=torch.long, device=targets.device)
    ext[:, 1::2] = targets
    state_ok = torch.arange(n_states, device=targets.device) < (2 * target_lengths[:, None] + 1)
    # the +2 skip jumps over a blank; it is only allowed into a token that differs
    # from the previous token, otherwise the two would merge into one
    can_skip = torch.zeros_like(state_ok)
    can_skip[:, 3::2] = ext[:, 3::2] != ext[:, 1:-2:2]
    return ext, state_ok, can_skip


def _viterbi_forward(emit, frame_lengths, state_ok, can_skip):
    """Best score of each lattice state after each row's frames, and the move that reached it.

    emit (batch, frames, states) log probs. Returns (alpha (batch, states), backptr (batch, frames, states): how
    many states back the best predecessor is, 0, 1 or 2).
    """
    batch, frames, n_states = emit.shape
    # zero frames consumed: only the empty alignment (state 0, score 0) exists
    alpha = torch.full((batch, n_states), NEG_INF, device=emit.device)
    alpha[:, 0] = 0.0
    backptr = torch.zeros((batch, frames, n_states), dtype=torch.uint8, device=emit.device)
    if frames > 0:
        first = torch.full_like(alpha, NEG_INF)
        first[:, :2] = emit[:, 0, :2]  # a path starts in the leading blank or the first token
        alpha = torch.where(frame_lengths[:, None] > 0, first.masked_fill(~state_ok, NEG_INF), alpha)
    for t in range(1, frames):
        moves = torch.stack(
            [alpha, _shift_right(alpha, 1), _shift_right(alpha, 2).masked_fill(~can_skip, NEG_INF)], dim=-1
        )
        best, step = moves.max(dim=-1)  # step = how many states back the best predecessor is
        new = (best + emit[:, t]).masked_fill(~state_ok, NEG_INF)
        # frames past the row's length must not change its lattice
        alpha = torch.where((t < frame_lengths)[:, None], new, alpha)
        backptr[:, t] = step.to(torch.uint8)
    return alpha, backptr


def _viterbi_backtrace(alpha, backptr, ext, frame_lengths, target_lengths, blank_id):
    """Follow the back pointers from the best complete path's end: (batch, frames) label per frame."""
    batch, frames, _ = backptr.shape
    # a complete path ends in the final blank or the final token
    end_blank = 2 * target_lengths
    end_token = (end_blank - 1).clamp(min=0)
    score_blank = alpha.gather(1, end_blank[:, None]).squeeze(1)
    score_token = alpha.gather(1, end_token[:, None]).squeeze(1)
    state = torch.where(score_token > score_blank, end_token, end_blank)
    rows = torch.arange(batch, device=alpha.device)
    align = torch.full((batch, frames), blank_id, dtype=torch.long, device=alpha.device)
    for t in range(frames - 1, -1, -1):
        active = t < frame_lengths
        align[:, t] = torch.where(active, ext[rows, state], blank_id)
        state = torch.where(active, state - backptr[rows, t, state].long(), state).clamp(min=0)
    return align


@torch.no_grad()
def ctc_viterbi_align(log_probs, frame_lengths, targets, target_lengths, blank_id):
    """Most probable CTC alignment of each target onto its valid frames.

    log_probs: (batch, frames, vocab); frame_lengths: (batch,);
    targets: (batch, tgt_len) right-padded (padding values are ignored);
    target_lengths: (batch,).
    Returns (alignment, fits): alignment (batch, frames) long holds, per frame,
    a target token or blank_id (frames >= frame_lengths[b] are blank), such that
    collapsing it gives targets[b, :target_lengths[b]] with maximal summed log
    prob. fits (batch,) bool is False where the target cannot be aligned
    (too few frames); those rows are all blank. Computed in float32.
    """
    batch, frames, vocab = log_probs.shape
    device = log_probs.device
    tgt_len = targets.shape[1]
    # -inf inputs are clamped to a huge finite penalty: every structurally valid
    # path keeps a finite score, so -inf in the lattice only means "unreachable"
    lp = log_probs.float().clamp(min=-1e30)
    frame_lengths = frame_lengths.to(device).long().clamp(0, frames)
    target_lengths = target_lengths.to(device).long().clamp(0, tgt_len)
    tgt_pos = torch.arange(tgt_len, device=device)
    tgt = torch.where(tgt_pos < target_lengths[:, None], targets.to(device).long(), blank_id)
    ext, state_ok, can_skip = _extended_labels(tgt, target_lengths, blank_id)
    emit = lp.gather(2, ext[:, None, :].expand(batch, frames, ext.shape[1]))  # (batch, frames, states)
    alpha, backptr = _viterbi_forward(emit, frame_lengths, state_ok, can_skip)
    align = _viterbi_backtrace(alpha, backptr, ext, frame_lengths, target_lengths, blank_id)
    fits = frame_lengths >= ctc_min_frames(tgt, target_lengths)
    return torch.where(fits[:, None], align, blank_id), fits


# ----------------------------------------------------------------------------------------------------------------
# Prefix beam search. Three implementations of one search: the batched torch one (`ctc_prefix_beam_search`, any
# device), the plain-Python one over pruned frames (`ctc_prefix_beam_search_pruned`, for logits on an accelerator:
# one transfer, no per-frame kernels) and the slow oracle both are tested against (`ctc_prefix_beam_search_reference`,
# at the end). `ctc_beam_search` chooses between the first two.

BEAM_SEARCH_BACKENDS = ("auto", "batched", "pruned_cpu")


def ctc_frame_candidates(log_probs, blank_id, token_candidates=None):
    """Every frame's candidate tokens, all frames at once (one top-k, no host synchronisation).

    log_probs: (batch, frames, vocab). token_candidates: None = every non-blank token, in id order; N = the N best
    non-blank tokens of each frame, best first (N is clamped to 0..vocab-1). Returns (cand (batch, frames, n) long,
    lp_cand (batch, frames, n) their log probs, lp_blank (batch, frames) the blank's log prob). The blank is never a
    candidate, even when it ties with -inf tokens.
    """
    batch, frames, vocab = log_probs.shape
    lp_blank = log_probs[:, :, blank_id]
    if token_candidates is None:
        ids = torch.arange(vocab - 1, device=log_probs.device)
        nonblank = ids + (ids >= blank_id).long()  # every id but the blank's (no boolean indexing: no synchronisation)
        return nonblank.expand(batch, frames, vocab - 1), log_probs.index_select(2, nonblank), lp_blank
    n = max(0, min(token_candidates, vocab - 1))
    # the n + 1 best tokens hold the n best non-blank ones; a stable sort moves the blank (if there) to the end
    values, ids = log_probs.topk(n + 1, dim=2)
    keep = torch.argsort((ids == blank_id).to(torch.int8), dim=2, stable=True)[:, :, :n]
    return ids.gather(2, keep), values.gather(2, keep), lp_blank


class _Beams(NamedTuple):
    """The state of a batched prefix beam search; K beams per row, a prefix never longer than the frames.

    Beams are kept best first; a prefix appears at most once per row.
    """

    prefixes: torch.Tensor  # (batch, K, frames) long, -1 past the prefix's length
    lengths: torch.Tensor  # (batch, K)
    last: torch.Tensor  # (batch, K) last token, -1 for the empty prefix
    p_b: torch.Tensor  # (batch, K) log prob of the prefix with the last frame a blank
    p_nb: torch.Tensor  # (batch, K) ... with the last frame a token; a dead slot has both -inf


def _empty_beams(batch, beam_size, frames, dtype, device) -> _Beams:
    p_b = torch.full((batch, beam_size), NEG_INF, dtype=dtype, device=device)
    p_b[:, 0] = 0.0  # the empty prefix; the other slots are dead (-inf)
    return _Beams(prefixes=torch.full((batch, beam_size, frames), -1, dtype=torch.long, device=device),
                  lengths=torch.zeros((batch, beam_size), dtype=torch.long, device=device),
                  last=torch.full((batch, beam_size), -1, dtype=torch.long, device=device), p_b=p_b,
                  p_nb=torch.full_like(p_b, NEG_INF))


def _frame_candidates(beams: _Beams, lp_last, lp_blank, cand, lp_cand, pos, no_blank):
    """Scores of every way to extend the beams by one frame.

    lp_last (batch, K): this frame's log prob of each beam's last token (-inf for the empty prefix); lp_blank
    (batch,); cand (batch, n) the tokens that may extend a prefix, lp_cand (batch, n) theirs; pos (frames,) arange;
    no_blank (batch, K * n) all -inf (an extension ends in a token).
    Returns (p_b, p_nb, last), each (batch, K + K * n): first the K "stays" (prefix unchanged), then the extensions
    beam by beam (candidate i of beam j at K + j * n + i).
    """
    (batch, K), n_cand = beams.last.shape, cand.shape[1]
    p_b, p_nb, last = beams.p_b, beams.p_nb, beams.last
    p_tot = torch.logaddexp(p_b, p_nb)
    alive = p_tot > NEG_INF
    # "stay": the prefix is unchanged (emit blank, or repeat the last token)
    stay_b = p_tot + lp_blank[:, None]
    stay_nb = p_nb + lp_last
    # "extend" beam j by token c; a repeat of the last token needs a blank in between
    is_last = cand[:, None, :] == last[:, :, None]  # [b, j, c]
    ext_nb = torch.where(is_last, p_b[:, :, None], p_tot[:, :, None]) + lp_cand[:, None, :]  # (batch, K, n_cand)

    # extension of beam j by last_k equals beam k's prefix iff j is k's parent:
    # merge that probability into k's stay and drop the duplicate extension
    prefixes, lengths = beams.prefixes, beams.lengths
    same = (prefixes[:, :, None, :] == prefixes[:, None, :, :]) | (pos >= lengths[:, None, :, None])
    parent = same.all(dim=-1) & (lengths[:, :, None] == lengths[:, None, :] + 1) & alive[:, :, None] & alive[:, None, :]
    base_kj = torch.where(last[:, :, None] == last[:, None, :], p_b[:, None, :], p_tot[:, None, :])
    merged = (base_kj + lp_last[:, :, None]).masked_fill(~parent, NEG_INF)  # from lp, even if pruned
    # a prefix has at most one parent in the beam (prefixes are unique): the max is that one term, exactly
    stay_nb = torch.logaddexp(stay_nb, merged.amax(dim=2))
    dup = (parent[:, :, :, None] & is_last[:, :, None, :]).any(dim=1)  # [b, j, c]: j + c is already beam k
    ext_nb = ext_nb.masked_fill(dup, NEG_INF)

    all_b = torch.cat([stay_b, no_blank], dim=1)
    all_nb = torch.cat([stay_nb, ext_nb.flatten(1)], dim=1)
    all_last = torch.cat([last, cand[:, None, :].expand(batch, K, n_cand).flatten(1)], dim=1)
    return all_b, all_nb, all_last


def _keep_best(beams: _Beams, all_b, all_nb, all_last, pos) -> _Beams:
    """The K best candidates (stable: ties keep the lower index) as the next beams; one sort, no synchronisation."""
    (batch, K), frames = beams.last.shape, beams.prefixes.shape[2]
    n_cand = (all_b.shape[1] - K) // K
    top, idx = torch.sort(torch.logaddexp(all_b, all_nb), dim=1, descending=True, stable=True)
    top, idx = top[:, :K], idx[:, :K]
    is_ext = idx >= K
    src = torch.where(is_ext, (idx - K).div(max(n_cand, 1), rounding_mode="floor"), idx)  # the beam grown from
    new_last = all_last.gather(1, idx)
    dead = top == NEG_INF
    src_len = beams.lengths.gather(1, src)
    new_pref = beams.prefixes.gather(1, src[:, :, None].expand(batch, K, frames))
    append_here = is_ext[:, :, None] & (pos == src_len[:, :, None])
    new_pref = torch.where(append_here, new_last[:, :, None], new_pref)
    return _Beams(prefixes=new_pref.masked_fill(dead[:, :, None], -1),
                  lengths=(src_len + is_ext.long()).masked_fill(dead, 0), last=new_last.masked_fill(dead, -1),
                  p_b=all_b.gather(1, idx), p_nb=all_nb.gather(1, idx))


def _ranked_output(beams: _Beams, pad_id):
    """Final beams -> (prefixes (batch, K, out_len) best first, right-padded with pad_id; scores (batch, K)).
    The one host synchronisation of the search: out_len, the longest prefix."""
    batch, K, frames = beams.prefixes.shape
    scores, order = torch.sort(torch.logaddexp(beams.p_b, beams.p_nb), dim=1, descending=True, stable=True)
    lengths = beams.lengths.gather(1, order)
    out_len = int(lengths.max()) if lengths.numel() > 0 else 0
    out = beams.prefixes.gather(1, order[:, :, None].expand(batch, K, frames))[:, :, :out_len]
    pos = torch.arange(out_len, device=out.device)
    return torch.where(pos < lengths[:, :, None], out, torch.full_like(out, pad_id)), scores


@torch.no_grad()
def ctc_prefix_beam_search(log_probs, frame_lengths, blank_id, pad_id, beam_size, token_candidates=None):
    """Batched CTC prefix beam search, on the device of `log_probs`.

    log_probs: (batch, frames, vocab) log-softmaxed; frame_lengths: (batch,).
    token_candidates: if set, only the top-N non-blank tokens of each frame may
    extend a prefix (None = all; set it for speed with a large vocab).
    Returns (prefixes, scores): prefixes (batch, beam_size, out_len) long,
    best first, right-padded with pad_id;
    scores (batch, beam_size) = log(p_blank + p_nonblank) of each prefix.
    Slots without a prefix are all pad_id with score -inf.

    Every frame's candidates come from one top-k before the loop (`ctc_frame_candidates`); the loop has a fixed
    number of kernels per frame and never synchronises with the host (the one synchronisation is the output's
    length, at the end). A frame past a row's length is made a no-op by its log probs (blank 0, tokens -inf): it
    folds each beam's probability into p_blank, which leaves every total, and so the ranking, unchanged.
    """
    batch, frames, vocab = log_probs.shape
    device = log_probs.device
    lp = log_probs if log_probs.dtype == torch.float64 else log_probs.float()
    frame_lengths = frame_lengths.to(device).long().clamp(0, frames)
    cand_all, lp_cand_all, lp_blank_all = ctc_frame_candidates(lp, blank_id, token_candidates)
    active = torch.arange(frames, device=device) < frame_lengths[:, None]  # (batch, frames)
    lp_blank_all = lp_blank_all.masked_fill(~active, 0.0)
    lp_cand_all = lp_cand_all.masked_fill(~active[:, :, None], NEG_INF)
    pos = torch.arange(frames, device=device)
    no_blank = torch.full((batch, beam_size * cand_all.shape[2]), NEG_INF, dtype=lp.dtype, device=device)
    beams = _empty_beams(batch, beam_size, frames, lp.dtype, device)
    for t in range(frames):
        last_ok = (beams.last >= 0) & active[:, t, None]
        lp_last = torch.where(last_ok, lp[:, t].gather(1, beams.last.clamp(min=0)), NEG_INF)
        candidates = _frame_candidates(beams, lp_last, lp_blank_all[:, t], cand_all[:, t], lp_cand_all[:, t], pos,
                                       no_blank)
        beams = _keep_best(beams, *candidates, pos)
    return _ranked_output(beams, pad_id)


# ------------------------------------------------------------ the same search over pruned frames, in plain Python


@torch.no_grad()
def pruned_frames_to_cpu(log_probs, frame_lengths, blank_id, token_candidates):
    """What a search over pruned frames reads, computed where `log_probs` is and brought to the CPU in one copy each
    of the integers and the floats.

    log_probs: (batch, frames, vocab) log-softmaxed, any device; frame_lengths: (batch,). Returns, on the CPU,
    (cand (batch, frames, n) long best first, lp_cand (batch, frames, n + 1) float: the candidates' log probs then
    the blank's, columns (batch, frames * n) long, table (batch, frames, frames * n) float, frame_lengths (batch,)
    long). columns[b] holds every candidate of row b's frames, sorted (repeats kept: no shape that depends on the
    data); table[b, t, i] is frame t's log prob of token columns[b, i]. A beam's last token is always some frame's
    candidate, and the search reads its log prob at later frames, where it may be pruned. The table's width grows
    with frames: meant for sentences (a 100-frame row is 100 * 100 * n floats), not for hours of audio.
    """
    batch, frames, vocab = log_probs.shape
    lp = log_probs if log_probs.dtype == torch.float64 else log_probs.float()
    cand, lp_cand, lp_blank = ctc_frame_candidates(lp, blank_id, token_candidates)
    n = cand.shape[2]
    columns = cand.reshape(batch, frames * n).sort(dim=1).values  # in order: a gather that walks each frame once
    table = lp.gather(2, columns[:, None, :].expand(batch, frames, frames * n))
    floats = torch.cat([lp_cand, lp_blank[:, :, None], table], dim=2).cpu()
    ints = torch.cat([cand.flatten(), columns.flatten(), frame_lengths.to(lp.device).long().clamp(0, frames)]).cpu()
    cand_cpu, columns_cpu = ints[: cand.numel()].view(cand.shape), ints[cand.numel() : 2 * cand.numel()]
    return (cand_cpu, floats[:, :, : n + 1], columns_cpu.view(batch, frames * n), floats[:, :, n + 1 :],
            ints[2 * cand.numel() :])


def _pruned_search_one(cand, lp_cand, columns, table, n_frames, beam_size):
    """The prefix beam search of one sentence over its pruned frames, in plain Python floats (float64).

    cand: frames lists of n candidate ids, best first; lp_cand: frames lists of their n log probs then the blank's;
    columns: the token of each column of table (frames, columns), read as table[t, column] (`pruned_frames_to_cpu`);
    None when table is the sentence's whole (frames, vocab) log probs (on the CPU). Candidates are ranked in the
    batched search's order (stays in beam order, then beam j's extensions in candidate order, a stable sort), so
    ties resolve as there. Once beam j has beam_size extensions by tokens other than its last, every later one
    (the candidates are sorted, and total >= p_blank) scores no higher and comes later, so it is not scored.
    Returns up to beam_size (prefix tuple, log prob), best first.
    """
    n = len(cand[0]) if cand else 0
    column = None if columns is None else dict(zip(columns, range(len(columns))))  # token -> its column in table
    beams = [((), 0.0, NEG_INF)]  # (prefix, log p_blank, log p_nonblank), best first
    for t in range(n_frames):
        cand_t, lp_t = cand[t], lp_cand[t]
        lp_blank = lp_t[n]
        index = {prefix: j for j, (prefix, _, _) in enumerate(beams)}
        totals = [_logaddexp(pb, pnb) for _, pb, pnb in beams]
        stay_b = [total + lp_blank for total in totals]
        stay_nb, children = [], set()  # children: (parent beam, token) pairs that are already beams
        for prefix, pb, pnb in beams:
            if not prefix:
                stay_nb.append(NEG_INF)
                continue
            lp_last = float(table[t, prefix[-1] if column is None else column[prefix[-1]]])
            p = pnb + lp_last
            j = index.get(prefix[:-1])
            if j is not None:  # merge the parent's extension by this token, pruned or not
                parent, ppb, _ = beams[j]
                base = ppb if parent and parent[-1] == prefix[-1] else totals[j]
                p = _logaddexp(p, base + lp_last)
                children.add((j, prefix[-1]))
            stay_nb.append(p)
        scores = [_logaddexp(b, nb) for b, nb in zip(stay_b, stay_nb)]
        moves = list(range(len(beams)))  # a stay is its beam's index; an extension is (beam, token)
        for j, (prefix, pb, _) in enumerate(beams):
            last, total, regular = (prefix[-1] if prefix else -1), totals[j], 0
            for c, lp_c in zip(cand_t, lp_t):
                if (j, c) in children:
                    continue
                if c == last:  # a repeat needs a blank in between
                    scores.append(pb + lp_c)
                else:
                    if regular == beam_size:  # every later extension of beam j ranks below these beam_size
                        break
                    regular += 1
                    scores.append(total + lp_c)
                moves.append((j, c))
        best = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[:beam_size]  # stable
        beams = [(beams[m][0], stay_b[m], stay_nb[m]) if isinstance(m, int)
                 else (beams[m[0]][0] + (m[1],), NEG_INF, scores[i])
                 for i, m in ((i, moves[i]) for i in best) if scores[i] > NEG_INF]
    return [(prefix, _logaddexp(pb, pnb)) for prefix, pb, pnb in beams]


@torch.no_grad()
def ctc_prefix_beam_search_pruned(log_probs, frame_lengths, blank_id, pad_id, beam_size, token_candidates,
                                  copy_table=None):
    """`ctc_prefix_beam_search` with the search itself on the CPU, in plain Python over the pruned frames.

    Each frame's top-`token_candidates` are picked where `log_probs` is (one top-k for all frames,
    `ctc_frame_candidates`, the same as the batched search's); on an accelerator, one copy of the integers and one
    of the floats then bring the small pruned tensors to the CPU (`pruned_frames_to_cpu`): no kernel and no
    synchronisation per frame, which is what costs there at small batches. copy_table: whether to go through that
    copy (None: when log_probs are not on the CPU; on the CPU the search reads log_probs themselves). Same arguments
    and outputs as `ctc_prefix_beam_search` (outputs on log_probs' device).

    Against the batched search: the same candidates, the same merges and the same tie order, computed in float64
    instead of float32, so the scores agree to float32 rounding and the hypotheses are the same unless two
    prefixes' scores are that close. token_candidates must be set (all tokens would defeat the pruning).
    """
    if token_candidates is None:
        raise ValueError("the pruned-frames beam search needs token_candidates (a number of tokens per frame)")
    device, batch = log_probs.device, log_probs.shape[0]
    if not (device.type != "cpu" if copy_table is None else copy_table):  # the search reads log_probs themselves
        lp = log_probs if log_probs.dtype == torch.float64 else log_probs.float()
        cand, lp_cand, lp_blank = ctc_frame_candidates(lp, blank_id, token_candidates)
        lp_cand, columns = torch.cat([lp_cand, lp_blank[:, :, None]], dim=2), [None] * batch
        table, lengths = lp.detach().cpu().numpy(), frame_lengths.long().cpu().clamp(0, lp.shape[1])
    else:
        cand, lp_cand, columns, table, lengths = pruned_frames_to_cpu(log_probs, frame_lengths, blank_id,
                                                                      token_candidates)
        columns, table = columns.tolist(), table.numpy()
    rows = zip(cand.tolist(), lp_cand.double().tolist(), columns, table, lengths.tolist())
    found = [_pruned_search_one(*row, beam_size) for row in rows]  # float(table[...]) is exact: float32 -> float64
    out_len = max((len(p) for row in found for p, _ in row), default=0)
    rows = [[list(p) + [pad_id] * (out_len - len(p)) for p, _ in row] for row in found]
    rows = [row + [[pad_id] * out_len] * (beam_size - len(row)) for row in rows]
    scores = [[s for _, s in row] + [NEG_INF] * (beam_size - len(row)) for row in found]
    dtype = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    return (torch.tensor(rows, dtype=torch.long).view(batch, beam_size, out_len).to(device),
            torch.tensor(scores, dtype=dtype).view(batch, beam_size).to(device))


# On an accelerator, "auto" runs the plain-Python search over pruned frames up to this many sentences a batch and the
# batched search above. Timings on 2 busy CPU cores (training/evidence/benchmark_beam_search.py, beam 5, 10
# candidates): the Python search costs 1-2 ms a sentence at any batch size and reads only each row's own frames; the
# batched loop costs per padded frame and per batch (on the CPU 19-34 ms for 1 sentence, 2-5 ms a sentence at 64; on
# the shipped model's test2016 batches of 64 still 5.4 ms against 3.1 for the whole pruned search). On a GPU the
# batched loop is launch-bound (~50 small kernels a frame), about as long for 1 sentence as for 64, so the Python
# search wins at small batches only: 16 is an estimate from these CPU numbers, not a GPU measurement.
PRUNED_CPU_MAX_BATCH = 16


def choose_beam_search_backend(device, batch_size, backend="auto"):
    """Which implementation `ctc_beam_search` runs: "batched" (`ctc_prefix_beam_search`, on the logits' device) or
    "pruned_cpu" (`ctc_prefix_beam_search_pruned`). "auto": logits on the CPU, always the pruned search (measured
    faster or within 15% at every batch size up to 64); on an accelerator, the pruned search for batches of at most
    PRUNED_CPU_MAX_BATCH sentences (an estimate, see there), the batched search above. Raises ValueError for a name
    not in BEAM_SEARCH_BACKENDS."""
    if backend not in BEAM_SEARCH_BACKENDS:
        raise ValueError(f"beam_search_backend must be one of {BEAM_SEARCH_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    on_cpu = torch.device(device).type == "cpu"
    return "pruned_cpu" if on_cpu or batch_size <= PRUNED_CPU_MAX_BATCH else "batched"


def ctc_beam_search(log_probs, frame_lengths, blank_id, pad_id, beam_size, token_candidates, backend="auto"):
    """CTC prefix beam search by the backend `choose_beam_search_backend` picks; arguments and outputs as
    `ctc_prefix_beam_search`. token_candidates None (all tokens) always runs the batched search."""
    chosen = choose_beam_search_backend(log_probs.device, log_probs.shape[0], backend)
    if chosen == "pruned_cpu" and token_candidates is not None:
        return ctc_prefix_beam_search_pruned(log_probs, frame_lengths, blank_id, pad_id, beam_size, token_candidates)
    return ctc_prefix_beam_search(log_probs, frame_lengths, blank_id, pad_id, beam_size, token_candidates)


def _logaddexp(a, b):
    """log(exp(a) + exp(b)) for Python floats, exact when either is -inf."""
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def ctc_prefix_beam_search_reference(log_probs, blank_id, beam_size, token_candidates=None):
    """Slow, plain-Python prefix beam search for ONE sentence (dict of prefixes).

    log_probs: (frames, vocab). Returns up to beam_size (prefix, logprob)
    pairs, best first. Meant for testing ctc_prefix_beam_search. All tokens
    are tried unless token_candidates is set, which mirrors the batched
    pruning: other tokens may only extend a prefix into one already in the beam.
    """
    beams = {(): (0.0, NEG_INF)}  # prefix -> (log p_blank, log p_nonblank)
    for row in log_probs.double().tolist():
        nxt = defaultdict(lambda: [NEG_INF, NEG_INF])
        allowed = sorted((c for c in range(len(row)) if c != blank_id), key=lambda c: -row[c])
        allowed = set(allowed if token_candidates is None else allowed[:token_candidates])
        for prefix, (pb, pnb) in beams.items():
            total = _logaddexp(pb, pnb)
            nxt[prefix][0] = _logaddexp(nxt[prefix][0], total + row[blank_id])
            if prefix:
                nxt[prefix][1] = _logaddexp(nxt[prefix][1], pnb + row[prefix[-1]])
            for c, lp_c in enumerate(row):
                if c == blank_id or (c not in allowed and prefix + (c,) not in beams):
                    continue
                base = pb if prefix and c == prefix[-1] else total
                nxt[prefix + (c,)][1] = _logaddexp(nxt[prefix + (c,)][1], base + lp_c)
        ranked = sorted(nxt.items(), key=lambda kv: (-_logaddexp(*kv[1]), kv[0]))
        beams = {p: tuple(s) for p, s in ranked[:beam_size] if _logaddexp(*s) > NEG_INF}
    ranked = sorted(beams.items(), key=lambda kv: (-_logaddexp(*kv[1]), kv[0]))
    return [(list(p), _logaddexp(*s)) for p, s in ranked[:beam_size]]
