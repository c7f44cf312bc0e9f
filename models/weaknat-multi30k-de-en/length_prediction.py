# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""The vanilla NAR translator's own pieces (`nar_type="vanilla"`): Gu et al. (2018), as fairseq's
`nonautoregressive_transformer` implements it, written for this model.

Reading order: the length predictor (a classifier over `tgt_len - src_len` from the mean-pooled encoder states) and
its loss; the decoder inputs at the target length (uniform copy of the source embeddings, or placeholders); the
token loss; decoding (the candidate lengths: argmax, or for the length beam the top-k or a window around the argmax,
then one argmax per position, ranked by average or joint log-probability). The model (`modeling_weaknat.py`) runs the network; the weak AR decoders read
the NAR layers' target-length states through the same `weak_ar.py` as for CTC. Nothing here knows about CTC.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import Seq2SeqModelOutput

from .generation import finish_generation, has_content, process_scores, warp_for_sampling
from .layers import float32_linear
from .weak_ar import Memory

# ----------------------------------------------------------------------------------------------------------------
# Length prediction


class WeakNATLengthPredictor(nn.Module):
    """Mean-pooled final encoder states (padding excluded) -> logits over the length offsets
    `-max_length_offset..+max_length_offset` (fairseq `forward_length` with `--pred-length-offset`)."""

    def __init__(self, config):
        super().__init__()
        self.max_offset = config.max_length_offset
        self.proj = nn.Linear(config.d_model, config.num_length_classes, bias=False)

    def forward(self, encoder_states, source_mask):
        """encoder_states (batch, src_len, d); source_mask (batch, src_len) -> (batch, classes) float32 logits.

        Pooled and projected in float32 whatever the model's dtype (and outside autocast): one length decides a whole
        output, and a mean over a half-precision sum, or a half-precision logit, can flip a near-tie of lengths."""
        mask = source_mask.float()[..., None]
        pooled = (encoder_states.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
        return float32_linear(pooled, self.proj.weight)


def length_classes(source_lengths, target_lengths, max_offset: int):
    """The length predictor's training target: the offset `tgt_len - src_len` as a class, clamped into range as
    fairseq does (`training/` leaves pairs out of range out of the data and counts them)."""
    return (target_lengths - source_lengths + max_offset).clamp(0, 2 * max_offset)


def length_loss(length_logits, source_lengths, target_lengths, max_offset: int):
    """Cross-entropy of the length classifier on the reference lengths, averaged over sentences (fairseq: no label
    smoothing on the length)."""
    return F.cross_entropy(length_logits.float(), length_classes(source_lengths, target_lengths, max_offset))


def top_lengths(length_logits, source_lengths, max_length: int, k: int):
    """The k most probable target lengths of each sentence among those in [1, max_length], best first.

    Classes whose length falls outside the range are masked, so the k lengths are distinct (fairseq clamps the argmax
    instead, to >= 2); where fewer than k are valid the rest repeat the best one with score -inf.
    Returns (lengths (batch, k) long, their log-probabilities (batch, k)).
    """
    classes_count = length_logits.shape[-1]
    if k > classes_count:
        raise ValueError(f"num_beams={k} asks for more lengths than the length predictor has classes ({classes_count}"
                         " = 2 * max_length_offset + 1)")
    max_offset = (classes_count - 1) // 2
    log_probs = F.log_softmax(length_logits.float(), -1)
    lengths = source_lengths[:, None] + torch.arange(classes_count, device=length_logits.device) - max_offset
    log_probs = log_probs.masked_fill((lengths < 1) | (lengths > max_length), float("-inf"))
    scores, classes = log_probs.topk(k, -1)
    chosen = lengths.gather(1, classes)
    chosen = torch.where(torch.isfinite(scores), chosen, chosen[:, :1])
    return chosen, scores


LENGTH_BEAMS = ("top_k", "window")


def length_beam_lengths(length_logits, source_lengths, max_length: int, k: int, how: str = "top_k"):
    """The k lengths a length beam decodes, with their log-probabilities: ((batch, k) long, (batch, k)).

    `"top_k"`: the k most probable lengths (`top_lengths`), which may all sit on one side of the most probable one.
    `"window"`: fairseq's `regenerate_length_beam`, the most probable length + (-k//2 .. (k-1)//2), clamped to
    [1, max_length] (near 1 the clamped lengths repeat, as in fairseq)."""
    if how not in LENGTH_BEAMS:
        raise ValueError(f"length_beam must be one of {LENGTH_BEAMS}, got {how!r}")
    if how == "top_k":
        return top_lengths(length_logits, source_lengths, max_length, k)
    best, _ = top_lengths(length_logits, source_lengths, max_length, 1)
    lengths = (best + torch.arange(k, device=best.device) - k // 2).clamp(1, max_length)
    max_offset = (length_logits.shape[-1] - 1) // 2
    classes = (lengths - source_lengths[:, None] + max_offset).clamp(0, 2 * max_offset)
    return lengths, F.log_softmax(length_logits.float(), -1).gather(1, classes)


# ----------------------------------------------------------------------------------------------------------------
# Decoder inputs at the target length


def uniform_copy_indices(source_lengths, target_lengths, width: int):
    """Source position copied to each target position: `round(j * (src_len - 1) / (tgt_len - 1))` (Gu et al. 2018;
    fairseq `_uniform_assignment`, with a one-token target copying position 0 instead of dividing by zero).
    -> (batch, width) long; positions past a row's target length get 0."""
    steps = (source_lengths.float() - 1) / (target_lengths.float() - 1).clamp(min=1)
    positions = torch.arange(width, device=source_lengths.device)
    index = torch.round(steps[:, None] * positions[None].float()).long()
    return index.masked_fill(positions[None] >= target_lengths[:, None], 0)


def vanilla_decoder_inputs(model, encoder_states, source_mask, input_ids=None, inputs_embeds=None,
                           target_lengths=None):
    """`WeakNATModel.decoder_inputs` for a vanilla model: the length logits, and the decoder inputs and their mask at
    `target_lengths` (the reference's in training), else at each sentence's most probable length.
    -> (inputs (batch, tgt_len, d), target mask (batch, tgt_len), length logits (batch, classes))."""
    length_logits = model.length_predictor(encoder_states, source_mask)
    if target_lengths is None:
        target_lengths = top_lengths(length_logits, source_mask.sum(1), model.config.max_frames, 1)[0][:, 0]
    return (*model_target_inputs(model, source_mask, target_lengths, input_ids, inputs_embeds, encoder_states),
            length_logits)


def model_target_inputs(model, source_mask, target_lengths, input_ids=None, inputs_embeds=None, like=None):
    """`target_inputs` with the model's source embeddings (uniform copy: `model.shared(input_ids)` or the given
    `inputs_embeds`; placeholders: zeros shaped `like`)."""
    if model.config.decoder_input == "uniform_copy":
        if input_ids is None and inputs_embeds is None:
            raise ValueError("decoder_input='uniform_copy' copies the source embeddings: pass input_ids or "
                             "inputs_embeds along with encoder_outputs")
        like = model.shared(input_ids) if inputs_embeds is None else inputs_embeds
    return target_inputs(like, source_mask, target_lengths, model.config.decoder_input)


def target_inputs(source_embeds, source_mask, target_lengths, decoder_input: str):
    """The decoder's inputs at the target length: (inputs (batch, tgt_len, d), target mask (batch, tgt_len)).

    source_embeds (batch, src_len, d): the scaled token embeddings of the source (no positions), source_mask its
    right-padded mask. `"uniform_copy"`: each target position gets a source embedding (`uniform_copy_indices`);
    `"placeholder"`: zeros (the decoder adds its position embeddings to either).
    """
    width = int(target_lengths.max()) if target_lengths.numel() else 0
    target_mask = torch.arange(width, device=target_lengths.device)[None] < target_lengths[:, None]
    if decoder_input == "placeholder":
        return source_embeds.new_zeros(len(target_lengths), width, source_embeds.shape[-1]), target_mask
    index = uniform_copy_indices(source_mask.sum(1), target_lengths, width)
    copied = source_embeds.gather(1, index[..., None].expand(-1, -1, source_embeds.shape[-1]))
    return copied * target_mask[..., None].to(copied.dtype), target_mask


# ----------------------------------------------------------------------------------------------------------------
# Token loss and decoding


def token_loss(logits, labels, label_smoothing: float):
    """Label-smoothed cross-entropy at every target position, averaged over the batch's target tokens (fairseq's
    NAT `word_ins` loss). logits (batch, tgt_len, vocab); labels (batch, tgt_len) right-padded with -100."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


def drop_adjacent_repeats(tokens, pad_token_id: int):
    """(rows, len) right-padded with pad -> the same rows with each run of identical tokens kept once."""
    keep = tokens != pad_token_id
    keep[:, 1:] &= tokens[:, 1:] != tokens[:, :-1]
    return compact(tokens, keep, pad_token_id)


def compact(tokens, keep, pad_token_id: int):
    """Keep the `keep` entries of each row, in order, right-padded with pad."""
    width = int(keep.sum(1).max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    kept = tokens.gather(1, order)
    return kept.masked_fill(~keep.gather(1, order), pad_token_id)


def argmax_decode(log_probs_or_logits, target_mask, pad_token_id: int):
    """Each valid position's best token -> (rows, len) right-padded with pad."""
    return log_probs_or_logits.argmax(-1).masked_fill(~target_mask, pad_token_id)


SCORE_RANKINGS = ("average", "joint", "average_plus_length")  # from the NAR's own token and length scores
LENGTH_BEAM_RANKINGS = (*SCORE_RANKINGS, "partner")
# "joint", not fairseq's "average": averaging favours short candidates; on the four converged vanilla runs of the study
# (two seeds per arm, docs/study.md) joint ranks 0.19-0.84 BLEU above average in all eight measurements.
DEFAULT_LENGTH_BEAM_RANKING = "joint"


def check_length_beam_ranking(ranking: str, model) -> str:
    """`ranking`, if it is one of LENGTH_BEAM_RANKINGS that `model` can use ("partner" needs its weak AR decoders)."""
    if ranking not in LENGTH_BEAM_RANKINGS:
        raise ValueError(f"length_beam_ranking must be one of {LENGTH_BEAM_RANKINGS}, got {ranking!r}")
    if ranking == "partner" and getattr(model, "weak_ar", None) is None:
        raise ValueError("length_beam_ranking='partner' ranks candidates with the model's weak AR partner, and this "
                         "model has none: an export drops them unless made with keep_ranking_partner=True. Load such "
                         "an export, a training checkpoint or a study's average (`<run>/checkpoints/step-N/model`, "
                         "`<run>/average-*`) of a run trained with partners")
    return ranking


def length_beam_scores(token_log_probs, token_counts, length_scores, ranking: str = DEFAULT_LENGTH_BEAM_RANKING):
    """A length-beam candidate's score under `ranking` (`rank_length_beam`; any but "partner", which needs the
    partner), from its summed token log-probabilities, its token count and its length's log-probability, each
    (rows,)."""
    if ranking not in SCORE_RANKINGS:
        raise ValueError(f"length_beam_scores ranks by one of {SCORE_RANKINGS}, got {ranking!r}")
    average = token_log_probs / token_counts.clamp(min=1)  # an empty row: 0, the log-probability of nothing
    if ranking == "joint":
        return token_log_probs + length_scores
    return average + length_scores if ranking == "average_plus_length" else average


def rank_length_beam(tokens, log_probs, target_mask, batch: int, k: int, valid_rows=None,
                     ranking: str = DEFAULT_LENGTH_BEAM_RANKING, length_scores=None, partner_scores=None):
    """The length beam's ranking, best first per sentence, by `ranking`:

    - `"average"`: each candidate's average token log-probability (fairseq's `--iter-decode-with-beam`);
    - `"joint"` (the default): its log-probability as a whole, the sum of its tokens' plus its length's
      (`length_scores`);
    - `"average_plus_length"`: the average token log-probability plus the length's log-probability;
    - `"partner"`: `partner_scores(tokens, target_mask) -> (batch * k,)`, the weak AR partner's average
      log-probability of each candidate (`WeakARDecoders.sequence_log_probs`).

    tokens (batch * k, len); log_probs (batch * k, len, vocab); target_mask (batch * k, len); valid_rows (batch * k)
    bool or None: rows that score -inf when false; length_scores (batch * k) the lengths' log-probabilities.
    Returns (hypotheses (batch, k, len), scores (batch, k))."""
    if ranking == "partner":
        scores = partner_scores(tokens, target_mask)
    else:
        picked = log_probs.gather(-1, tokens[..., None]).squeeze(-1).masked_fill(~target_mask, 0.0)
        scores = length_beam_scores(picked.sum(1), target_mask.sum(1), length_scores, ranking)
    if valid_rows is not None:
        scores = scores.masked_fill(~valid_rows, float("-inf"))
    scores = scores.view(batch, k)
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    tokens = tokens.view(batch, k, -1)
    return tokens.gather(1, order[..., None].expand_as(tokens)), scores


def vanilla_loss_terms(logits, labels, length_logits, source_mask, target_mask, config) -> dict:
    """The vanilla NAR's named terms: `token_loss`, `length_loss`, `num_unfit_pairs` (0: every pair is in the loss,
    an offset outside the classifier's range is clamped) and `loss` = token_loss + `length_loss_factor` * length_loss
    (the NAR loss the paper's lambda weighs against the weak AR loss)."""
    source_lengths, target_lengths = source_mask.sum(1), target_mask.sum(1)
    terms = {"token_loss": token_loss(logits, labels, config.label_smoothing),
             "length_loss": length_loss(length_logits, source_lengths, target_lengths, config.max_length_offset),
             "num_unfit_pairs": torch.zeros((), dtype=torch.long, device=logits.device)}
    terms["loss"] = terms["token_loss"] + config.length_loss_factor * terms["length_loss"]
    return terms


def vanilla_generate(model, request, encoder_outputs, source_mask, drop_repeats=None, target_lengths=None):
    """`WeakNATForConditionalGeneration.generate` for a vanilla model, after encoding: the decoder once at each
    sentence's most probable length, or at the `num_beams` lengths of its length beam (`length_beam_lengths`, rows
    sentence-major), or at given `target_lengths` (batch,), then `vanilla_decode`, and transformers' output
    (`generation.finish_generation`)."""
    encoder_states, k = encoder_outputs.last_hidden_state, request.num_beams
    ranking = check_length_beam_ranking(getattr(request.config, "length_beam_ranking", None)
                                        or DEFAULT_LENGTH_BEAM_RANKING, model)
    by_partner = ranking == "partner" and request.mode == "beam"
    length_logits = model.model.length_predictor(encoder_states, source_mask)
    if target_lengths is not None:  # given lengths (e.g. the references': oracle length), one per sentence
        lengths, length_scores = checked_target_lengths(target_lengths, request, model.config.max_frames), None
    else:
        lengths, length_scores = length_beam_lengths(length_logits, source_mask.sum(1), model.config.max_frames, k,
                                                     getattr(request.config, "length_beam", None) or "top_k")
    rows = lambda x: None if x is None else x.repeat_interleave(k, 0)  # noqa: E731 - each sentence k times
    inputs, mask = model_target_inputs(model.model, rows(source_mask), lengths.flatten(), rows(request.input_ids),
                                       rows(request.inputs_embeds), rows(encoder_states))
    decoded = model.model.decoder(inputs, mask, rows(encoder_states), rows(source_mask), request.output_attentions,
                                  request.output_hidden_states, return_layer_states=by_partner)
    logits = model.decoding_logits(decoded.last_hidden_state)  # (batch * k, len, vocab) float32
    if drop_repeats is None:
        drop_repeats = getattr(request.config, "drop_repeats", None)
    drop = model.config.drop_repeats if drop_repeats is None else drop_repeats
    content = rows(has_content(request.input_ids, source_mask, model.config))  # `</s>` alone translates to nothing
    valid = None if length_scores is None else torch.isfinite(length_scores).flatten()
    partner_scores = None
    if by_partner:  # the last NAR layer's partner reads that layer's states at each candidate's own length
        last = Memory(model.config.decoder_layers - 1, decoded.layer_states[-1], mask)
        partner_scores = lambda tokens, target_mask: model.weak_ar.sequence_log_probs(  # noqa: E731
            tokens, target_mask, last, model.model.shared)
    hypotheses, scores, position_scores = vanilla_decode(
        request, logits, mask & content[:, None], drop, valid,
        None if length_scores is None else length_scores.flatten(), ranking, partner_scores)
    outputs = Seq2SeqModelOutput(decoder_hidden_states=decoded.hidden_states, decoder_attentions=decoded.attentions,
                                 cross_attentions=decoded.cross_attentions)
    return finish_generation(request, hypotheses, scores, scores=position_scores, logits=logits,
                             encoder_outputs=encoder_outputs, decoder_outputs=outputs)


def checked_target_lengths(target_lengths, request, max_length: int):
    """`target_lengths` given to generate: one length in [1, max_length] per sentence, each decoded once (beam)."""
    lengths = torch.as_tensor(target_lengths, device=(request.input_ids if request.input_ids is not None
                                                      else request.inputs_embeds).device).long().flatten()
    if lengths.numel() != request.batch_size or ((lengths < 1) | (lengths > max_length)).any():
        raise ValueError(f"target_lengths must hold one length in [1, {max_length}] per sentence ({request.batch_size}),"
                         f" got {lengths.tolist()}")
    if request.num_beams > 1:
        raise ValueError("target_lengths fixes each sentence's length: there is no length beam to search (num_beams=1)")
    return lengths[:, None]


def vanilla_decode(request, logits, target_mask, drop_repeats: bool = False, valid_rows=None, length_scores=None,
                   ranking: str = DEFAULT_LENGTH_BEAM_RANKING, partner_scores=None):
    """Tokens from the per-position logits (batch * k, len, vocab) as `request` asks: greedy (argmax), sampling (each
    position drawn from its warped distribution, `num_return_sequences` draws) or the length beam (argmax at each of
    the k lengths, ranked by `rank_length_beam`'s `ranking` with the lengths' `length_scores` (batch * k); rows not in
    `valid_rows` (lengths out of range) last, at -inf). An empty hypothesis (a source without content) scores 0. Returns (hypotheses (batch, n, len) right-padded
    to the longest, their scores (beam) or None, the per-position scores decoded)."""
    pad, batch = request.pad_token_id, request.batch_size
    scores, hypothesis_scores = process_scores(request, logits), None
    if request.mode == "sample":
        n = request.num_return_sequences
        scores = warp_for_sampling(request, scores)
        probs = F.softmax(scores.float(), -1).repeat_interleave(n, 0)
        tokens = torch.multinomial(probs.flatten(0, 1), 1).view(probs.shape[:2])
        hypotheses = tokens.masked_fill(~target_mask.repeat_interleave(n, 0), pad).view(batch, n, -1)
    elif request.mode == "beam":
        scores = F.log_softmax(scores.float(), -1)
        hypotheses, hypothesis_scores = rank_length_beam(argmax_decode(scores, target_mask, pad), scores, target_mask,
                                                         batch, logits.shape[0] // batch, valid_rows, ranking,
                                                         length_scores, partner_scores)
    else:
        hypotheses = argmax_decode(scores, target_mask, pad).view(batch, 1, -1)
    hypotheses = hypotheses[..., : int(target_mask.sum(1).max())]
    if drop_repeats:
        hypotheses = drop_adjacent_repeats(hypotheses.flatten(0, 1), pad).view(*hypotheses.shape[:2], -1)
    return hypotheses, hypothesis_scores, scores


__all__ = ["WeakNATLengthPredictor", "length_classes", "length_loss", "top_lengths", "uniform_copy_indices",
           "target_inputs", "token_loss", "drop_adjacent_repeats", "argmax_decode", "rank_length_beam",
           "vanilla_decoder_inputs", "model_target_inputs", "vanilla_loss_terms", "vanilla_generate",
           "vanilla_decode"]
