"""Make the shipped model from a training run: average its last checkpoints, measure what half-precision weights
cost, and write the export folder that `push_export_to_hub` would publish.

    python training/evidence/ship_model.py --run_dir runs/study/weak_ar_shapes/deep_shallow-seed1 --up_to 4000 \\
        --output_dir models/weaknat-multi30k-de-en --weights_dtype float16 --card_notes training/evidence/shipped_card.md

1. Averages the run's `--last` complete checkpoints at or before update `--up_to`.
2. Exports the average twice, with float32 weights and with `--weights_dtype` weights (which load as float32: what a
   user of the folder runs), and translates the test split with each, greedy and beam 5: BLEU, chrF, repeated
   tokens, and how many sentences the two translate differently.
3. Writes `--output_dir` (the export with `--weights_dtype`, or float32 with `--weights_dtype float32`): the card
   of `training/export.py` with `--card_notes` appended (a Markdown file whose `{greedy_bleu}`-style fields are
   filled from these measurements), and `eval_results.json` holding every score measured here, among them the
   greedy BLEU of the first 200 test sentences (the quality guard of `tests/test_shipped_model.py`).
Every number goes to `--json` as well.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from sacrebleu.metrics import BLEU

from training import export as export_script
from training.average_checkpoints import average_checkpoints
from training.checkpoints import CHECKPOINT_NAME, complete_checkpoints
from training.evidence import recorded_path
from training.evidence.analyze import analyze, read_lines, translate
from training.records import plot_learning_curve
from training.run_lock import own_run_folder

GUARD_SENTENCES = 200


def last_checkpoints(run_dir: Path, last: int, up_to: int | None) -> list[Path]:
    found = [c for c in complete_checkpoints(run_dir / "checkpoints")
             if up_to is None or int(CHECKPOINT_NAME.match(c.name)[1]) <= up_to]
    if len(found) < last:
        raise FileNotFoundError(f"{run_dir} has {len(found)} complete checkpoints up to {up_to}; {last} asked for")
    return found[-last:]


def measure(model_dir: Path, sources: list[str], references: list[str], num_beams: int) -> dict:
    scores = {}
    for name, beams in (("greedy", 1), (f"beam{num_beams}", num_beams)):
        translations = translate(model_dir, sources, num_beams=beams)
        report = analyze(translations, references)
        scores[name] = {k: report[k] for k in ("bleu", "bleu_signature", "chrf", "chrf_signature", "repetition_rate")}
        scores[name]["translations"] = translations
    scores[f"greedy_first{GUARD_SENTENCES}_bleu"] = BLEU().corpus_score(
        scores["greedy"]["translations"][:GUARD_SENTENCES], [references[:GUARD_SENTENCES]]).score
    return scores


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", required=True, type=Path)
    p.add_argument("--last", type=int, default=5, help="average this many newest checkpoints")
    p.add_argument("--up_to", type=int, help="only checkpoints at or before this update")
    p.add_argument("--output_dir", required=True, type=Path)
    p.add_argument("--weights_dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--shown_as", help="the name the card loads the model by (default: --output_dir)")
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--card_notes", type=Path, help="Markdown appended to the card; {name} fields are filled")
    p.add_argument("--json", type=Path, help="write every measurement here")
    args = p.parse_args(argv)

    with own_run_folder(args.run_dir, "training/evidence/ship_model.py"):  # not while a run trains there
        return ship(args)


def ship(args) -> Path:
    checkpoints = last_checkpoints(args.run_dir, args.last, args.up_to)
    steps = [int(CHECKPOINT_NAME.match(c.name)[1]) for c in checkpoints]
    print(f"averaging checkpoints {steps}", flush=True)
    averaged = average_checkpoints(checkpoints, args.run_dir / f"average-{steps[0]}-{steps[-1]}")
    # the curve the card shows, drawn from the run's records now: a run stopped before its max_steps drew none
    plot_learning_curve(args.run_dir / "metrics.jsonl", args.run_dir / "learning_curve.png")
    data = json.loads((args.run_dir / "run_args.json").read_text())["data"]
    split = Path(data["dataset"]) / data["test_split"]
    sources = read_lines(f"{split}.{data['source_lang']}")
    references = read_lines(f"{split}.{data['target_lang']}")

    args.output_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".ship-", dir=args.output_dir.parent))
    try:
        exports, measured = {}, {}
        for dtype in dict.fromkeys(("float32", args.weights_dtype)):
            exports[dtype] = export_script.main(["--run_dir", str(args.run_dir), "--checkpoint", str(averaged),
                                                 "--output_dir", str(scratch / dtype / args.output_dir.name),
                                                 "--shown_as", args.shown_as or str(args.output_dir),
                                                 "--steps", str(steps[-1]),
                                                 *(["--weights_dtype", dtype] if dtype != "float32" else [])])
            measured[dtype] = measure(exports[dtype], sources, references, args.num_beams)
            print(f"{dtype} weights: greedy BLEU {measured[dtype]['greedy']['bleu']:.2f}, beam {args.num_beams} "
                  f"{measured[dtype][f'beam{args.num_beams}']['bleu']:.2f}", flush=True)
        chosen = measured[args.weights_dtype]
        changed = {name: sum(a != b for a, b in zip(measured["float32"][name]["translations"],
                                                    chosen[name]["translations"]))
                   for name in ("greedy", f"beam{args.num_beams}")}
        print(f"{args.weights_dtype} against float32 weights: {changed} of {len(sources)} test sentences translate "
              "differently", flush=True)
        summary = {
            "run_dir": recorded_path(args.run_dir), "averaged_steps": steps, "weights_dtype": args.weights_dtype,
            "test_references": recorded_path(f"{split}.{data['target_lang']}"), "sentences": len(sources),
            "changed_by_weights_dtype": changed,
            **{f"{dtype}_weights": {name: ({k: v for k, v in s.items() if k != "translations"}
                                           if isinstance(s, dict) else s) for name, s in m.items()}
               for dtype, m in measured.items()},
        }
        folder = exports[args.weights_dtype]
        results = json.loads((folder / "eval_results.json").read_text())
        results.update({"averaged_steps": steps, "weights_dtype": args.weights_dtype,
                        "greedy": summary[f"{args.weights_dtype}_weights"]["greedy"],
                        f"beam{args.num_beams}": summary[f"{args.weights_dtype}_weights"][f"beam{args.num_beams}"],
                        f"greedy_first{GUARD_SENTENCES}_bleu": chosen[f"greedy_first{GUARD_SENTENCES}_bleu"]})
        (folder / "eval_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
        if args.card_notes:
            fields = {"greedy_bleu": f"{chosen['greedy']['bleu']:.2f}",
                      "greedy_chrf": f"{chosen['greedy']['chrf']:.2f}",
                      "beam_bleu": f"{chosen[f'beam{args.num_beams}']['bleu']:.2f}",
                      "beam_chrf": f"{chosen[f'beam{args.num_beams}']['chrf']:.2f}",
                      "float32_greedy_bleu": f"{measured['float32']['greedy']['bleu']:.2f}",
                      "float32_beam_bleu": f"{measured['float32'][f'beam{args.num_beams}']['bleu']:.2f}",
                      "greedy_repeats": f"{100 * chosen['greedy']['repetition_rate']:.2f}%",
                      "changed_greedy": changed["greedy"], "changed_beam": changed[f"beam{args.num_beams}"],
                      "sentences": len(sources), "averaged_steps": ", ".join(map(str, steps)),
                      "first_step": steps[0], "last_step": steps[-1], "guard_sentences": GUARD_SENTENCES,
                      "guard_bleu": f"{chosen[f'greedy_first{GUARD_SENTENCES}_bleu']:.2f}"}
            with open(folder / "README.md", "a", encoding="utf-8") as card:
                card.write("\n\n" + args.card_notes.read_text(encoding="utf-8").format(**fields))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        if args.output_dir.exists():
            shutil.rmtree(args.output_dir)
        folder.rename(args.output_dir)  # the folder appears complete, or not at all
        print(f"wrote {args.output_dir}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return args.output_dir


if __name__ == "__main__":
    main()
