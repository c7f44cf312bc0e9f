# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""CTC's `generate()`: the one forward pass, the frames that may emit, and their decoding as the request asks.

`ctc_decode` reads only frame logits (or, for plain greedy, the frames' argmax ids), so every runtime that produces
them (the PyTorch model here, the ONNX Runtime graph in `onnx_runtime.py`) decodes with the same code: greedy
(collapse repeats, drop blanks), sampling, and prefix beam search (`ctc.py`; which implementation runs: the
`generation_config` entry `beam_search_backend`, "auto" by default, see `ctc.choose_beam_search_backend`).
"""

import torch
import torch.nn.functional as F

from .ctc import collapse_repeats_and_blanks, ctc_beam_search, ctc_greedy_decode, ctc_sample_decode
from .generation import GenerationRequest, finish_generation, has_content, process_scores, warp_for_sampling


def ctc_generate(model, request: GenerationRequest, encoder_outputs, source_mask, beam_token_candidates=None):
    """`WeakNATForConditionalGeneration.generate` for a CTC model, after encoding: upsample and decode once, the CTC
    head, the decoding, then transformers' output (`generation.finish_generation`)."""
    outputs = model.model(attention_mask=source_mask, encoder_outputs=encoder_outputs,
                          output_attentions=request.output_attentions,
                          output_hidden_states=request.output_hidden_states)
    hidden, blank = outputs.last_hidden_state, model.config.blank_token_id  # hidden: (batch, frames, d_model)
    frame_mask = emitting_frames(model.frame_mask(source_mask), request.input_ids, source_mask, model.config)
    if wants_frame_logits(request):
        logits = model.decoding_logits(hidden)  # (batch, frames, vocab) float32, whatever the model's dtype
        hypotheses, scores, frame_scores = ctc_decode(request, frame_mask, blank, logits=logits,
                                                      beam_token_candidates=beam_token_candidates)
    else:  # plain greedy: the CTC head on the valid frames only, so padded frames cost nothing
        frame_ids = torch.full(frame_mask.shape, blank, dtype=torch.long, device=hidden.device)
        frame_ids[frame_mask] = process_scores(request, model.decoding_logits(hidden[frame_mask])).argmax(-1)
        (hypotheses, scores, frame_scores), logits = ctc_decode(request, frame_mask, blank, frame_ids=frame_ids), None
    return finish_generation(request, hypotheses, scores, scores=frame_scores, logits=logits,
                             encoder_outputs=encoder_outputs, decoder_outputs=outputs)


def check_blank_not_suppressed(request: GenerationRequest, blank_id: int):
    if blank_id in request.suppressed_token_ids:
        raise ValueError(f"The CTC blank (id {blank_id}) cannot be suppressed: every CTC output needs it")


def wants_frame_logits(request: GenerationRequest) -> bool:
    """Whether decoding needs every frame's logits (beam search, sampling, returned scores or logits, suppressed
    tokens) rather than just each frame's argmax."""
    config = request.config
    return request.mode != "greedy" or bool(config.output_scores or config.output_logits)


def emitting_frames(frame_mask, input_ids, source_mask, config):
    """The frames that may emit (batch, frames): those of real source tokens, none for a source without a content
    token (an empty sentence is just `</s>`: its translation is defined as empty)."""
    return frame_mask if input_ids is None else frame_mask & has_content(input_ids, source_mask, config)[:, None]


def ctc_decode(request: GenerationRequest, frame_mask, blank_id: int, *, logits=None, frame_ids=None,
               beam_token_candidates=None):
    """Decode CTC frames as `request` asks: greedy, sampling or prefix beam search.

    logits: (batch, frames, vocab) raw frame logits; or, for plain greedy only, frame_ids: (batch, frames) each
    frame's argmax (already computed with `process_scores`). frame_mask: (batch, frames) bool, the frames that emit.
    Returns (hypotheses (batch, k, len) right-padded, their log-probabilities (beam search) or None, the processed
    frame scores the decoding read (None when given frame_ids)). Beam search reads two `generation_config` entries of
    this model's own: `beam_token_candidates` (tokens tried per frame, default 2 * num_beams; the keyword wins) and
    `beam_search_backend` ("auto", "batched" or "pruned_cpu": `ctc.choose_beam_search_backend`).
    """
    pad = request.pad_token_id
    if frame_ids is not None:
        return collapse_repeats_and_blanks(frame_ids, frame_mask, blank_id, pad)[:, None], None, None
    frame_scores, scores = process_scores(request, logits), None
    if request.mode == "greedy":
        hypotheses = ctc_greedy_decode(frame_scores, frame_mask, blank_id, pad)[:, None]
    elif request.mode == "sample":
        frame_scores, n = warp_for_sampling(request, frame_scores), request.num_return_sequences
        samples = ctc_sample_decode(frame_scores.repeat_interleave(n, 0), frame_mask.repeat_interleave(n, 0),
                                    blank_id, pad)
        hypotheses = samples.view(request.batch_size, n, samples.shape[1])
    else:
        frame_scores = F.log_softmax(frame_scores.float(), -1)
        candidates = (beam_token_candidates or getattr(request.config, "beam_token_candidates", None)
                      or 2 * request.num_beams)
        backend = getattr(request.config, "beam_search_backend", None) or "auto"
        hypotheses, scores = ctc_beam_search(frame_scores, frame_mask.sum(1), blank_id, pad, request.num_beams,
                                             candidates, backend)
    return hypotheses, scores, frame_scores
