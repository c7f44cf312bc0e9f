"""Inference speed: the CTC NAR translator against an AR Transformer of the same size and vocabulary, run by
transformers (MarianMTModel) and by CTranslate2, the engine CPU users serve AR translation with.

Systems: NAR greedy and prefix beam search (`--nar_beams`, default 5) in PyTorch; AR greedy and beam 5 (`--ar_beams`)
in transformers. `--int8`: the NAR (and AR) greedy after `torch.ao.quantization.quantize_dynamic` on every
`nn.Linear`. `--onnx`: the NAR's one-pass graph in ONNX Runtime (`hf_weaknat.onnx_runtime`), greedy, and with `--int8`
its ONNX Runtime int8 quantization (`--onnx_fused` adds the graph with attention fused, side by side).
`--ctranslate2`: the AR model converted by CTranslate2's own converter, greedy and
beam, in float32 and (with `--int8`) int8. Each system translates the same real test sentences in the same batches;
only the translation call is timed (`generate`, or CTranslate2's `translate_batch` on the same tokens; tokenization,
padding and detokenization are done before and after).

Method: per batch size, `--warmup` batches of every system first, then `--repeats` repeats; each repeat runs every
system once over all its batches, in an order rotated by one system per repeat (so no system always runs first or
after the same neighbour). A system's time is the MEDIAN over repeats of its total time; ms/sentence, sentences/s
and every speed-up ratio come from those medians, measured in the same run.

Models: trained checkpoints (`--nar DIR`, an exported WeakNAT; `--ar DIR`, a MarianMTModel) or, by default, randomly
initialised models at the paper's base size (d_model 512, 6+6 layers, 8 heads, FFN 2048, post-LN, ReLU) sharing one
vocabulary. Fairness with random weights: a random AR model may never emit `</s>` and would always run to its
length limit, so each random-AR batch decodes EXACTLY `min_new_tokens = max_new_tokens = longest reference of the
batch in target tokens + 1` steps (the steps a trained model emitting the reference and `</s>` would take). A trained
AR decodes normally up to `2 * source length + 10` new tokens. The NAR's cost does not depend on its weights: greedy is
one forward pass plus an argmax and a collapse; beam search always walks every valid frame with a fixed beam.

Examples:
    python training/evidence/benchmark_speed.py                       # base size, random weights, batch 1/8/64, CPU
    python training/evidence/benchmark_speed.py --quick --json out.json
    python training/evidence/benchmark_speed.py --nar runs/export --ar runs/marian --int8 --plot speed.png
    python training/evidence/benchmark_speed.py --int8 --onnx --ctranslate2 --json speed.json     # every engine
"""

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import sacrebleu
import torch
import transformers
from matplotlib.figure import Figure
from transformers import AutoTokenizer, MarianMTModel

from hf_weaknat import WeakNATConfig, WeakNATForConditionalGeneration
from training.ar_baseline import generation_limits, marian_config
from training.data import load_or_train_tokenizer
from training.evidence import MULTI30K, cpu_model, recorded_path
from training.evidence.analyze import read_lines

# The paper's base Transformer (Appendix A); --quick uses the tiny one.
BASE_SIZES = dict(d_model=512, layers=6, heads=8, ffn=2048)
QUICK_SIZES = dict(d_model=64, layers=2, heads=4, ffn=128)
# The project's targets at the base size on CPU: (batch size, NAR system, reference system, minimum speed-up);
# "nar_best_greedy" is the fastest NAR greedy system measured (PyTorch or ONNX Runtime, fp32 or int8)
TARGETS = ((1, "nar_greedy", "ar_greedy", 8.0), (64, "nar_greedy", "ar_greedy", 1.5), (64, "nar_greedy", "ar_beam", 5.0),
           (1, "nar_best_greedy", "ct2_greedy_int8", 3.0), (64, "nar_best_greedy", "ct2_greedy_int8", 1.0))
# The AR systems every other system is compared with, where measured
REFERENCES = ("ar_greedy", "ar_beam", "ct2_greedy", "ct2_greedy_int8", "ct2_beam_int8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(MULTI30K / "test.de"), help="test sources, one per line")
    p.add_argument("--reference", default=str(MULTI30K / "test.en"), help="test references, one per line")
    p.add_argument("--nar", help="exported WeakNAT directory (default: random weights at --sizes)")
    p.add_argument("--ar", help="MarianMTModel directory (default: random weights at --sizes)")
    p.add_argument("--ar_sizes", metavar="D_MODEL,LAYERS,HEADS,FFN",
                   help="random AR at these sizes instead of the base size (e.g. a lost teacher's: 256,3,4,1024)")
    p.add_argument("--upsample_ratio", type=int, default=3, help="random NAR: CTC frames per source token")
    p.add_argument("--nar_layers", help="random NAR: ENCODER,DECODER layers (default: the size's, e.g. 6,6); a deep "
                                        "encoder with a shallow decoder costs less per frame")
    p.add_argument("--tokenizer", help="tokenizer directory for models without their own, and for random models")
    p.add_argument("--vocab_size", type=int, default=10000,
                   help="joint SentencePiece vocabulary trained on Multi30k train when no tokenizer is given "
                        "(10k ~ the paper's IWSLT14 joint vocabulary; Multi30k supports at most 19,989 pieces)")
    p.add_argument("--save_tokenizer", help="save the trained tokenizer here (reuse it with --tokenizer)")
    p.add_argument("--batch_sizes", default="1,8,64")
    p.add_argument("--sentences", default="1:64,8:64,64:256",
                   help="sentences per batch size, 'bs:n,...': the first n lines of the test set")
    p.add_argument("--order", default="sorted", choices=("sorted", "file"),
                   help="batch the n sentences sorted by source length (as fairseq and Marian batch a test set), "
                        "or in file order (more padding for both systems)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up batches per system and batch size")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats (median reported)")
    p.add_argument("--nar_beams", type=int, default=5)
    p.add_argument("--beam_token_candidates", type=int, default=None, help="NAR beam: tokens tried per frame "
                   "(default: generate's own default, 2 * num_beams)")
    p.add_argument("--ar_beams", type=int, default=5)
    p.add_argument("--int8", action="store_true", help="also time int8 dynamically quantized greedy (CPU only)")
    p.add_argument("--half", choices=("bf16", "fp16"), help="also time both models in this dtype (weights and "
                   "activations; the decoding math stays fp32): NAR greedy and beam, AR greedy and beam")
    p.add_argument("--static_shapes", action="store_true",
                   help="also time the NAR's static-shape compiled pass (cache_implementation='static'), greedy; "
                        "every batch of it is run once before timing, so that each bucket is compiled untimed")
    p.add_argument("--extra_batch_sizes", help="time the --half and --static_shapes systems at these batch sizes "
                   "only (default: all)")
    p.add_argument("--onnx", action="store_true", help="also time the NAR in ONNX Runtime (CPU; pip install .[onnx])")
    p.add_argument("--onnx_fused", action="store_true",
                   help="with --onnx: also time the graph exported with ONNX Runtime's attention fusions (fuse=True)")
    p.add_argument("--profile", action="store_true",
                   help="with --onnx: ONNX Runtime's per-operator profile of the largest batch size (time by op type)")
    p.add_argument("--ctranslate2", action="store_true",
                   help="also time the AR model in CTranslate2 (CPU and CUDA; pip install .[engines])")
    p.add_argument("--bleu_lines", type=int, default=None,
                   help="with trained models: sentences scored with sacreBLEU (default: the whole test file)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CPU, and also CUDA when available")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny models, a few sentences: a smoke test in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every number and the environment here")
    p.add_argument("--plot", help="PNG of speed-up against batch size")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly still win
        p.set_defaults(batch_sizes="1,4", sentences="1:8,4:16", warmup=1, repeats=2, vocab_size=500)
        args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.extra_batch_sizes = ([int(b) for b in args.extra_batch_sizes.split(",")] if args.extra_batch_sizes
                              else args.batch_sizes)
    counts = dict(tuple(int(x) for x in item.split(":")) for item in args.sentences.split(","))
    args.sentences = {bs: counts.get(bs, max(counts.values())) for bs in args.batch_sizes}
    return args


def model_tokenizer(directory, fallback):
    """The tokenizer saved with a model, else the shared one."""
    if directory and (Path(directory) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(directory)
    if fallback is None:
        raise ValueError(f"{directory} holds no tokenizer: pass --tokenizer")
    return fallback


def shared_tokenizer(args):
    """(tokenizer, origin) of the random models: --tokenizer, else a joint SentencePiece trained on Multi30k."""
    return load_or_train_tokenizer(args.tokenizer, files=[MULTI30K / "train.de", MULTI30K / "train.en"],
                                   vocab_size=args.vocab_size, max_sentences=4000 if args.quick else 2_000_000,
                                   num_threads=1, save_directory=args.save_tokenizer)


def build_nar(args, sizes, vocab_size):
    if args.nar:
        return WeakNATForConditionalGeneration.from_pretrained(args.nar, attn_implementation="sdpa").eval()
    encoder_layers, decoder_layers = (map(int, args.nar_layers.split(",")) if args.nar_layers
                                      else (sizes["layers"], sizes["layers"]))
    config = WeakNATConfig(vocab_size=vocab_size, d_model=sizes["d_model"], encoder_layers=encoder_layers,
                           decoder_layers=decoder_layers, upsample_ratio=args.upsample_ratio,
                           encoder_attention_heads=sizes["heads"],
                           decoder_attention_heads=sizes["heads"], encoder_ffn_dim=sizes["ffn"],
                           decoder_ffn_dim=sizes["ffn"], weak_ar_layers=0, attn_implementation="sdpa")
    return WeakNATForConditionalGeneration(config).eval()


def build_ar(args, sizes, tokenizer):
    """MarianMTModel: same sizes, shared and tied embeddings, pad 0 / eos 2, decoder start = pad (Marian's way)."""
    if args.ar:
        return MarianMTModel.from_pretrained(args.ar, attn_implementation="sdpa").eval()
    config = marian_config(tokenizer, d_model=sizes["d_model"], encoder_layers=sizes["layers"],
                           decoder_layers=sizes["layers"], encoder_attention_heads=sizes["heads"],
                           decoder_attention_heads=sizes["heads"], encoder_ffn_dim=sizes["ffn"],
                           decoder_ffn_dim=sizes["ffn"], max_position_embeddings=512, attn_implementation="sdpa")
    return MarianMTModel(config).eval()


def quantized(model):
    """A copy with every nn.Linear dynamically quantized to int8 (weights int8, activations quantized per batch)."""
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, still shipped
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def make_batches(tokenizer, sources, references, batch_size, device, max_length: int = 256):
    """Right-padded source batches, cut to the model's `max_length` source positions, with the same sources as token
    strings (what CTranslate2 reads); `steps` = longest reference in target tokens + 1 (its `</s>`)."""
    batches = []
    for start in range(0, len(sources), batch_size):
        enc = tokenizer(sources[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        refs = tokenizer(references[start:start + batch_size], add_special_tokens=False)["input_ids"]
        tokens = [tokenizer.convert_ids_to_tokens(row[mask.bool()].tolist())
                  for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
        batches.append({"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                        "tokens": tokens, "steps": max(len(r) for r in refs) + 1})
    return batches


def nar_system(model, num_beams, candidates, **options):
    def run(batch):
        return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              num_beams=num_beams, beam_token_candidates=candidates, **options)
    return run


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def ar_system(model, num_beams, forced_length):
    def run(batch):
        if forced_length:
            steps = dict(min_new_tokens=batch["steps"], max_new_tokens=batch["steps"])
        else:
            steps = generation_limits(model, batch["input_ids"])  # 2 x source + 10, within the positions
        return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              num_beams=num_beams, do_sample=False, use_cache=True, **steps)
    return run


def ct2_system(translator, tokenizer, num_beams, forced_length, positions: int):
    """CTranslate2's `translate_batch` on the batch's tokens, with the AR system's length rule: forced to `steps`
    decoding steps (random weights), else at most 2 x source + 10 tokens within the positions, as `generate`."""
    def run(batch):
        if forced_length:
            limits = dict(min_decoding_length=batch["steps"], max_decoding_length=batch["steps"])
        else:  # generate's max_new_tokens counts the end token it forces at the limit, CTranslate2's limit does not
            limits = dict(max_decoding_length=min(2 * batch["input_ids"].shape[1] + 10, positions - 1) - 1)
        results = translator.translate_batch(batch["tokens"], beam_size=num_beams, **limits)
        return [tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in results]
    return run


def convert_ctranslate2(model, tokenizer, directory: Path) -> Path:
    """The AR model converted by CTranslate2's transformers converter (float32; int8 is chosen when loading)."""
    from ctranslate2.converters import TransformersConverter

    model.save_pretrained(directory / "transformers")
    tokenizer.save_pretrained(directory / "transformers")
    return Path(TransformersConverter(str(directory / "transformers")).convert(str(directory / "ctranslate2"),
                                                                                force=True))


def engine_systems(args, device, nar, ar, tokenizers, forced_length, workdir: Path) -> dict:
    """The `--onnx` (CPU) and `--ctranslate2` systems."""
    systems = {}
    if args.onnx and device == "cpu":
        from hf_weaknat.onnx_runtime import INT8_FILE, ONNX_FILE, ORTWeakNATForConditionalGeneration, export_onnx

        exports = [("nar_onnx", False)] + [("nar_onnx_fused", True)] * args.onnx_fused
        for prefix, fuse in exports:
            onnx_dir = export_onnx(nar, workdir / prefix, quantize=args.int8, fuse=fuse)
            for suffix, file_name in (("_greedy", ONNX_FILE), ("_greedy_int8", INT8_FILE))[:1 + args.int8]:
                onnx_model = ORTWeakNATForConditionalGeneration.from_pretrained(onnx_dir, file_name, args.threads)
                systems[prefix + suffix] = nar_system(onnx_model, 1, None)
                systems[prefix + suffix].onnx_dir = onnx_dir  # for --profile
    if args.ctranslate2:
        import ctranslate2

        converted = convert_ctranslate2(ar, tokenizers["ar"], workdir)
        for suffix, compute_type in (("", "float32"), ("_int8", "int8"))[:1 + (args.int8 and device == "cpu")]:
            translator = ctranslate2.Translator(str(converted), device=device, compute_type=compute_type,
                                                intra_threads=args.threads if device == "cpu" else 0)
            positions = ar.config.max_position_embeddings
            systems[f"ct2_greedy{suffix}"] = ct2_system(translator, tokenizers["ar"], 1, forced_length, positions)
            systems[f"ct2_beam{suffix}"] = ct2_system(translator, tokenizers["ar"], args.ar_beams, forced_length,
                                                      positions)
    return systems


def onnx_profile(onnx_dir: Path, batches: list[dict], threads: int, top: int = 12) -> dict[str, dict]:
    """ONNX Runtime's own profiler over `batches`, for each ONNX graph in `onnx_dir`: the share of operator time by
    op type (e.g. MatMul, MatMulInteger, Softmax), the largest first."""
    import onnxruntime as ort

    profiles = {}
    for graph in sorted(onnx_dir.glob("*.onnx")):
        options = ort.SessionOptions()
        options.enable_profiling, options.intra_op_num_threads = True, threads
        options.profile_file_prefix = str(onnx_dir / f"profile-{graph.stem}")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        for batch in batches:
            session.run(["frame_ids"], {"input_ids": batch["input_ids"].numpy(),
                                        "attention_mask": batch["attention_mask"].numpy()})
        events = json.loads(Path(session.end_profiling()).read_text())
        by_op = {}
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                op = event["args"]["op_name"]
                by_op[op] = by_op.get(op, 0) + event["dur"]
        total = sum(by_op.values())
        profiles[graph.name] = {op: {"ms": round(us / 1000, 2), "share": round(us / total, 4)}
                                for op, us in sorted(by_op.items(), key=lambda item: -item[1])[:top]}
    return profiles


def tokenizer_key(system: str) -> str:
    """Which model's tokenizer (and position limit) a system uses: "nar" or "ar" (transformers or CTranslate2)."""
    return "nar" if system.startswith("nar") else "ar"


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def is_extra(name: str) -> bool:
    """A --half or --static_shapes system."""
    return "static" in name or name.endswith(tuple(f"_{half}" for half in HALF))


def time_systems(systems: dict, batches: dict, warmup: int, repeats: int, device: str) -> dict[str, dict]:
    """Warm-up, then `repeats` interleaved passes in rotating order.

    Returns each system's wall-clock seconds per repeat, and the process CPU seconds (all threads) beside them: on a
    machine shared with other jobs, CPU time well below wall time x threads shows the run was starved.
    """
    names = list(systems)
    for name in names:  # a static-shape system compiles once per bucket: all of them before timing
        for batch in batches[name][:len(batches[name]) if "static" in name else warmup]:
            systems[name](batch)
    totals = {name: {"wall": [], "cpu": []} for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            for batch in batches[name]:
                systems[name](batch)
            synchronize(device)
            totals[name]["wall"].append(time.perf_counter() - wall)
            totals[name]["cpu"].append(time.process_time() - cpu)
    return totals


def summarize(totals: dict[str, dict], num_sentences: int) -> dict:
    """Medians, and every system's speed-up over each reference AR system (`REFERENCES`) measured in the run."""
    rows = {}
    for name, measured in totals.items():
        median = statistics.median(measured["wall"])
        rows[name] = {"times_s": measured["wall"], "cpu_times_s": measured["cpu"], "median_s": median,
                      "ms_per_sentence": 1000 * median / num_sentences, "sentences_per_s": num_sentences / median}
    for name, row in rows.items():
        for reference in (r for r in REFERENCES if r in rows):
            row[f"speedup_vs_{reference}"] = rows[reference]["median_s"] / row["median_s"]
        if name.endswith("_int8") and f"{name[:-5]}" in rows:  # int8 against the same system in fp32
            row["speedup_vs_fp32"] = rows[name[:-5]]["median_s"] / row["median_s"]
        for half in HALF:  # a half-precision system against the AR system in the same dtype, and its fp32 self
            if name.endswith(f"_{half}") and name.startswith("nar"):
                for reference in (f"ar_greedy_{half}", f"ar_beam_{half}"):
                    if reference in rows:
                        row[f"speedup_vs_{reference}"] = rows[reference]["median_s"] / row["median_s"]
            if name.endswith(f"_{half}") and name[:-len(half) - 1] in rows:
                row["speedup_vs_fp32"] = rows[name[:-len(half) - 1]]["median_s"] / row["median_s"]
        if name == "nar_greedy_int8" and "ar_greedy_int8" in rows:
            row["speedup_vs_ar_greedy_int8"] = rows["ar_greedy_int8"]["median_s"] / row["median_s"]
    return rows


def best_nar_greedy(rows: dict) -> str:
    """The fastest NAR greedy system of a batch size's rows."""
    return min((name for name in rows if name.startswith("nar") and "greedy" in name),
               key=lambda name: rows[name]["median_s"])


def translate_all(system, tokenizer, batches) -> list[str]:
    return [text for batch in batches for text in tokenizer.batch_decode(system(batch), skip_special_tokens=True)]


def bleu_scores(args, systems, tokenizers, limits, device) -> dict:
    """sacreBLEU of each system whose weights are trained, on `--bleu_lines` test sentences at batch 64 (untimed)."""
    sources, references = read_lines(args.source, args.bleu_lines), read_lines(args.reference, args.bleu_lines)
    scores = {}
    for name, system in systems.items():
        if not (args.nar if name.startswith("nar") else args.ar):
            continue
        key = tokenizer_key(name)
        tokenizer = tokenizers[key]
        batches = make_batches(tokenizer, sources, references, 64, device, limits[key])
        hypotheses = translate_all(system, tokenizer, batches)
        metric = sacrebleu.BLEU()
        scores[name] = {"bleu": metric.corpus_score(hypotheses, [references]).score,
                        "signature": str(metric.get_signature()), "sentences": len(sources)}
    return scores


def build_systems(args, device, nar, ar, tokenizers, forced_length, workdir: Path) -> dict:
    nar, ar = nar.to(device), ar.to(device)
    systems = {
        "nar_greedy": nar_system(nar, 1, None),
        "nar_beam": nar_system(nar, args.nar_beams, args.beam_token_candidates),
        "ar_greedy": ar_system(ar, 1, forced_length),
        "ar_beam": ar_system(ar, args.ar_beams, forced_length),
    }
    if args.int8 and device == "cpu":  # quantize_dynamic has CPU kernels only
        systems["nar_greedy_int8"] = nar_system(quantized(nar), 1, None)
        systems["ar_greedy_int8"] = ar_system(quantized(ar), 1, forced_length)
    if args.static_shapes:
        systems["nar_greedy_static"] = nar_system(nar, 1, None, cache_implementation="static")
    if args.half:
        dtype, suffix = HALF[args.half], f"_{args.half}"
        nar_half, ar_half = copy.deepcopy(nar).to(dtype), copy.deepcopy(ar).to(dtype)
        systems[f"nar_greedy{suffix}"] = nar_system(nar_half, 1, None)
        systems[f"nar_beam{suffix}"] = nar_system(nar_half, args.nar_beams, args.beam_token_candidates)
        if args.static_shapes:
            systems[f"nar_greedy_static{suffix}"] = nar_system(nar_half, 1, None, cache_implementation="static")
        systems[f"ar_greedy{suffix}"] = ar_system(ar_half, 1, forced_length)
        systems[f"ar_beam{suffix}"] = ar_system(ar_half, args.ar_beams, forced_length)
    systems.update(engine_systems(args, device, nar, ar, tokenizers, forced_length, workdir))
    return systems


def run_device(args, device, nar, ar, tokenizers, forced_length) -> dict:
    """Every batch size on one device: the timing table of each, and BLEU where weights are trained."""
    with tempfile.TemporaryDirectory() as workdir:
        systems = build_systems(args, device, nar, ar, tokenizers, forced_length, Path(workdir))
        return time_and_score(args, device, systems, nar, ar, tokenizers, forced_length)


def test_sentences(args, bs: int, tokenizer) -> tuple[list[str], list[str]]:
    """The sources and references timed at batch size `bs`: the first n lines, sorted by source length in `tokenizer`'s
    tokens (unless --order file)."""
    sources, references = read_lines(args.source), read_lines(args.reference)
    n = min(args.sentences[bs], len(sources))
    pairs = list(zip(sources[:n], references[:n]))
    if args.order == "sorted":
        pairs.sort(key=lambda pair: len(tokenizer(pair[0])["input_ids"]))
    return [s for s, _ in pairs], [r for _, r in pairs]


def time_and_score(args, device, systems, nar, ar, tokenizers, forced_length) -> dict:
    limits = {"nar": nar.config.max_position_embeddings, "ar": ar.config.max_position_embeddings}
    by_batch_size = {}
    for bs in args.batch_sizes:
        src, ref = test_sentences(args, bs, tokenizers["nar"])
        n = len(src)
        per_tokenizer = {key: make_batches(tok, src, ref, bs, device, limits[key]) for key, tok in tokenizers.items()}
        timed = {name: system for name, system in systems.items()
                 if bs in args.extra_batch_sizes or not is_extra(name)}
        batches = {name: per_tokenizer[tokenizer_key(name)] for name in timed}
        started = time.perf_counter()
        with torch.inference_mode():
            totals = time_systems(timed, batches, args.warmup, args.repeats, device)
        rows = summarize(totals, n)
        by_batch_size[bs] = {"sentences": n, "batches": len(batches["ar_greedy"]), "systems": rows,
                             "ar_forced_steps": sum(b["steps"] for b in batches["ar_greedy"]) if forced_length else None,
                             "wall_s": time.perf_counter() - started}
        print_table(bs, n, rows)
    result = {"batch_sizes": by_batch_size}
    if args.profile and "nar_onnx_greedy" in systems:
        result["onnx_profile"] = onnx_profile(systems["nar_onnx_greedy"].onnx_dir, batches["nar_onnx_greedy"],
                                              args.threads)
        for graph, ops in result["onnx_profile"].items():
            print(f"\nONNX Runtime profile, {graph}, batch size {bs}: "
                  + ", ".join(f"{op} {100 * row['share']:.0f}%" for op, row in ops.items()))
    if args.nar or args.ar:
        with torch.inference_mode():
            result["bleu"] = bleu_scores(args, systems, tokenizers, limits, device)
    return result


LABELS = {"nar_greedy": "NAR greedy", "nar_beam": "NAR beam", "ar_greedy": "AR greedy", "ar_beam": "AR beam",
          "nar_greedy_int8": "NAR greedy int8", "ar_greedy_int8": "AR greedy int8",
          "nar_onnx_greedy": "NAR ORT greedy", "nar_onnx_greedy_int8": "NAR ORT greedy int8",
          "nar_onnx_fused_greedy": "NAR ORT fused greedy", "nar_onnx_fused_greedy_int8": "NAR ORT fused int8",
          "ct2_greedy": "CT2 greedy", "ct2_beam": "CT2 beam", "ct2_greedy_int8": "CT2 greedy int8",
          "ct2_beam_int8": "CT2 beam int8", "nar_best_greedy": "best NAR greedy",
          "nar_greedy_static": "NAR static greedy",
          **{f"{name}_{half}": f"{label} {half}" for half in HALF
             for name, label in (("nar_greedy", "NAR greedy"), ("nar_beam", "NAR beam"), ("ar_greedy", "AR greedy"),
                                 ("ar_beam", "AR beam"), ("nar_greedy_static", "NAR static greedy"))}}


def print_table(bs, n, rows):
    references = [r for r in REFERENCES if r in rows]
    print(f"\nbatch size {bs}, {n} sentences")
    print(f"  {'system':<24}{'ms/sent':>9}{'sent/s':>9}" + "".join(f"{'x ' + LABELS[r]:>18}" for r in references)
          + "   repeats (s)")
    for name, row in rows.items():
        times = " ".join(f"{t:.2f}" for t in row["times_s"])
        print(f"  {LABELS[name]:<24}{row['ms_per_sentence']:>9.2f}{row['sentences_per_s']:>9.1f}"
              + "".join(f"{row[f'speedup_vs_{r}']:>18.2f}" for r in references) + f"   {times}")
    if "nar_greedy_int8" in rows:
        int8 = rows["nar_greedy_int8"]
        print(f"  int8: NAR greedy {int8['speedup_vs_fp32']:.2f}x its fp32 self, "
              f"{int8['speedup_vs_ar_greedy_int8']:.2f}x AR greedy int8")


def is_base_size(config) -> bool:
    """The paper's base width (d_model, heads, FFN); the NAR's layers may be split differently (deep-shallow), which
    the report states beside every target."""
    sizes = (config.d_model, config.decoder_attention_heads, config.decoder_ffn_dim)
    return sizes == tuple(BASE_SIZES[k] for k in ("d_model", "heads", "ffn"))


def check_targets(result, base_size) -> list[dict]:
    checks = []
    for bs, nar, ref, minimum in TARGETS:
        rows = result["batch_sizes"].get(bs, {}).get("systems")
        if not (rows and base_size and ref in rows):
            continue
        system = best_nar_greedy(rows) if nar == "nar_best_greedy" else nar
        ratio = rows[ref]["median_s"] / rows[system]["median_s"]
        checks.append({"batch_size": bs, "system": system, "against": ref, "target": minimum, "measured": ratio,
                       "met": ratio >= minimum})
    return checks


def plot(results, path, args):
    """Speed-up of every NAR system over the fastest AR references measured (CTranslate2 where present)."""
    fig = Figure(figsize=(6 * len(results), 4.5))
    axes = fig.subplots(1, len(results), squeeze=False)
    for ax, (device, result) in zip(axes[0], results.items()):
        sizes = sorted(result["batch_sizes"])
        measured = result["batch_sizes"][sizes[0]]["systems"]
        greedy_ref = next(r for r in ("ct2_greedy_int8", "ct2_greedy", "ar_greedy") if r in measured)
        beam_ref = next(r for r in ("ct2_beam_int8", "ct2_beam", "ar_beam") if r in measured)
        for i, nar in enumerate(name for name in measured if name.startswith("nar")):
            for ref, style in ((greedy_ref, "-o"), (beam_ref, "--s")):
                ys = [result["batch_sizes"][bs]["systems"][nar][f"speedup_vs_{ref}"] for bs in sizes]
                ax.plot(sizes, ys, style, color=f"C{i}", label=f"{LABELS[nar]} vs {LABELS[ref]}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel("speed-up (AR time / NAR time)")
        ax.set_title(f"CPU, {args.threads} threads" if device == "cpu" else torch.cuda.get_device_name())
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def engine_versions() -> dict:
    versions = {}
    for module in ("ctranslate2", "onnxruntime"):
        with contextlib.suppress(ImportError):
            versions[module] = __import__(module).__version__
    return versions


def environment(args, devices) -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "sacrebleu": sacrebleu.__version__,
            **engine_versions(),
            "python": platform.python_version(), "threads": args.threads, "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "devices": devices,
            # CTranslate2 picks its CPU kernels once per process from these (see ct2_settings.py)
            "ctranslate2_settings": {k: v for k, v in os.environ.items() if k.startswith("CT2_")},
            "cuda_device": torch.cuda.get_device_name() if "cuda" in devices else None,
            "load_average_at_start": os.getloadavg()}


def describe_setup(args, nar, ar, tokenizer_origin, forced_length) -> dict:
    sizes = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_ffn_dim")
    return {
        "nar": args.nar or "random weights", "ar": args.ar or "random weights",
        "nar_config": {k: getattr(nar.config, k, None) for k in sizes + ("nar_type", "upsample_ratio")},
        "ar_config": {k: getattr(ar.config, k) for k in sizes},
        "parameters": {"nar": sum(p.numel() for p in nar.parameters()), "ar": sum(p.numel() for p in ar.parameters())},
        "tokenizer": tokenizer_origin or "each model's own",
        "attention": {"nar": nar.config._attn_implementation, "ar": ar.config._attn_implementation},
        "source": recorded_path(args.source), "reference": recorded_path(args.reference),
        "sentences": args.sentences,
        "order": f"first n lines, {'sorted by source length' if args.order == 'sorted' else 'in file order'}",
        "warmup_batches": args.warmup, "repeats": args.repeats, "nar_beams": args.nar_beams,
        "beam_token_candidates": args.beam_token_candidates or 2 * args.nar_beams, "ar_beams": args.ar_beams,
        "ar_length": ("forced: min_new_tokens = max_new_tokens = longest reference in the batch (target tokens) + 1"
                      if forced_length else "free: stops at </s>, max_new_tokens = 2 * source length + 10"),
        "nar_cost": "independent of the weights: one forward pass (+ prefix beam search over every valid frame)",
        "timed": ("model.generate (or CTranslate2's translate_batch on the same tokens) only, under "
                  "torch.inference_mode(); median over interleaved repeats"),
    }


def print_header(env, setup, args):
    print(f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu']}, {args.threads} threads, "
          f"devices {env['devices']}, load average {env['load_average_at_start'][0]:.2f}, "
          f"CTranslate2 settings {env['ctranslate2_settings'] or 'default'}")
    if env["load_average_at_start"][0] > 0.5:
        print("note: other jobs are running on this machine; timings are slower and noisier than on an idle one "
              "(cpu_times_s in the JSON shows how much CPU this run got)")
    params = setup["parameters"]
    print(f"NAR: {setup['nar']}, {setup['nar_config']} ({params['nar'] / 1e6:.1f}M parameters)")
    print(f"AR (MarianMTModel): {setup['ar']}, {setup['ar_config']} ({params['ar'] / 1e6:.1f}M parameters)")
    print(f"vocabulary: {setup['tokenizer']}; attention: {setup['attention']}")
    print(f"AR length: {setup['ar_length']}.\nNAR cost: {setup['nar_cost']}.")
    print(f"sentences: {setup['order']}; warm-up {args.warmup} batches, {args.repeats} interleaved repeats, medians")


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "auto" and torch.cuda.is_available() else [args.device.replace("auto", "cpu")]
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    shared, tokenizer_origin = None, None
    if not (args.nar and args.ar) or args.tokenizer:  # random models share one vocabulary
        shared, tokenizer_origin = shared_tokenizer(args)
    tokenizers = {"nar": model_tokenizer(args.nar, shared), "ar": model_tokenizer(args.ar, shared)}
    sizes = QUICK_SIZES if args.quick else BASE_SIZES
    ar_sizes = (dict(zip(("d_model", "layers", "heads", "ffn"), map(int, args.ar_sizes.split(","))))
                if args.ar_sizes else sizes)
    nar, ar = build_nar(args, sizes, len(tokenizers["nar"])), build_ar(args, ar_sizes, tokenizers["ar"])
    forced_length = not args.ar
    report = {"environment": environment(args, devices),
              "setup": describe_setup(args, nar, ar, tokenizer_origin, forced_length), "results": {}}
    print_header(report["environment"], report["setup"], args)
    for device in devices:
        print(f"\n=== {device} ===")
        result = report["results"][device] = run_device(args, device, nar, ar, tokenizers, forced_length)
        result["targets"] = check_targets(result, is_base_size(nar.config) and device == "cpu")
        for check in result["targets"]:
            print(f"target batch {check['batch_size']} (NAR {nar.config.encoder_layers}+{nar.config.decoder_layers} "
                  f"layers, ratio {nar.config.upsample_ratio}): {LABELS[check['system']]} >= {check['target']}x "
                  f"{LABELS[check['against']]}: measured {check['measured']:.2f}x -> "
                  f"{'met' if check['met'] else 'NOT met'}")
        for name, score in result.get("bleu", {}).items():
            print(f"BLEU {LABELS[name]}: {score['bleu']:.2f} ({score['sentences']} sentences, {score['signature']})")
    report["environment"]["load_average_at_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report["results"], args.plot, args)
    return report


if __name__ == "__main__":
    main()
