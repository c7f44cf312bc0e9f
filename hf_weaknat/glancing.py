# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""Glancing training with CTC (GLAT, Gu and Kong 2021): show the decoder part of the reference, more of it where
its first guess was wrong.

A training step with glancing: (1) a no-grad pass predicts every frame; (2) the reference is aligned onto the
frames (the best CTC path, `ctc.ctc_viterbi_align`); (3) `ratio` times the number of frames whose prediction
disagrees with that alignment, chosen at random, get the embedding of their aligned token (or of the blank) as
decoder input; (4) the pass with gradients runs on those inputs. The model runs (1) and (4); this file is (2) and
(3). The ratio anneals linearly from `glancing_start_ratio` to `glancing_end_ratio` (`WeakNATConfig.glancing_ratio`).
"""

import torch
import torch.nn.functional as F

from .ctc import ctc_viterbi_align


@torch.no_grad()
def choose_glanced_frames(frame_logits, frame_mask, labels, ratio: float, blank_token_id: int):
    """Which frames see the reference, and which token each would see.

    frame_logits (batch, frames, vocab) from the no-grad pass; frame_mask (batch, frames); labels (batch, tgt_len)
    right-padded with -100. Returns (glanced (batch, frames) bool, aligned (batch, frames) token or blank ids).
    A row whose target cannot fit its frames glances nowhere.
    """
    target_mask = labels != -100
    aligned, fits = ctc_viterbi_align(F.log_softmax(frame_logits.float(), -1), frame_mask.sum(1),
                                      labels.masked_fill(~target_mask, 0), target_mask.sum(1), blank_token_id)
    wrong = ((frame_logits.argmax(-1) != aligned) & frame_mask).sum(1)
    num_glanced = (wrong.float() * ratio).long() * fits  # floor, as GLAT
    scores = torch.rand(frame_mask.shape, device=frame_mask.device).masked_fill(~frame_mask, 2.0)
    rank = scores.argsort(1).argsort(1)  # rank of each frame among its row's random scores: uniform, valid first
    return rank < num_glanced[:, None], aligned


def glancing_frame_inputs(frame_inputs, frame_mask, frame_logits, labels, ratio, blank_token_id, embed_tokens):
    """frame_inputs (batch, frames, d) with the glanced frames replaced by their aligned token's embedding.

    The embeddings keep their gradient: the shared embedding learns from the glanced frames too.
    """
    glanced, aligned = choose_glanced_frames(frame_logits, frame_mask, labels, ratio, blank_token_id)
    return torch.where(glanced[..., None], embed_tokens(aligned).to(frame_inputs.dtype), frame_inputs)


__all__ = ["choose_glanced_frames", "glancing_frame_inputs"]
