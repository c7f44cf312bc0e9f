# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""Glancing training (GLAT, Qian et al. 2021): show the decoder part of the reference, more of it where its first
guess was wrong. One recipe for both NAR types; only the reference each decoder position is compared with differs.

A training step with glancing: (1) a no-grad pass predicts every decoder position; (2) each position gets its
reference token: for CTC the reference aligned onto the frames (the best CTC path, `ctc.ctc_viterbi_align`, a token
or the blank per frame), for the vanilla NAR the target token at that position itself; (3) `ratio` times the number
of positions whose prediction differs from it (the Hamming distance), chosen at random, get the embedding of their
reference token as decoder input; (4) the pass with gradients runs on those inputs. The model runs (1) and (4);
this file is (2) and (3). The ratio anneals linearly from `glancing_start_ratio` to `glancing_end_ratio`
(`WeakNATConfig.glancing_ratio`).
"""

import torch
import torch.nn.functional as F

from .ctc import ctc_viterbi_align


@torch.no_grad()
def glanced_positions(logits, mask, reference, ratio: float, allowed=None):
    """Which positions see the reference: `floor(ratio * distance)` random valid positions of each row, where
    distance = the valid positions whose argmax differs from `reference` (rows with `allowed` false: none).

    logits (batch, len, vocab); mask (batch, len) bool; reference (batch, len) token ids -> (batch, len) bool."""
    wrong = ((logits.argmax(-1) != reference) & mask).sum(1)
    num_glanced = (wrong.float() * ratio).long()  # floor, as GLAT
    if allowed is not None:
        num_glanced = num_glanced * allowed
    scores = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, 2.0)
    rank = scores.argsort(1).argsort(1)  # rank of each position among its row's random scores: uniform, valid first
    return rank < num_glanced[:, None]


@torch.no_grad()
def choose_glanced_frames(frame_logits, frame_mask, labels, ratio: float, blank_token_id: int):
    """CTC: which frames see the reference, and which token each would see.

    frame_logits (batch, frames, vocab) from the no-grad pass; frame_mask (batch, frames); labels (batch, tgt_len)
    right-padded with -100. Returns (glanced (batch, frames) bool, aligned (batch, frames) token or blank ids).
    A row whose target cannot fit its frames glances nowhere.
    """
    target_mask = labels != -100
    aligned, fits = ctc_viterbi_align(F.log_softmax(frame_logits.float(), -1), frame_mask.sum(1),
                                      labels.masked_fill(~target_mask, 0), target_mask.sum(1), blank_token_id)
    return glanced_positions(frame_logits, frame_mask, aligned, ratio, fits), aligned


def glancing_frame_inputs(frame_inputs, frame_mask, frame_logits, labels, ratio, blank_token_id, embed_tokens):
    """CTC: frame_inputs (batch, frames, d) with the glanced frames replaced by their aligned token's embedding.

    The embeddings keep their gradient: the shared embedding learns from the glanced frames too.
    """
    glanced, aligned = choose_glanced_frames(frame_logits, frame_mask, labels, ratio, blank_token_id)
    return torch.where(glanced[..., None], embed_tokens(aligned).to(frame_inputs.dtype), frame_inputs)


def glancing_target_inputs(target_inputs, target_mask, logits, labels, ratio, embed_tokens):
    """Vanilla NAR: target_inputs (batch, tgt_len, d) with the glanced positions replaced by their reference token's
    embedding (GLAT: the Hamming distance between the argmax and the reference decides how many)."""
    reference = labels.masked_fill(~target_mask, 0)
    glanced = glanced_positions(logits, target_mask, reference, ratio)
    return torch.where(glanced[..., None], embed_tokens(reference).to(target_inputs.dtype), target_inputs)


__all__ = ["glanced_positions", "choose_glanced_frames", "glancing_frame_inputs", "glancing_target_inputs"]
