# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""Pipeline-style translation for WeakNAT models.

transformers 5.x removed its "translation" pipeline; this one keeps the v4 contract: a string or a list of strings
in, `[{"translation_text": ...}]` out, generation arguments passed on to `generate()`. It ships next to exported
checkpoints as remote code, so it imports only torch and transformers (never hf_weaknat).
"""

import re
import warnings

import torch
from transformers import Pipeline
from transformers.utils import ModelOutput

# Code points a str can hold but no UTF-8 text can: lone surrogates (e.g. from a decode with errors="surrogateescape")
UNENCODABLE = re.compile("[\ud800-\udfff]")


class WeakNATTranslationPipeline(Pipeline):
    """Translate with a CTC non-autoregressive model in one forward pass per batch.

    Call (or construction) arguments: `batch_size` (the usual pipeline batching) and every `generate()` argument of
    the model, as the v4 translation pipeline took them: `num_beams` (1 = CTC greedy, > 1 = CTC prefix beam search),
    `num_return_sequences`, `max_length` / `max_new_tokens` (truncate), `do_sample` with `temperature` / `top_k` /
    `top_p`, `suppress_tokens`, `generation_config`... Bad generation arguments raise before any sentence is
    translated, with `generate()`'s own errors. Sources longer than the model's `max_position_embeddings` are
    truncated with a warning; empty or whitespace-only sentences translate to ""; an empty list gives [].
    Characters no text encoding can hold (lone surrogates) are replaced by U+FFFD with a warning naming the item;
    the other items translate as usual.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def _sanitize_parameters(self, **generate_kwargs):
        if generate_kwargs:  # generate() checks them on an empty batch: bad arguments fail before any work is done
            empty = torch.zeros((0, 1), dtype=torch.long, device=self.model.device)
            self.model.generate(input_ids=empty, attention_mask=empty, **generate_kwargs)
        return {}, generate_kwargs, {}

    def __call__(self, inputs, **kwargs):
        rows = inputs if isinstance(inputs, list) else [inputs]
        for i, row in enumerate(rows):
            if not isinstance(row, str):
                where = f" (item {i})" if isinstance(inputs, list) else ""
                raise TypeError(f"weaknat translation takes str or list[str]; got {type(row).__name__}{where}")
        if isinstance(inputs, list) and not inputs:
            self._sanitize_parameters(**{k: v for k, v in kwargs.items() if k not in ("batch_size", "num_workers")})
            return []
        cleaned = [self.encodable(row, i if isinstance(inputs, list) else None) for i, row in enumerate(rows)]
        result = super().__call__(cleaned if isinstance(inputs, list) else cleaned[0], **kwargs)
        if isinstance(inputs, list) and all(len(r) == 1 for r in result):
            return [r[0] for r in result]  # one translation per sentence: flat list, as transformers 4.x did
        return result

    @staticmethod
    def encodable(text: str, index: int | None) -> str:
        """`text` with every character no encoding can hold (lone surrogates) replaced by U+FFFD, with a warning."""
        count = len(UNENCODABLE.findall(text))
        if count:
            where = f"item {index}" if index is not None else "the input"
            warnings.warn(f"{where}: {count} character(s) that no text encoding can hold (lone surrogates) replaced "
                          f"by U+FFFD before translation: {text[:40]!r}", stacklevel=3)
            text = UNENCODABLE.sub("\ufffd", text)
        return text

    def preprocess(self, text):
        limit = self.model.config.max_position_embeddings
        ids = self.tokenizer(text.strip(), return_tensors="pt")
        if ids["input_ids"].shape[1] > limit:
            warnings.warn(f"Source of {ids['input_ids'].shape[1]} tokens truncated to the model's limit of {limit} "
                          f"(max_position_embeddings): {text[:40]!r}...", stacklevel=2)
            ids = self.tokenizer(text.strip(), return_tensors="pt", truncation=True, max_length=limit)
        return dict(ids)

    def _forward(self, model_inputs, **generate_kwargs):
        batch = model_inputs["input_ids"].shape[0]
        output_ids = self.model.generate(input_ids=model_inputs["input_ids"],
                                         attention_mask=model_inputs["attention_mask"], **generate_kwargs)
        if isinstance(output_ids, ModelOutput):  # return_dict_in_generate=True: the texts come from the sequences
            output_ids = output_ids.sequences
        per_sentence = output_ids.shape[0] // batch  # num_return_sequences, whichever way it was set
        return {"output_ids": output_ids.view(batch, per_sentence, output_ids.shape[1])}

    def postprocess(self, model_outputs):
        sequences = model_outputs["output_ids"][0]
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [{"translation_text": text} for text in texts]
