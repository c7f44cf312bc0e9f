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


def _topk_stable(scores, k):
    """Top-k of (batch, n) scores, best first, ties broken by lower index.

    torch.topk does not define its tie order; this only does O(n) work on
    top of it. Returns (values, indices), each (batch, k).
    """
    kth = scores.topk(k, dim=1).values[:, -1:]
    greater = scores > kth
    equal = scores == kth
    # take the lowest-index ties until each row has exactly k
    need = k - greater.sum(dim=1, keepdim=True)
    chosen = greater | (equal & (equal.cumsum(dim=1) <= need))
    idx = chosen.nonzero()[:, 1].view(scores.shape[0], k)  # row-major: ascending index
    vals = scores.gather(1, idx)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), idx.gather(1, order)


class _Beams(NamedTuple):
    """The state of a batched prefix beam search; K beams per row, a prefix never longer than the frames."""

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


def _frame_candidates(beams: _Beams, lp_t, cand, blank_id):
    """Scores of every way to extend the beams by one frame with log probs lp_t (batch, vocab).

    cand (batch, n_cand): the tokens that may extend a prefix. Returns (p_b, p_nb, last, src), each
    (batch, K + K * n_cand): first the K "stays" (prefix unchanged), then the extensions beam by beam; src is
    the beam each candidate grows from.
    """
    (batch, K), n_cand = beams.last.shape, cand.shape[1]
    pos = torch.arange(beams.prefixes.shape[2], device=lp_t.device)
    p_b, p_nb, last = beams.p_b, beams.p_nb, beams.last
    p_tot = torch.logaddexp(p_b, p_nb)
    alive = torch.isfinite(p_tot)
    lp_last = lp_t.gather(1, last.clamp(min=0)).masked_fill(last < 0, NEG_INF)  # (batch, K)
    # "stay": the prefix is unchanged (emit blank, or repeat the last token)
    stay_b = p_tot + lp_t[:, blank_id, None]
    stay_nb = p_nb + lp_last
    # "extend" beam j by token c; a repeat of the last token needs a blank in between
    ext_base = torch.where(cand[:, None, :] == last[:, :, None], p_b[:, :, None], p_tot[:, :, None])
    # (topk may return the blank as a tie when tokens have -inf log prob)
    lp_cand = lp_t.gather(1, cand).masked_fill(cand == blank_id, NEG_INF)
    ext_nb = ext_base + lp_cand[:, None, :]  # (batch, K, n_cand)

    # extension of beam j by last_k equals beam k's prefix iff j is k's parent:
    # merge that probability into k's stay and drop the duplicate extension
    prefixes, lengths = beams.prefixes, beams.lengths
    same = (prefixes[:, :, None, :] == prefixes[:, None, :, :]) | (pos >= lengths[:, None, :, None])
    parent = (  # [b, k, j]
        same.all(dim=-1)
        & (lengths[:, :, None] == lengths[:, None, :] + 1)
        & alive[:, :, None]
        & alive[:, None, :]
    )
    base_kj = torch.where(last[:, :, None] == last[:, None, :], p_b[:, None, :], p_tot[:, None, :])
    merged = (base_kj + lp_last[:, :, None]).masked_fill(~parent, NEG_INF)  # from lp, even if pruned
    stay_nb = torch.logaddexp(stay_nb, merged.logsumexp(dim=2))
    is_last_k = (cand[:, None, :] == last[:, :, None]).to(lp_t.dtype)  # [b, k, c]
    dup = torch.bmm(parent.transpose(1, 2).to(lp_t.dtype), is_last_k) > 0  # [b, j, c]
    ext_nb = ext_nb.masked_fill(dup, NEG_INF)

    all_b = torch.cat([stay_b, torch.full_like(ext_nb.flatten(1), NEG_INF)], dim=1)
    all_nb = torch.cat([stay_nb, ext_nb.flatten(1)], dim=1)
    all_last = torch.cat([last, cand[:, None, :].expand(batch, K, n_cand).flatten(1)], dim=1)
    beam_ids = torch.arange(K, device=lp_t.device)
    all_src = torch.cat([beam_ids, beam_ids.repeat_interleave(n_cand)]).expand(batch, -1)
    return all_b, all_nb, all_last, all_src


def _keep_best(beams: _Beams, all_b, all_nb, all_last, all_src) -> _Beams:
    """The K best candidates (stable: ties keep the lower index) as the next beams."""
    (batch, K), frames = beams.last.shape, beams.prefixes.shape[2]
    pos = torch.arange(frames, device=all_b.device)
    top, idx = _topk_stable(torch.logaddexp(all_b, all_nb), K)
    is_ext = idx >= K
    src = all_src.gather(1, idx)
    new_last = all_last.gather(1, idx)
    dead = ~torch.isfinite(top)
    src_len = beams.lengths.gather(1, src)
    new_pref = beams.prefixes.gather(1, src[:, :, None].expand(batch, K, frames))
    append_here = is_ext[:, :, None] & (pos == src_len[:, :, None])
    new_pref = torch.where(append_here, new_last[:, :, None], new_pref)
    return _Beams(prefixes=new_pref.masked_fill(dead[:, :, None], -1),
                  lengths=(src_len + is_ext.long()).masked_fill(dead, 0), last=new_last.masked_fill(dead, -1),
                  p_b=all_b.gather(1, idx), p_nb=all_nb.gather(1, idx))


@torch.no_grad()
def ctc_prefix_beam_search(log_probs, frame_lengths, blank_id, pad_id, beam_size, token_candidates=None):
    """Batched CTC prefix beam search.

    log_probs: (batch, frames, vocab) log-softmaxed; frame_lengths: (batch,).
    token_candidates: if set, only the top-N non-blank tokens of each frame may
    extend a prefix (None = all; set it for speed with a large vocab).
    Returns (prefixes, scores): prefixes (batch, beam_size, out_len) long,
    best first, right-padded with pad_id;
    scores (batch, beam_size) = log(p_blank + p_nonblank) of each prefix.
    Slots without a prefix are all pad_id with score -inf.
    """
    batch, frames, vocab = log_probs.shape
    device = log_probs.device
    lp = log_probs if log_probs.dtype == torch.float64 else log_probs.float()
    K = beam_size
    frame_lengths = frame_lengths.to(device).long().clamp(0, frames)
    nonblank = torch.cat([torch.arange(blank_id), torch.arange(blank_id + 1, vocab)]).to(device)
    n_cand = vocab - 1 if token_candidates is None else max(0, min(token_candidates, vocab - 1))
    beams = _empty_beams(batch, K, frames, lp.dtype, device)
    for t in range(frames):
        lp_t = lp[:, t]  # (batch, vocab)
        if token_candidates is None:
            cand = nonblank.expand(batch, n_cand)
        else:
            cand = lp_t.index_fill(1, torch.tensor([blank_id], device=device), NEG_INF).topk(n_cand, dim=1).indices
        new = _keep_best(beams, *_frame_candidates(beams, lp_t, cand, blank_id))
        active = t < frame_lengths  # frames past the row's length must not change its beams
        beams = _Beams(*(torch.where(active.view(-1, *[1] * (n.dim() - 1)), n, old) for n, old in zip(new, beams)))

    scores, order = torch.sort(torch.logaddexp(beams.p_b, beams.p_nb), dim=1, descending=True, stable=True)
    lengths = beams.lengths.gather(1, order)
    out_len = int(lengths.max()) if lengths.numel() > 0 else 0
    out = beams.prefixes.gather(1, order[:, :, None].expand(batch, K, frames))[:, :, :out_len]
    out = torch.where(torch.arange(out_len, device=device) < lengths[:, :, None], out, torch.full_like(out, pad_id))
    return out, scores


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
