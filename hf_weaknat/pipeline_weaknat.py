# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""Pipeline-style translation for WeakNAT models.

transformers 5.x removed its "translation" pipeline; this one keeps the v4 contract: a string or a list of strings
in, `[{"translation_text": ...}]` out. It ships next to exported checkpoints as remote code, so it imports only
transformers (never hf_weaknat).
"""

import warnings

from transformers import Pipeline


class WeakNATTranslationPipeline(Pipeline):
    """Translate with a CTC non-autoregressive model in one forward pass per batch.

    Call arguments: `num_beams` (1 = CTC greedy, > 1 = CTC prefix beam search), `num_return_sequences`,
    `batch_size` (the usual pipeline batching). Sources longer than the model's `max_position_embeddings` are
    truncated with a warning; empty or whitespace-only sentences translate to "".
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def _sanitize_parameters(self, num_beams=None, num_return_sequences=None, **kwargs):
        if kwargs:
            raise TypeError(f"Unsupported arguments for weaknat translation: {sorted(kwargs)}")
        forward = {}
        if num_beams is not None:
            forward["num_beams"] = num_beams
        if num_return_sequences is not None:
            forward["num_return_sequences"] = num_return_sequences
        return {}, forward, {}

    def __call__(self, inputs, **kwargs):
        rows = inputs if isinstance(inputs, list) else [inputs]
        for i, row in enumerate(rows):
            if not isinstance(row, str):
                where = f" (item {i})" if isinstance(inputs, list) else ""
                raise TypeError(f"weaknat translation takes str or list[str]; got {type(row).__name__}{where}")
        result = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list) and all(len(r) == 1 for r in result):
            return [r[0] for r in result]  # one translation per sentence: flat list, as transformers 4.x did
        return result

    def preprocess(self, text):
        limit = self.model.config.max_position_embeddings
        ids = self.tokenizer(text.strip(), return_tensors="pt")
        if ids["input_ids"].shape[1] > limit:
            warnings.warn(f"Source of {ids['input_ids'].shape[1]} tokens truncated to the model's limit of {limit} "
                          f"(max_position_embeddings): {text[:40]!r}...", stacklevel=2)
            ids = self.tokenizer(text.strip(), return_tensors="pt", truncation=True, max_length=limit)
        return dict(ids)

    def _forward(self, model_inputs, num_beams=1, num_return_sequences=1):
        batch = model_inputs["input_ids"].shape[0]
        output_ids = self.model.generate(input_ids=model_inputs["input_ids"],
                                         attention_mask=model_inputs["attention_mask"], num_beams=num_beams,
                                         num_return_sequences=num_return_sequences)
        return {"output_ids": output_ids.view(batch, num_return_sequences, -1)}

    def postprocess(self, model_outputs):
        sequences = model_outputs["output_ids"][0]
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [{"translation_text": text} for text in texts]
