# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""`weaknat-translate`: translate a text file, one sentence per line, with a WeakNAT model.

    weaknat-translate MODEL [INPUT] [-o OUTPUT] [--engine torch|onnx] [--num_beams 5] [--batch_size 64] ...
    python -m hf_weaknat.translate MODEL < input.de > output.en

Line accounting is the contract: line i of the output is the translation of line i of the input, and the output has
exactly as many lines as the input (lines are what `\\n` ends; a last line without one counts, a `\\r` before it is
dropped). Empty or whitespace-only lines translate to empty lines. A line that is not valid UTF-8 is an error naming
its line number (`--invalid replace` translates it with U+FFFD in place of the bad bytes, `--invalid empty` writes an
empty line), checked before anything is translated. A source longer than the model's limit is truncated with a
warning naming its line. The output is written at the end, all at once: to a file, through a temporary file renamed
into place, so a failure or an interrupt leaves no partial output behind (an earlier file at that path stays as it
was); to stdout, nothing at all.

Sentences are batched by length (`--batch_size` sentences, longest first), so a batch pads little. `--engine onnx`
runs ONNX Runtime's int8 graph (`onnx_runtime.py`): `--onnx_file` names one, otherwise it is made from the model on
first use and cached (`$WEAKNAT_CACHE`, default `~/.cache/hf_weaknat/onnx`, keyed by the weights' hash).
"""

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.utils import cached_file

from .onnx_runtime import INT8_FILE, ORTWeakNATForConditionalGeneration, export_onnx
from .saved_files import check_saved_files

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
PROGRESS_MIN_LINES = 1000  # shorter inputs finish before a progress bar would say anything


class TranslateError(Exception):
    """A failure the user can act on: the message says what and where; the command exits with status 1."""


# ---------------------------------------------------------------------------------------------------------- lines


def split_lines(data: bytes) -> list[bytes]:
    """The input's lines: what `\\n` ends, plus a last line without it; one `\\r` before the `\\n` is dropped.
    No other character splits a line (unlike `str.splitlines`, which also splits on `\\x0c`, `\\x1c`, U+2028...)."""
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the newline that ends the last line opens no new one
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def decode_lines(lines: list[bytes], invalid: str) -> tuple[list[str], list[int]]:
    """UTF-8 text of each line (a leading byte-order mark dropped), and the 1-based numbers of the lines that are
    not valid UTF-8: with `invalid="error"` a `TranslateError` names them; `"replace"` puts U+FFFD in place of the
    bad bytes; `"empty"` makes the line empty."""
    texts, bad = [], []
    for number, line in enumerate(lines, start=1):
        try:
            texts.append(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError:
            bad.append(number)
            texts.append(line.decode("utf-8", errors="replace") if invalid == "replace" else "")
    if bad and invalid == "error":
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise TranslateError(f"{len(bad)} line(s) of the input are not valid UTF-8: line {shown}. Fix the input, or "
                             "pass --invalid replace (U+FFFD for the bad bytes) or --invalid empty (an empty line)")
    return texts, bad


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of `batch_size`, longest sources first, so each batch pads little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def one_line(text: str) -> str:
    """A translation as exactly one output line (a line break inside it would shift every later line)."""
    return " ".join(text.splitlines()) if any(c in text for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029") else text


# ------------------------------------------------------------------------------------------------------- engines


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(model_name: str, engine: str, device: str, onnx_file: str | None, num_threads: int | None,
               dtype: str | None = None):
    """The tokenizer and the model that `generate`s: the PyTorch model on `device` (in `dtype`, default the saved
    one), or ONNX Runtime's int8 graph."""
    try:
        if os.path.isdir(model_name):  # a damaged file is named, whichever loads it first
            check_saved_files(model_name)
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        if engine == "torch":
            if num_threads:
                torch.set_num_threads(num_threads)
            loaded = AutoModelForSeq2SeqLM.from_pretrained(model_name, **({"dtype": DTYPES[dtype]} if dtype else {}))
            return tokenizer, loaded.to(device).eval()
        if dtype:
            raise TranslateError(f"--dtype {dtype} is for --engine torch; the ONNX graph has its own precision")
        if device != "cpu":
            raise TranslateError(f"--engine onnx runs on ONNX Runtime's CPU provider; got --device {device}")
        graph = Path(onnx_file) if onnx_file else cached_int8_graph(model_name)
        # the graph's own config when export_onnx wrote one beside it, else the model's
        config_directory = graph.parent if (graph.parent / "config.json").is_file() else model_name
        return tokenizer, ORTWeakNATForConditionalGeneration.from_pretrained(
            graph.parent, file_name=graph.name, num_threads=num_threads, config_directory=config_directory)
    except TranslateError:
        raise
    except (OSError, ValueError, ImportError) as error:
        raise TranslateError(f"cannot load {model_name!r} with --engine {engine}: {error}") from error


def cached_int8_graph(model_name: str) -> Path:
    """ONNX Runtime's int8 graph of `model_name`, made by `export_onnx` on first use and kept in the cache, keyed by
    the hash of the weights file (a retrained model at the same path gets a new graph)."""
    weights = cached_file(model_name, "model.safetensors")
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("WEAKNAT_CACHE", Path.home() / ".cache" / "hf_weaknat")) / "onnx" / digest
    if not (cache / INT8_FILE).is_file():
        print(f"weaknat-translate: making the ONNX int8 graph of {model_name} (once) in {cache}", file=sys.stderr)
        cache.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=cache.parent))
        try:
            export_onnx(model_name, scratch, quantize=True)
            (scratch / "model.onnx").unlink()  # the fp32 graph only served to make the int8 one
            shutil.rmtree(cache, ignore_errors=True)  # a folder without the graph: left by someone else's failure
            scratch.rename(cache)  # a graph in the cache is complete: it got there by one rename
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return cache / INT8_FILE


# --------------------------------------------------------------------------------------------------- translation


def translate_lines(texts: list[str], tokenizer, model, batch_size: int, generate_kwargs: dict,
                    progress: bool = False) -> list[str]:
    """One translation per text, in input order; empty or whitespace-only texts give ""."""
    limit = model.config.max_position_embeddings
    sources = {i: text.strip() for i, text in enumerate(texts) if text.strip()}
    ids = {i: tokenizer(text)["input_ids"] for i, text in sources.items()}
    for i, row in ids.items():
        if len(row) > limit:
            warnings.warn(f"line {i + 1}: source of {len(row)} tokens truncated to the model's limit of {limit} "
                          f"(max_position_embeddings)", stacklevel=2)
            ids[i] = tokenizer(sources[i], truncation=True, max_length=limit)["input_ids"]
    keys = list(ids)
    translations = [""] * len(texts)
    batches = length_batches([len(ids[i]) for i in keys], batch_size)
    with tqdm(total=len(keys), unit="sent", disable=not progress, file=sys.stderr, desc="translating") as bar:
        for batch in batches:
            rows = [ids[keys[j]] for j in batch]
            padded = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
            with torch.inference_mode():
                output = model.generate(input_ids=padded["input_ids"].to(model.device),
                                        attention_mask=padded["attention_mask"].to(model.device), **generate_kwargs)
            for j, text in zip(batch, tokenizer.batch_decode(output, skip_special_tokens=True)):
                translations[keys[j]] = one_line(text.strip())
            bar.update(len(batch))
    return translations


@contextlib.contextmanager
def atomic_output(path: str | None):
    """A text stream that reaches `path` only when the block ends without an error: a temporary file beside it,
    renamed into place (`None` or "-": stdout, written by the caller at the end). A path that cannot be written
    fails here, before any translation."""
    if path in (None, "-"):
        yield sys.stdout
        return
    target = Path(path)
    if target.is_dir():
        raise TranslateError(f"cannot write the output to {target}: it is a directory")
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent or ".")
    except OSError as error:
        raise TranslateError(f"cannot write the output to {target}: {error.strerror or error}") from error
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


# ---------------------------------------------------------------------------------------------------------- main


def generation_arguments(args) -> dict:
    kwargs = {name: getattr(args, name) for name in ("num_beams", "beam_token_candidates", "max_length",
                                                      "max_new_tokens", "min_length", "temperature", "top_k", "top_p")
              if getattr(args, name) is not None}
    if args.do_sample:
        kwargs["do_sample"] = True
    for item in args.generate or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise TranslateError(f"--generate takes NAME=VALUE (a JSON value, or text); got {item!r}")
        try:
            kwargs[name] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[name] = value
    if kwargs.get("num_return_sequences", 1) != 1:
        raise TranslateError("weaknat-translate writes one translation per line: num_return_sequences must be 1")
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weaknat-translate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Translate a text file, one sentence per line, with a WeakNAT model (one forward pass per batch).",
        epilog="Output line i is the translation of input line i; empty lines stay empty; the output file appears "
               "only when complete. Exit status: 0 done, 1 failed (the message says why), 2 bad arguments, "
               "130 interrupted.")
    parser.add_argument("model", help="an exported model: a directory or a Hub repo id")
    parser.add_argument("input", nargs="?", default="-", help="a text file, one sentence per line (default: stdin)")
    parser.add_argument("-o", "--output", default="-", help="where the translations go (default: stdout)")
    parser.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                        help="torch: the PyTorch model; onnx: ONNX Runtime's int8 graph (CPU)")
    parser.add_argument("--onnx_file", help="--engine onnx: this .onnx graph (written by export_onnx, beside its "
                                            "config) instead of the cached int8 one")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="--engine torch: the network's precision (default: "
                        "the saved config's, float32 for exports); decoding reads float32 logits either way")
    parser.add_argument("--batch_size", type=int, default=64, help="sentences per forward pass (default 64)")
    parser.add_argument("--num_threads", type=int, help="CPU threads (default: the engine's own choice)")
    parser.add_argument("--invalid", choices=("error", "replace", "empty"), default="error",
                        help="a line that is not UTF-8: stop naming it (default), translate it with U+FFFD, or "
                             "write an empty line")
    generation = parser.add_argument_group("generation (as generate(); defaults from the model's generation config)")
    generation.add_argument("--num_beams", type=int, help="1: greedy; > 1: CTC prefix beam search")
    generation.add_argument("--beam_token_candidates", type=int)
    generation.add_argument("--max_length", type=int)
    generation.add_argument("--max_new_tokens", type=int)
    generation.add_argument("--min_length", type=int)
    generation.add_argument("--do_sample", action="store_true")
    generation.add_argument("--temperature", type=float)
    generation.add_argument("--top_k", type=int)
    generation.add_argument("--top_p", type=float)
    generation.add_argument("--seed", type=int, help="torch's seed, for sampling")
    generation.add_argument("--generate", action="append", metavar="NAME=VALUE",
                            help="any other generate() argument, e.g. --generate suppress_tokens=[5,6]")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no closing line")
    return parser


def run(args) -> None:
    if args.batch_size < 1:
        raise TranslateError(f"--batch_size must be a positive integer (got {args.batch_size})")
    generate_kwargs = generation_arguments(args)
    device = args.device or ("cuda" if torch.cuda.is_available() and args.engine == "torch" else "cpu")
    if args.input == "-":
        raw = sys.stdin.buffer.read()
    else:
        try:
            raw = Path(args.input).read_bytes()
        except OSError as error:
            raise TranslateError(f"cannot read {args.input}: {error.strerror or error}") from error
    texts, bad = decode_lines(split_lines(raw), args.invalid)
    for number in bad[:10]:
        print(f"weaknat-translate: line {number} is not valid UTF-8: "
              f"{'translated with U+FFFD' if args.invalid == 'replace' else 'written as an empty line'}",
              file=sys.stderr)
    with atomic_output(args.output) as stream:  # an unwritable path fails here, before the model is loaded
        tokenizer, model = load_model(args.model, args.engine, device, args.onnx_file, args.num_threads, args.dtype)
        try:  # bad generation arguments fail on an empty batch, before any sentence is translated
            empty = torch.zeros((0, 1), dtype=torch.long, device=model.device)
            model.generate(input_ids=empty, attention_mask=empty, **generate_kwargs)
        except (TypeError, ValueError) as error:
            raise TranslateError(f"generation arguments {generate_kwargs}: {error}") from error
        if args.seed is not None:
            torch.manual_seed(args.seed)
        start = time.perf_counter()
        translations = translate_lines(texts, tokenizer, model, args.batch_size, generate_kwargs,
                                       progress=not args.quiet and len(texts) >= PROGRESS_MIN_LINES)
        seconds = time.perf_counter() - start
        stream.write("".join(line + "\n" for line in translations))
        stream.flush()
    if not args.quiet:
        count = sum(1 for t in texts if t.strip())
        rate = f"{count / seconds:.1f}" if seconds > 0 else "inf"
        print(f"weaknat-translate: {len(texts)} lines ({count} sentences, {len(texts) - count} empty) in "
              f"{seconds:.2f} s, {rate} sentences/s ({args.engine}, {device}, batch {args.batch_size})",
              file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except TranslateError as error:
        print(f"weaknat-translate: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("weaknat-translate: interrupted; no output written", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
