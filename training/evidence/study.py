"""A study: a named grid of runs (variant x seed) of one recipe, each trained, averaged and scored the same way.

    python training/evidence/study.py training/evidence/study_multi30k.yaml --grid ctc_weak_ar     # run what is missing
    python training/evidence/study.py training/evidence/study_multi30k.yaml --grid ctc_weak_ar --report

A grid file names the recipe, where results go, and its grids (see study_multi30k.yaml). One run is train.py with the
recipe, the grid's `flags`, the variant's flags and `--seed`, then the average of the run's last `average_last`
checkpoints up to the grid's `budget` (as the paper averages checkpoints), scored on the test split with greedy and
beam search: sacreBLEU, chrF and the repeated-token rate. The budget defaults to the run's `max_steps`; a run may train
past it (the inverse square root schedule does not depend on the run's length, so the first `budget` updates of a
longer run are a run of `budget` updates); with the `stop_when_flat` flag a run stops itself once its validation BLEU
is flat by the plateau rule (training/convergence.py), and counts the updates it trained. Each finished run leaves ONE
result file, `<results_dir>/<grid>/<variant>-seed<N>.json` (scores, translations, the validation curve with the
partner-dependence diagnostic, wall time, machine); a run whose result file exists is skipped, so a grid can be
finished over several machines: commit the result files, not the checkpoints. `--score_only` scores runs whose
directories are here without training (e.g. after the budget changed).
The same command runs on a GPU (train.py takes the device from accelerate).

The report (`--report`, also written after every run) reads the result files only: mean ± std over seeds per variant,
each variant's difference to the grid's `baseline` with sacreBLEU's paired bootstrap p-value for every seed pair,
where each run's validation BLEU flattened, and three plots (validation BLEU and repeated-token rate of every run;
the partners' dependence on the NAR states).
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from training.average_checkpoints import average_checkpoints
from training.checkpoints import complete_checkpoints
from training.convergence import PLATEAU_GAIN
from training.convergence import plateau_step as convergence_step
from training.evidence import cpu_model, recorded_path
from training.evidence.analyze import analyze, read_lines, translate
from training.records import read_records
from training.run_lock import own_run_folder


def load_grid(grid_file: Path, name: str) -> dict:
    """The grid `name` of a grid file, with the file's shared settings (recipe, directories, scoring) filled in."""
    spec = yaml.safe_load(grid_file.read_text())
    grids = spec.get("grids") or {}
    if name not in grids:
        raise ValueError(f"{grid_file} has no grid {name!r}; it has {sorted(grids)}")
    grid = {"average_last": 5, "num_beams": 5, "test_split": "test", "test_sentences": None, **{k: v for k, v in spec.items() if k != "grids"},
            "flags": {}, "baseline": None, **grids[name], "name": name}
    if grid["baseline"] is not None and grid["baseline"] not in grid["variants"]:
        raise ValueError(f"grid {name!r}: baseline {grid['baseline']!r} is not one of its variants")
    return grid


def result_path(grid: dict, variant: str, seed: int) -> Path:
    if same_run(grid, variant):
        other_grid, other_variant = same_run(grid, variant).split("/")
        return Path(grid["results_dir"]) / other_grid / f"{other_variant}-seed{seed}.json"
    return Path(grid["results_dir"]) / grid["name"] / f"{variant}-seed{seed}.json"


def flag_arguments(flags: dict) -> list[str]:
    """{name: value} -> ['--name', 'value', ...], booleans as true/false."""
    arguments = []
    for name, value in flags.items():
        arguments += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return arguments


def train_command(grid: dict, variant: str, seed: int, run_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "training.train", grid["recipe"], "--output_dir", str(run_dir), "--seed", str(seed),
               *flag_arguments({**grid["flags"], **(grid["variants"][variant] or {})})]
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        command += ["--resume_from_checkpoint", "latest"]  # a run interrupted on this machine continues
    return command


def machine() -> dict:
    """Where the run trained: wall times are comparable only between runs on the same kind of host."""
    import torch

    return {"processor": cpu_model(), "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def budget(grid: dict) -> int | None:
    """The updates each run of the grid counts: `budget` (a run may train past it: its checkpoints up to the budget
    are the ones scored, as the learning-rate schedule does not depend on the run's length), else `max_steps`."""
    return grid.get("budget") or grid["flags"].get("max_steps")


def run_budget(grid: dict, run_dir: Path) -> int | None:
    """The updates this run counts: the grid's budget, or where the run stopped itself on a flat validation curve
    (the `stop_when_flat` flag) if that came first and the run did not go on after it."""
    limit = budget(grid)
    metrics = run_dir / "metrics.jsonl"
    records = read_records(metrics) if metrics.is_file() else []
    stops = [i for i, r in enumerate(records) if r["split"] == "stopped" and r.get("reason") == "validation BLEU flat"]
    if stops and not any(r["split"] == "train" for r in records[stops[-1] + 1:]):
        stopped_at = records[stops[-1]]["step"]
        return stopped_at if limit is None else min(limit, stopped_at)
    return limit


def scored_checkpoints(grid: dict, run_dir: Path) -> list[Path]:
    """The run's last `average_last` complete checkpoints at or before its budget (`run_budget`)."""
    limit = run_budget(grid, run_dir)
    found = [c for c in complete_checkpoints(run_dir / "checkpoints")
             if limit is None or int(c.name.split("-")[-1]) <= limit]
    if not found or (limit is not None and int(found[-1].name.split("-")[-1]) != limit):
        raise RuntimeError(f"{run_dir} has no checkpoint at the budget of {limit} updates (found "
                           f"{[c.name for c in found]}): train it further before scoring")
    return found[-grid["average_last"]:]


def score_run(grid: dict, run_dir: Path) -> dict:
    """Average the run's last checkpoints (up to the budget) and score the average on the test split, greedy and
    with beam search."""
    with own_run_folder(run_dir, "training/evidence/study.py (scoring)"):  # not while a run trains there
        checkpoints = scored_checkpoints(grid, run_dir)
        steps = [int(c.name.split("-")[-1]) for c in checkpoints]
        averaged = average_checkpoints(checkpoints, run_dir / f"average-{steps[0]}-{steps[-1]}")
        shutil.copytree(run_dir / "tokenizer", averaged, dirs_exist_ok=True)
    data = json.loads((run_dir / "run_args.json").read_text())["data"]
    split = Path(data["dataset"]) / grid["test_split"]
    sources = read_lines(f"{split}.{data['source_lang']}", grid["test_sentences"])
    references = read_lines(f"{split}.{data['target_lang']}", grid["test_sentences"])
    scores = {}
    for name, beams in (("greedy", 1), (f"beam{grid['num_beams']}", grid["num_beams"])):
        translations = translate(averaged, sources, num_beams=beams)
        report = analyze(translations, references)
        scores[name] = {k: report[k] for k in ("bleu", "bleu_signature", "chrf", "chrf_signature", "repetition_rate")}
        scores[name]["translations"] = translations
    return {"averaged_steps": steps, "test_references": recorded_path(f"{split}.{data['target_lang']}"), **scores}


def curves(run_dir: Path) -> dict:
    """The run's validation records (BLEU, loss, repeated-token rate, partner dependence) and its training loss every
    logged step."""
    records = read_records(run_dir / "metrics.jsonl")
    keep = ("step", "bleu", "chrf", "loss", "repetition_rate", "partner_loss_own", "partner_loss_other", "partner_gap",
            "partner_gap_by_layer")
    validation = [{k: r[k] for k in keep if k in r} for r in records if r["split"] == "validation"]
    train = [{k: r.get(k) for k in ("step", "loss", "ctc_loss", "ar_loss")} for r in records if r["split"] == "train"]
    return {"validation": validation, "train": train}


def run_one(grid: dict, variant: str, seed: int, train: bool = True) -> Path:
    """Train the run (unless `train` is False: score what its directory holds) and write its result file."""
    run_dir = Path(grid["runs_dir"]) / grid["name"] / f"{variant}-seed{seed}"
    if train:
        command = train_command(grid, variant, seed, run_dir)
        print(f"[study] {grid['name']} / {variant} / seed {seed}: {' '.join(command[1:])}", flush=True)
        train_in_child(command)
    wall_time = wall_time_to_budget(grid, run_dir)
    trained = json.loads((run_dir / "run_args.json").read_text())["training"]["max_steps"]
    result = {"grid": grid["name"], "variant": variant, "seed": seed, "recipe": grid["recipe"],
              "flags": {**grid["flags"], **(grid["variants"][variant] or {})}, "budget": run_budget(grid, run_dir),
              "trained_max_steps": trained,
              "train_wall_time_s": None if wall_time is None else round(wall_time), "machine": machine(),
              **curves(run_dir), "test": score_run(grid, run_dir)}
    path = result_path(grid, variant, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    partial.replace(path)  # a result file exists only once complete
    print(f"[study] wrote {path} (greedy BLEU {result['test']['greedy']['bleu']:.2f}, "
          + (f"{wall_time / 60:.0f} min to the budget)" if wall_time is not None else "resumed: no wall time)"))
    return path


def train_in_child(command: list[str]) -> None:
    """Run a training command in a child process that does not outlive the study: a study stopped by a signal
    (kill, Ctrl-C, the end of a session) stops its training too, rather than leave it writing into the run
    directory that a restarted study would train in again."""
    child = subprocess.Popen(command)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so `finally` runs
    try:
        returncode = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if child.poll() is None:
            child.terminate()
            child.wait()
    if returncode != 0:
        raise subprocess.CalledProcessError(returncode, command)


def was_resumed(run_dir: Path) -> bool:
    """Did the run train in more than one go: stopped by a signal and continued, or its updates logged twice (a
    resume from an earlier checkpoint after a kill)?"""
    records = read_records(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records if r["split"] == "train"]
    return (any(r["split"] == "stopped" and "signal" in r for r in records)
            or any(later <= earlier for earlier, later in zip(steps, steps[1:])))


def wall_time_to_budget(grid: dict, run_dir: Path) -> float | None:
    """Seconds from the run's start (its `run_args.json`) to its checkpoint at the budget (that checkpoint's
    `trainer_state.json`, written last), validations and saving included; None for a run that was resumed (its
    `run_args.json` is rewritten at each start, and the load on the machine differed between its parts)."""
    if was_resumed(run_dir):
        return None
    checkpoint = scored_checkpoints(grid, run_dir)[-1]
    return (checkpoint / "trainer_state.json").stat().st_mtime - (run_dir / "run_args.json").stat().st_mtime


def plateau_step(validation: list[dict], gain: float = PLATEAU_GAIN) -> int | None:
    """Where a run's validation BLEU flattened (convergence.py's rule); None while it is still climbing."""
    return convergence_step([(record["step"], record["bleu"]) for record in validation], gain)


def validation_at_budget(result: dict) -> list[dict]:
    """A result's validation records up to its budget (a run may have trained past it)."""
    limit = result.get("budget")
    return [v for v in result["validation"] if limit is None or v["step"] <= limit]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation; one run has no spread to report (None, not 0)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def paired_bootstrap(references: list[str], baseline: list[str], system: list[str], samples: int = 1000) -> float:
    """sacreBLEU's paired bootstrap resampling p-value of `system` against `baseline` (BLEU); 1.0 for identical
    translations, where sacreBLEU's test would return its smallest p (no resample differs from the observed 0)."""
    if list(system) == list(baseline):
        return 1.0
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    test = PairedTest([("baseline", baseline), ("system", system)], {"BLEU": BLEU()}, [references], test_type="bs",
                      n_samples=samples)
    return float(test()[1]["BLEU"][1].p_value)


def same_run(grid: dict, variant: str) -> str | None:
    """`other_grid/variant` when this variant is declared the same run as another grid's (`same_as`): its result
    files are read from there and nothing is trained twice."""
    return (grid["variants"][variant] or {}).get("same_as")


def load_results(grid: dict) -> dict[str, dict[int, dict]]:
    """{variant: {seed: result}} of the result files present."""
    found = {}
    for variant in grid["variants"]:
        for seed in grid["seeds"]:
            path = result_path(grid, variant, seed)
            if path.is_file():
                found.setdefault(variant, {})[seed] = json.loads(path.read_text())
    return found


def summarize(grid: dict, results: dict) -> dict:
    """Per variant: scores as mean ± std over seeds; against the baseline: the difference and per-seed p-values."""
    beam = f"beam{grid['num_beams']}"
    summary = {"grid": grid["name"], "baseline": grid["baseline"], "variants": {}}
    for variant, runs in results.items():
        row = {"seeds": sorted(runs), "plateau_step": {s: plateau_step(r["validation"]) for s, r in runs.items()},
               "updates": [r["budget"] for r in runs.values()],
               "train_wall_time_min": [None if r["train_wall_time_s"] is None else round(r["train_wall_time_s"] / 60)
                                       for r in runs.values()]}
        for decoding in ("greedy", beam):
            for metric in ("bleu", "chrf", "repetition_rate"):
                row[f"{decoding}_{metric}"] = mean_std([r["test"][decoding][metric] for r in runs.values()])
        gaps = [validation_at_budget(r)[-1].get("partner_gap") for r in runs.values()]
        row["final_partner_gap"] = mean_std(gaps) if None not in gaps else None
        base_runs = results.get(grid["baseline"], {}) if variant != grid["baseline"] else {}
        if base_runs:
            row["p_values_greedy"] = {}
            for seed in sorted(set(runs) & set(base_runs)):
                test = runs[seed]["test"]["greedy"]
                references = read_lines(runs[seed]["test"]["test_references"], len(test["translations"]))
                row["p_values_greedy"][seed] = paired_bootstrap(
                    references, base_runs[seed]["test"]["greedy"]["translations"], test["translations"])
            for decoding in ("greedy", beam):
                row[f"{decoding}_bleu_difference"] = (row[f"{decoding}_bleu"][0]
                                                      - mean_std([r["test"][decoding]["bleu"]
                                                                  for r in base_runs.values()])[0])
        summary["variants"][variant] = row
    return summary


def pm(pair: tuple[float, float | None], scale: float = 1.0) -> str:
    return f"{pair[0] * scale:.2f}" if pair[1] is None else f"{pair[0] * scale:.2f} ± {pair[1] * scale:.2f}"


def flat_at(step: int | None) -> str:
    return "not flat" if step is None else str(step)


def markdown(grid: dict, summary: dict) -> str:
    beam = f"beam{grid['num_beams']}"
    length = (f"up to {budget(grid)} updates per run, each stopping once its validation BLEU is flat (`stop_when_flat`)"
              if grid["flags"].get("stop_when_flat") else f"{budget(grid)} updates per run")
    lines = [f"# Study `{grid['name']}`", "", f"Recipe `{grid['recipe']}` with flags `{grid['flags']}`, {length}; test split "
             f"scored with the average of each run's last {grid['average_last']} checkpoints. Mean ± std over seeds (the mean alone for one seed); "
             f"p: sacreBLEU paired bootstrap (1000 resamples) of greedy BLEU against `{grid['baseline']}`, same seed.",
             "", f"| variant | seeds | greedy BLEU | {beam} BLEU | greedy chrF | repeated tokens (greedy) | Δ greedy BLEU "
             f"| p per seed | validation flat at step | updates | train min |", "|" + "---|" * 11]
    for variant, row in summary["variants"].items():
        difference = f"{row['greedy_bleu_difference']:+.2f}" if "greedy_bleu_difference" in row else "—"
        p_values = ", ".join(f"{p:.3f}" for p in row.get("p_values_greedy", {}).values()) or "—"
        lines.append(f"| {variant} | {len(row['seeds'])} | {pm(row['greedy_bleu'])} | {pm(row[f'{beam}_bleu'])} | "
                     f"{pm(row['greedy_chrf'])} | {pm(row['greedy_repetition_rate'], 100)}% | {difference} | "
                     f"{p_values} | {', '.join(flat_at(s) for s in row['plateau_step'].values())} | "
                     f"{', '.join(str(n) for n in row.get('updates', []))} | "
                     f"{', '.join('resumed' if m is None else str(m) for m in row['train_wall_time_min'])} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, key: str, ylabel: str, path: Path, budget_step: int | None = None) -> Path | None:
    """One line per run of the validation records' `key` against the step (a dotted line at the budget)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    colors = {variant: f"C{i}" for i, variant in enumerate(results)}
    drawn = False
    for variant, runs in results.items():
        for seed, run in sorted(runs.items()):
            points = [(r["step"], r[key]) for r in run["validation"] if r.get(key) is not None]
            if points:
                axes.plot(*zip(*points), color=colors[variant], alpha=0.8, label=f"{variant} seed {seed}")
                drawn = True
    if not drawn:
        return None
    if budget_step is not None:
        axes.axvline(budget_step, color="gray", linestyle=":", label=f"budget ({budget_step} updates)")
    axes.set_xlabel("update")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def bleu_difference_curves(results: dict, baseline: str) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """{variant: {seed: [(step, validation BLEU - the baseline's at that step)]}} for each run whose baseline run of
    the same seed exists."""
    curves_found = {}
    for variant, runs in results.items():
        for seed, run in runs.items():
            base = results.get(baseline, {}).get(seed)
            if variant == baseline or base is None:
                continue
            base_bleu = {r["step"]: r["bleu"] for r in base["validation"]}
            points = [(r["step"], r["bleu"] - base_bleu[r["step"]]) for r in run["validation"]
                      if r["step"] in base_bleu]
            curves_found.setdefault(variant, {})[seed] = points
    return curves_found


def plot_partner_dependence(results: dict, baseline: str, path: Path, budget_step: int | None = None) -> Path | None:
    """Two panels on one step axis: the partners' dependence on the NAR states (loss reading another sentence's
    states minus their own, nats/token) and the same-seed validation BLEU difference to the baseline, so the
    mechanism can be read against what it buys."""
    from matplotlib.figure import Figure

    gaps = {v: {s: [(r["step"], r["partner_gap"]) for r in run["validation"] if r.get("partner_gap") is not None]
                for s, run in runs.items()} for v, runs in results.items()}
    if not any(points for runs in gaps.values() for points in runs.values()):
        return None
    differences = bleu_difference_curves(results, baseline)
    figure = Figure(figsize=(7, 6))
    top, bottom = figure.subplots(2, 1, sharex=True)
    colors = {variant: f"C{i}" for i, variant in enumerate(results)}
    for axes, series in ((top, gaps), (bottom, differences)):
        for variant, runs in series.items():
            for seed, points in sorted(runs.items()):
                if points:
                    axes.plot(*zip(*points), color=colors[variant], marker=".", alpha=0.8,
                              label=f"{variant} seed {seed}")
        if budget_step is not None:
            axes.axvline(budget_step, color="gray", linestyle=":")
        axes.grid(alpha=0.3)
    top.set_ylabel("partner loss: other - own\n(nats/token)")
    bottom.axhline(0.0, color="black", linewidth=0.8)
    bottom.set_ylabel(f"validation BLEU\nminus {baseline} (same seed)")
    bottom.set_xlabel("update")
    top.legend(fontsize=7)
    if differences:
        bottom.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def report(grid: dict) -> dict:
    results = load_results(grid)
    out = Path(grid["results_dir"]) / grid["name"]
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(grid, results)
    summary["validation_bleu_difference"] = bleu_difference_curves(results, grid["baseline"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown(grid, summary)
    (out / "README.md").write_text(table)
    common_budget = None if grid["flags"].get("stop_when_flat") else budget(grid)  # else each line ends at its own
    plot(results, "bleu", "validation BLEU", out / "learning_curves.png", common_budget)
    plot(results, "repetition_rate", "repeated tokens, validation (greedy)", out / "repetition_curves.png",
         common_budget)
    plot_partner_dependence(results, grid["baseline"], out / "partner_dependence.png", common_budget)
    print(table)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid_file", type=Path)
    parser.add_argument("--grid", required=True, help="the grid's name in the grid file")
    parser.add_argument("--report", action="store_true", help="only summarize the result files present")
    parser.add_argument("--variants", help="comma-separated: run only these variants")
    parser.add_argument("--seeds", help="comma-separated: run only these seeds")
    parser.add_argument("--score_only", action="store_true",
                        help="no training: (re)score the runs whose directories hold checkpoints up to the budget")
    args = parser.parse_args(argv)
    grid = load_grid(args.grid_file, args.grid)
    if not args.report:
        variants = args.variants.split(",") if args.variants else list(grid["variants"])
        unknown = set(variants) - set(grid["variants"])
        if unknown:
            parser.error(f"grid {args.grid!r} has no variant {sorted(unknown)}; it has {sorted(grid['variants'])}")
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else grid["seeds"]
        for seed in seeds:  # seed-major: a grid cut short still has complete pairs
            for variant in variants:
                if same_run(grid, variant):
                    print(f"[study] {grid['name']} / {variant}: the same run as {same_run(grid, variant)}, "
                          f"{'read from' if result_path(grid, variant, seed).is_file() else 'not yet in'} "
                          f"{result_path(grid, variant, seed)}")
                    continue
                if result_path(grid, variant, seed).is_file() and not args.score_only:
                    print(f"[study] {grid['name']} / {variant} / seed {seed}: result exists, skipped")
                    continue
                run_one(grid, variant, seed, train=not args.score_only)
                report(grid)
    return report(grid)


if __name__ == "__main__":
    main()
