"""Why a vanilla NAR (length prediction) trails CTC here, and what its weak partners change: measurements on a
trained vanilla model (issue 28).

- **Length accuracy**: the length predictor's most probable length against the reference's (in target tokens, `</s>`
  included, as the model is trained): exact, within 1, within 2, and the mean signed error.
- **Oracle length**: BLEU when the decoder runs at each reference's own length, beside BLEU at the predicted length;
  the gap is what wrong lengths cost. A model trained on distilled targets learns the teacher's lengths, not the
  references': with `--teacher_translations` (default: the distillation teacher's beam-5 test translations, committed)
  it is also decoded at the teacher's length (`teacher_length`), and its length accuracy is measured against both.
- **Repetition**: the repeated-token rate of greedy outputs (at the predicted and at the oracle length), and where the
  repeats sit (quarter of the sentence; reference-length bucket).
- **The length beam** (k lengths decoded at once, one candidate each): the k most probable lengths (`top_k`, this
  package's default) or fairseq's window of lengths around the most probable one (`window`: argmax - k//2 ...
  argmax + (k-1)//2), each ranked by: the average token log-probability (`average`, fairseq's and the default), the
  joint log-probability of the output (`joint`: the sum of token log-probabilities plus the length's own),
  the average plus the length's log-probability (`average_plus_length`), a weak AR partner of the last NAR layer
  reading that layer's states (`partner`, a model trained with partners and saved with them), and an AR model's
  average log-probability of the candidate given the source (`teacher`, with `--teacher`: noisy parallel decoding,
  Gu et al. 2018). Each with its BLEU, length ratio, how often it picks a shorter output than greedy, and
  sacreBLEU's paired bootstrap p against greedy; every system's translations are kept.

    python training/evidence/vanilla_diagnostics.py --model runs/study/vanilla_converged/vanilla-seed1/average-... \\
        --run_dir runs/study/vanilla_converged/vanilla-seed1 --json docs/results/vanilla_diagnostics/vanilla-seed1.json

`--model` is a folder loadable by `WeakNATForConditionalGeneration.from_pretrained` with its tokenizer (a study's
`average-*` folder keeps the weak AR decoders; an export has none, so no `partner` ranking). `--run_dir` adds the
repeated-token rate and BLEU of every validation of the run (logged since this tool exists).

    python training/evidence/vanilla_diagnostics.py --summarize docs/results/vanilla_diagnostics

reads every `<arm>-seed<N>.json` there and writes its README.md: each measurement as mean ± std over seeds per arm,
and per seed pair the paired bootstrap p of the second arm against the first on the same system; and greedy BLEU per
reference-length bucket (where the vanilla NAR repeats most, do the partners help more?).
"""

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU

from hf_weaknat import WeakNATForConditionalGeneration
from hf_weaknat.length_prediction import (
    LENGTH_BEAM_RANKINGS, LENGTH_BEAMS, SCORE_RANKINGS, length_beam_lengths, length_beam_scores, model_target_inputs,
    top_lengths,
)
from hf_weaknat.weak_ar import Memory
from training.evaluation import repetition_rate
from training.evidence import MULTI30K, recorded_path
from training.evidence.analyze import read_lines
from training.evidence.study import paired_bootstrap

TEACHER_TRANSLATIONS = Path(__file__).resolve().parents[2] / "docs/results/study/teacher_test_beam5.json"
RANKINGS = (*LENGTH_BEAM_RANKINGS, "teacher")  # the package's own (the partner's too), and an AR model's
LENGTH_BUCKETS = ((0, 10), (10, 20), (20, None))  # reference tokens (sacreBLEU's 13a words)
SUMMARY_HEADER = """# Vanilla NAR diagnostics, over seeds

Written by `python training/evidence/vanilla_diagnostics.py --summarize docs/results/vanilla_diagnostics` from the
`<arm>-seed<N>.json` files beside it (each written by the same tool with `--model`). Mean ± std over seeds; p: sacreBLEU's
paired bootstrap of the second arm against the first, on the same system and seed. `top_k`/`window`: which lengths the
length beam decodes; after the slash, how its candidates are ranked (`partner`: by the model's last-layer weak
partner; `teacher`: by the AR model each file names as `teacher`); `oracle`: decoded at the reference's length.

"""


class VanillaDecoder:
    """One batch of sources, decoded at any lengths: the encoder runs once, the decoder once per call."""

    def __init__(self, model: WeakNATForConditionalGeneration, input_ids, attention_mask):
        self.model, self.input_ids = model, input_ids
        encoder_outputs, self.source_mask = model.model.encode(input_ids, attention_mask)
        self.encoder_states = encoder_outputs.last_hidden_state
        self.length_logits = model.model.length_predictor(self.encoder_states, self.source_mask)  # (batch, classes)
        self.source_lengths = self.source_mask.sum(1)

    def predicted_lengths(self):
        return top_lengths(self.length_logits, self.source_lengths, self.model.config.max_frames, 1)[0][:, 0]

    def at(self, lengths, layer_states: bool = False) -> dict:
        """Decode at `lengths` (batch * k,) for sentences repeated k times (row-major): the argmax tokens (rows, len)
        right-padded with pad, their log-probabilities (rows, len, vocab), the mask, and with `layer_states` the last
        NAR layer's output (rows, len, d)."""
        k = len(lengths) // len(self.input_ids)
        rows = lambda x: x.repeat_interleave(k, 0)  # noqa: E731
        m = self.model.model
        inputs, mask = model_target_inputs(m, rows(self.source_mask), lengths, rows(self.input_ids))
        decoded = m.decoder(inputs, mask, rows(self.encoder_states), rows(self.source_mask),
                            return_layer_states=layer_states)
        log_probs = F.log_softmax(self.model.decoding_logits(decoded.last_hidden_state).float(), -1)
        tokens = log_probs.argmax(-1).masked_fill(~mask, self.model.config.pad_token_id)
        found = {"tokens": tokens, "log_probs": log_probs, "mask": mask}
        if layer_states:
            found["last_layer"] = decoded.layer_states[-1]
        return found


def token_log_probs(log_probs, tokens, mask):
    """Each row's token log-probabilities summed, and its token count: ((rows,), (rows,))."""
    picked = log_probs.gather(-1, tokens[..., None]).squeeze(-1).masked_fill(~mask, 0.0)
    return picked.sum(1), mask.sum(1)


def teacher_log_probs(teacher, teacher_tokenizer, sources: list[str], texts: list[str]):
    """An AR model's average log-probability of each text given its source (forced decoding) (rows,)."""
    batch = teacher_tokenizer(sources, text_target=texts, padding=True, return_tensors="pt")
    labels = batch["labels"].masked_fill(batch["labels"] == teacher_tokenizer.pad_token_id, -100)
    logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
    mask = labels != -100
    picked = F.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return picked.masked_fill(~mask, 0.0).sum(1) / mask.sum(1).clamp(min=1)


def length_accuracy(predicted: list[int], reference: list[int]) -> dict:
    errors = [p - r for p, r in zip(predicted, reference)]
    count = max(len(errors), 1)
    return {"exact": sum(e == 0 for e in errors) / count, "within_1": sum(abs(e) <= 1 for e in errors) / count,
            "within_2": sum(abs(e) <= 2 for e in errors) / count, "mean_error": sum(errors) / count,
            "too_short": sum(e < 0 for e in errors) / count, "too_long": sum(e > 0 for e in errors) / count}


def length_bucket(reference: str) -> str:
    """The LENGTH_BUCKETS name ("0-10", "10-20", "20-inf") of a reference by its word count."""
    words = len(reference.split())
    return next(f"{low}-{high or 'inf'}" for low, high in LENGTH_BUCKETS if high is None or words <= high)


def repetition_positions(hypotheses: list[str], references: list[str]) -> dict:
    """Where repeated tokens (a token equal to the one before it) sit: share of all repeats in each quarter of their
    sentence, the repeated-token rate per reference-length bucket, and the share of sentences with any repeat."""
    quarters, with_repeat = Counter(), 0
    by_bucket = {f"{low}-{high or 'inf'}": [] for low, high in LENGTH_BUCKETS}
    for hypothesis, reference in zip(hypotheses, references):
        tokens = hypothesis.split()
        repeats = [i for i in range(1, len(tokens)) if tokens[i] == tokens[i - 1]]
        with_repeat += bool(repeats)
        quarters.update(min(4 * i // len(tokens), 3) for i in repeats)
        by_bucket[length_bucket(reference)].append(hypothesis)
    total = sum(quarters.values()) or 1
    return {"share_of_repeats_by_quarter": [quarters[q] / total for q in range(4)],
            "sentences_with_a_repeat": with_repeat / max(len(hypotheses), 1),
            "rate_by_reference_length": {name: repetition_rate(texts) for name, texts in by_bucket.items()}}


def bleu(hypotheses, references) -> dict:
    score = BLEU().corpus_score(hypotheses, [references])
    return {"bleu": score.score, "length_ratio": score.sys_len / max(score.ref_len, 1)}


@torch.no_grad()
def diagnose(model, tokenizer, sources: list[str], references: list[str], num_beams: int = 5, batch_size: int = 64,
             teacher=None, teacher_tokenizer=None, teacher_translations: list[str] | None = None) -> dict:
    """Every measurement of this module's docstring on one model and test set."""
    model.eval()
    target_length = lambda texts: [len(ids) for ids in tokenizer(text_target=texts)["input_ids"]]  # noqa: E731
    oracles = {"oracle": target_length(references)}  # decoded at these lengths, each a system
    if teacher_translations is not None:
        oracles["teacher_length"] = target_length(teacher_translations)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    rankings = [r for r in RANKINGS if (r != "partner" or model.weak_ar is not None) and (r != "teacher" or teacher)]
    texts = {"greedy": [""] * len(sources), **{name: [""] * len(sources) for name in oracles},
             **{f"{c}/{r}": [""] * len(sources) for c in LENGTH_BEAMS for r in rankings}}
    chosen_lengths = {key: [0] * len(sources) for key in texts}
    predicted = [0] * len(sources)
    decode = lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer([sources[i] for i in chunk], padding=True, truncation=True,
                          max_length=model.config.max_position_embeddings, return_tensors="pt")
        decoder = VanillaDecoder(model, batch["input_ids"], batch["attention_mask"])
        lengths = decoder.predicted_lengths()
        fixed = {name: torch.tensor([min(known[i], model.config.max_frames) for i in chunk])
                 for name, known in oracles.items()}
        for key, at in (("greedy", lengths), *fixed.items()):
            found = decoder.at(at)
            for i, text, length in zip(chunk, decode(found["tokens"]), at.tolist()):
                texts[key][i], chosen_lengths[key][i] = text.strip(), length
        for i, length in zip(chunk, lengths.tolist()):
            predicted[i] = length
        for how in LENGTH_BEAMS:
            candidates, length_scores = length_beam_lengths(decoder.length_logits, decoder.source_lengths,
                                                            model.config.max_frames, num_beams, how)
            found = decoder.at(candidates.flatten(), layer_states="partner" in rankings)
            sums, counts = token_log_probs(found["log_probs"], found["tokens"], found["mask"])
            candidate_texts = [t.strip() for t in decode(found["tokens"])]
            scores = {name: length_beam_scores(sums, counts, length_scores.flatten(), name)
                      for name in SCORE_RANKINGS}
            if "partner" in rankings:  # as generate(length_beam_ranking="partner") ranks
                last = Memory(model.config.decoder_layers - 1, found["last_layer"], found["mask"])
                scores["partner"] = model.weak_ar.sequence_log_probs(found["tokens"], found["mask"], last,
                                                                     model.model.shared)
            if "teacher" in rankings:
                repeated_sources = [sources[i] for i in chunk for _ in range(num_beams)]
                scores["teacher"] = teacher_log_probs(teacher, teacher_tokenizer, repeated_sources, candidate_texts)
            for ranking in rankings:
                best = scores[ranking].view(len(chunk), num_beams).masked_fill(
                    ~torch.isfinite(length_scores), float("-inf")).argmax(1)
                for row, (i, b) in enumerate(zip(chunk, best.tolist())):
                    texts[f"{how}/{ranking}"][i] = candidate_texts[row * num_beams + b]
                    chosen_lengths[f"{how}/{ranking}"][i] = int(candidates[row, b])
    greedy_lengths = chosen_lengths["greedy"]
    systems = {}
    for key, hypotheses in texts.items():
        systems[key] = {**bleu(hypotheses, references), "repetition_rate": repetition_rate(hypotheses),
                        "shorter_than_greedy": sum(c < g for c, g in zip(chosen_lengths[key], greedy_lengths)),
                        "longer_than_greedy": sum(c > g for c, g in zip(chosen_lengths[key], greedy_lengths))}
        if key != "greedy":  # sacreBLEU's paired bootstrap against greedy decoding of the same model
            systems[key]["p_vs_greedy"] = paired_bootstrap(references, texts["greedy"], hypotheses)
    decoded_once = ("greedy", *oracles)
    return {"sentences": len(sources), "num_beams": num_beams,
            "length_accuracy": length_accuracy(predicted, oracles["oracle"]),
            **({"length_accuracy_vs_teacher": length_accuracy(predicted, oracles["teacher_length"])}
               if "teacher_length" in oracles else {}),
            "systems": systems,
            "repetition": {key: repetition_positions(texts[key], references) for key in decoded_once},
            "translations": texts}


def validation_curve(run_dir: Path) -> list[dict]:
    """BLEU and the repeated-token rate of each validation the run logged (runs trained before validation logged
    the rate have BLEU only)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "bleu", "repetition_rate") if k in r}
            for r in records if r["split"] == "validation"]


def arm_and_seed(path: Path) -> tuple[str, int]:
    """`vanilla_weak_ar-seed2.json` -> ("vanilla_weak_ar", 2)."""
    arm, _, seed = path.stem.rpartition("-seed")
    if not arm or not seed.isdigit():
        raise ValueError(f"{path.name}: a diagnostics file to summarize is named <arm>-seed<N>.json")
    return arm, int(seed)


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """mean ± std over seeds (the std left out for a single seed)."""
    mean = scale * statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


SUMMARY_ROWS = (  # (label, what to read from one result): what the issue asks the verdict to show
    ("length accuracy vs the reference: exact (%)", lambda r: 100 * r["length_accuracy"]["exact"]),
    ("length accuracy vs the reference: within 1 (%)", lambda r: 100 * r["length_accuracy"]["within_1"]),
    ("length accuracy vs the reference: within 2 (%)", lambda r: 100 * r["length_accuracy"]["within_2"]),
    ("length error vs the reference (tokens)", lambda r: r["length_accuracy"]["mean_error"]),
    ("length accuracy vs the teacher: exact (%)", lambda r: 100 * r["length_accuracy_vs_teacher"]["exact"]),
    ("length accuracy vs the teacher: within 1 (%)", lambda r: 100 * r["length_accuracy_vs_teacher"]["within_1"]),
    ("repeats in the third quarter of the sentence (% of repeats)",
     lambda r: 100 * r["repetition"]["greedy"]["share_of_repeats_by_quarter"][2]),
    ("sentences with a repeat (%)", lambda r: 100 * r["repetition"]["greedy"]["sentences_with_a_repeat"]),
)


def summarize(folder: Path, references: list[str]) -> str:
    """The markdown table of every `<arm>-seed<N>.json` in `folder` (see the module docstring)."""
    results: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("*-seed*.json")):
        arm, seed = arm_and_seed(path)
        results.setdefault(arm, {})[seed] = json.loads(path.read_text())
    if not results:
        raise SystemExit(f"{folder} holds no <arm>-seed<N>.json diagnostics")
    arms = sorted(results, key=len)  # the baseline (the shorter name, "vanilla") first
    paired = sorted(set.intersection(*(set(results[a]) for a in arms))) if len(arms) == 2 else []
    header = ["on test2016"] + [f"{arm} (seeds {', '.join(map(str, sorted(results[arm])))})" for arm in arms]
    header += [f"p, seed {seed}" for seed in paired]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, read in SUMMARY_ROWS:
        cells = []
        for arm in arms:
            try:
                cells.append(spread([read(r) for r in results[arm].values()], digits=1 if "%" in label else 2))
            except KeyError:
                cells.append("—")
        lines.append("| " + " | ".join([label, *cells] + [""] * len(paired)) + " |")
    systems = [key for arm in arms for r in results[arm].values() for key in r["systems"]]
    for system in dict.fromkeys(systems):  # in order of first appearance
        cells = []
        for arm in arms:
            found = [r["systems"][system] for r in results[arm].values() if system in r["systems"]]
            cells.append(f"{spread([f['bleu'] for f in found])} ({spread([f['repetition_rate'] for f in found], 100, 1)}%)"
                         if found else "—")
        for seed in paired:  # the second arm against the first, on the same system and seed
            pair = [results[arm][seed] for arm in arms]
            both = all(system in r["translations"] for r in pair)
            cells.append(f"{paired_bootstrap(references, *(r['translations'][system] for r in pair)):.3f}"
                         if both else "")
        lines.append(f"| BLEU (repeated tokens), {system} | " + " | ".join(cells) + " |")
    # where the vanilla NAR repeats most (long sentences), does the partner help more? greedy BLEU per length bucket
    buckets = {}
    for i, reference in enumerate(references):
        buckets.setdefault(length_bucket(reference), []).append(i)
    for name, indices in sorted(buckets.items(), key=lambda item: int(item[0].split("-")[0])):
        pick = lambda texts: [texts[i] for i in indices]  # noqa: E731
        cells = [spread([bleu(pick(r["translations"]["greedy"]), pick(references))["bleu"]
                         for r in results[arm].values()]) for arm in arms]
        for seed in paired:
            greedy = [pick(results[arm][seed]["translations"]["greedy"]) for arm in arms]
            cells.append(f"{paired_bootstrap(pick(references), *greedy):.3f}")
        lines.append(f"| greedy BLEU, references of {name} words ({len(indices)} sentences) | " + " | ".join(cells)
                     + " |")
    if paired:
        lines += ["", f"Each arm at its best ranking: {arms[1]} ranked by its partner against {arms[0]} ranked "
                  "without a second model (joint) and by the AR teacher:", "",
                  "| systems | Δ BLEU | " + " | ".join(f"p, seed {seed}" for seed in paired) + " |",
                  "|" + "---|" * (2 + len(paired))]
        for ours, theirs in (("top_k/partner", "top_k/joint"), ("top_k/partner", "top_k/teacher")):
            pairs = [(results[arms[1]][seed], results[arms[0]][seed]) for seed in paired]
            if not all(ours in a["translations"] and theirs in b["translations"] for a, b in pairs):
                continue
            gains = [a["systems"][ours]["bleu"] - b["systems"][theirs]["bleu"] for a, b in pairs]
            p_values = [f"{paired_bootstrap(references, b['translations'][theirs], a['translations'][ours]):.3f}"
                        for a, b in pairs]
            lines.append(f"| {arms[1]} {ours} vs {arms[0]} {theirs} | {spread(gains)} | " + " | ".join(p_values)
                         + " |")
    lines += default_ranking_table(results, arms, references)
    return "\n".join(lines) + "\n"


def default_ranking_table(results: dict, arms: list[str], references: list[str]) -> list[str]:
    """The evidence for the length beam's default ranking (`length_beam_ranking`): each run ranked by joint against
    the same run ranked by average, on the same candidates, for each way of picking the lengths."""
    lines = ["", "The default ranking: joint against average, within each run (Δ BLEU, p):", "",
             "| run | " + " | ".join(f"{lengths}: joint − average" for lengths in ("top_k", "window")) + " |",
             "|---|---|---|"]
    for arm in arms:
        for seed, r in sorted(results[arm].items()):
            cells = []
            for lengths in ("top_k", "window"):
                joint, average = f"{lengths}/joint", f"{lengths}/average"
                if not all(name in r["translations"] for name in (joint, average)):
                    cells.append("—")
                    continue
                gain = r["systems"][joint]["bleu"] - r["systems"][average]["bleu"]
                p_value = paired_bootstrap(references, r["translations"][average], r["translations"][joint])
                cells.append(f"{gain:+.2f} ({p_value:.3f})")
            lines.append(f"| {arm} seed {seed} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a vanilla WeakNAT folder with its tokenizer")
    p.add_argument("--summarize", metavar="FOLDER", help="instead: the table of the <arm>-seed<N>.json files there, "
                   "written to its README.md")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --model's)")
    p.add_argument("--run_dir", help="the run it comes from: adds the validation curve of repetition and BLEU")
    p.add_argument("--teacher", help="an AR seq2seq model folder (with its tokenizer) to rank length-beam candidates")
    p.add_argument("--teacher_translations", default=str(TEACHER_TRANSLATIONS),
                   help="the distillation teacher's translations of --source (a JSON with `translations`, or one per "
                        "line): decode at their lengths too; '' for none")
    p.add_argument("--source", default=str(MULTI30K / "test.de"))
    p.add_argument("--reference", default=str(MULTI30K / "test.en"))
    p.add_argument("--sentences", type=int, default=None, help="only the first N test sentences")
    p.add_argument("--num_beams", type=int, default=5, help="lengths in the length beam")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)
    if args.summarize:
        table = summarize(Path(args.summarize), read_lines(args.reference, args.sentences))
        (Path(args.summarize) / "README.md").write_text(SUMMARY_HEADER + table)
        print(table)
        return table
    if not args.model:
        p.error("--model (or --summarize) is required")
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = WeakNATForConditionalGeneration.from_pretrained(args.model)
    if model.config.nar_type != "vanilla":
        raise SystemExit(f"{args.model} is a {model.config.nar_type} model; this tool diagnoses vanilla NAR models")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    teacher = teacher_tokenizer = None
    if args.teacher:
        teacher = AutoModelForSeq2SeqLM.from_pretrained(args.teacher).eval()
        teacher_tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    sources, references = read_lines(args.source, args.sentences), read_lines(args.reference, args.sentences)
    teacher_translations = None
    if args.teacher_translations:
        path = Path(args.teacher_translations)
        teacher_translations = (json.loads(path.read_text())["translations"][:len(sources)] if path.suffix == ".json"
                                else read_lines(path, args.sentences))
        if len(teacher_translations) != len(sources):
            raise SystemExit(f"{path} has {len(teacher_translations)} translations for {len(sources)} sources")
    result = {"model": recorded_path(args.model), "teacher": args.teacher and recorded_path(args.teacher),
              "test_references": recorded_path(args.reference),
              "teacher_translations": teacher_translations and recorded_path(args.teacher_translations),
              **diagnose(model, tokenizer, sources, references, args.num_beams, args.batch_size, teacher,
                         teacher_tokenizer, teacher_translations)}
    if args.run_dir:
        result["validation"] = validation_curve(Path(args.run_dir))
    for name, against in (("length_accuracy", "reference"), ("length_accuracy_vs_teacher", "teacher")):
        if name in result:
            accuracy = result[name]
            print(f"length accuracy against the {against}: exact {100 * accuracy['exact']:.1f}%, within 1 "
                  f"{100 * accuracy['within_1']:.1f}%, within 2 {100 * accuracy['within_2']:.1f}%, mean error "
                  f"{accuracy['mean_error']:+.2f} tokens")
    for key, system in result["systems"].items():
        print(f"{key:32s} BLEU {system['bleu']:6.2f}  length ratio {system['length_ratio']:.3f}  repeated tokens "
              f"{100 * system['repetition_rate']:5.2f}%  shorter/longer than greedy {system['shorter_than_greedy']}/"
              f"{system['longer_than_greedy']}" + (f"  p vs greedy {system['p_vs_greedy']:.3f}" if key != "greedy" else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
