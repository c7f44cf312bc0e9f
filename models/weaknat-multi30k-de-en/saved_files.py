# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""The files of a saved model, checked before loading: a damaged one (truncated in a copy, edited by hand, emptied)
is named with its fault. Without this check a broken tokenizer or weights file surfaces as a JSON or safetensors
error that names no file, and transformers skips an unreadable generation_config.json silently (the model then
generates with defaults that are not the ones saved)."""

import json
from pathlib import Path

JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "model.safetensors.index.json")


def check_saved_files(directory) -> None:
    """Raise OSError naming the first damaged file of a saved-model `directory` and what is wrong with it."""
    directory = Path(directory)
    for name in JSON_FILES:
        path = directory / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                raise OSError(f"{path} is damaged: not valid JSON ({error}); it was probably cut short or edited. "
                              "Copy or download the model again") from error
    for path in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise OSError(f"{path} is damaged: {problem}. Copy or download the model again")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, judged from its header (which says how long the file must be)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"{size} bytes, too short for a safetensors header"
        header_size = int.from_bytes(prefix, "little")
        if header_size > size - 8:
            return f"its header claims {header_size} bytes, the file has {size}"
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, ValueError):
            return "its header is not valid JSON"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if size != expected:
        return f"{size} bytes where its header describes {expected} (truncated or extended)"
    return None


__all__ = ["check_saved_files", "safetensors_problem"]
