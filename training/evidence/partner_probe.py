"""Did the weak partners change what a NAR model's decoder layers hold? A probe on trained models (issue 28).

The paper's mechanism (Section 3): a weak AR partner that reads only a NAR layer's states can predict the target
only if those states carry it, so its gradient pushes the layers to carry more of the target's dependencies. Whether
that happened is a property of the layers, not of the partners that trained with them. This tool measures it:

- it freezes a trained model (with or without partners) and trains a **fresh partner** on its decoder layers: the
  method's own module (one shared causal layer whose only memory is one NAR layer's states, reading every layer each
  update), for a fixed number of updates on the training corpus;
- it scores that partner on the validation split: its teacher-forced loss in nats per target token, per NAR layer,
  every `--eval_every` updates (the curve), at the reference's length (a vanilla NAR's states at the target length,
  as in training; a CTC model's upsampled frames);
- a model trained with partners also gets its **own partners'** validation loss (`own_partners`): what a partner
  trained jointly with the layers reaches.

Run on both arms with the same settings and seed, a lower probe loss on the arm trained with partners means the
partners made its layers more predictive of the target; equal losses mean the layers of the model trained without
them already held as much. The model is never updated (its weights are compared before and after).

    python training/evidence/partner_probe.py --model runs/study/vanilla_converged/vanilla-seed1/average-11000-12000 \\
        --json docs/results/partner_probe/vanilla-seed1.json
    python training/evidence/partner_probe.py --summarize docs/results/partner_probe

`--summarize` reads every `<arm>-seed<N>.json` there and writes its README.md: per arm the final probe loss per
layer (mean ± std over seeds) and per seed pair the second arm's loss minus the first's.
"""

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_weaknat import WeakNATForConditionalGeneration
from hf_weaknat.modeling_weaknat import WeakNATDecoderLayer
from hf_weaknat.weak_ar import Memory, WeakARDecoders
from training import CORPORA
from training.batching import collate, epoch_batches
from training.data import FITS, fit_reason, frames_per_token, length_offset_range
from training.evidence import recorded_path
from training.evidence.analyze import read_lines
from training.evidence.vanilla_diagnostics import arm_and_seed, spread

CORPUS = CORPORA / "multi30k_distilled"  # the study's training corpus (distilled targets; valid: human references)
SUMMARY_HEADER = """# Partner probe, over seeds

Written by `python training/evidence/partner_probe.py --summarize docs/results/partner_probe` from the
`<arm>-seed<N>.json` files beside it (each written by the same tool with `--model`). A fresh weak AR partner (one shared
layer) trained on each frozen model's decoder layers; its validation loss in nats per target token (lower: the layers
hold more of the target). Mean ± std over seeds; Δ: the second arm minus the first, per seed pair.

"""


def tokenized_pairs(sources: list[str], targets: list[str], tokenizer, config) -> list[dict]:
    """The pairs the model can be trained on (the trainer's fit rule), as `collate` takes them."""
    source_ids, target_ids = tokenizer(sources)["input_ids"], tokenizer(targets)["input_ids"]
    return [{"input_ids": s, "labels": t} for s, t in zip(source_ids, target_ids)
            if fit_reason(s, t, frames_per_token(config), config.max_position_embeddings,
                          length_offset_range(config)) == FITS]


def batches_of(pairs: list[dict], max_tokens: int, pad_token_id: int, seed: int) -> list[dict]:
    lengths = [max(len(p["input_ids"]), len(p["labels"])) for p in pairs]
    return [collate([pairs[i] for i in batch], pad_token_id) for batch in epoch_batches(lengths, max_tokens, seed)]


@torch.no_grad()
def frozen_layer_states(model: WeakNATForConditionalGeneration, batch: dict):
    """Every decoder layer's output for the batch, as the partners read them in training (vanilla: at the labels'
    lengths), without dropout -> (layer states, mask, labels cut to the positions)."""
    encoder_outputs, source_mask, frames, frame_mask, _, labels = model.nar_inputs(
        batch["input_ids"], batch["attention_mask"], None, model.check_labels(batch["labels"]))
    decoded = model.model.decoder(frames, frame_mask, encoder_outputs.last_hidden_state, source_mask,
                                  return_layer_states=True)
    return decoded.layer_states, frame_mask.bool(), labels


def fresh_partners(model: WeakNATForConditionalGeneration, seed: int) -> WeakARDecoders:
    """The method's partner module (one shared one-layer decoder), initialized as the model initializes its own; it
    reads the frozen model's embedding without training it."""
    probe_config = copy.deepcopy(model.config)
    probe_config.weak_ar_layers, probe_config.weak_ar_share_parameters = 1, True
    probe_config.weak_ar_on_encoder, probe_config.weak_ar_detach_embedding = False, True
    torch.manual_seed(seed)
    partners = WeakARDecoders(probe_config, WeakNATDecoderLayer, probe_config.max_frames)
    partners.apply(model._init_weights)
    return partners


def memories(layer_states, mask, layers: list[int] | None = None) -> list[Memory]:
    """What the partners read: the states of `layers` (0-based; default every layer)."""
    layers = range(len(layer_states)) if layers is None else layers
    return [Memory(i, layer_states[i], mask) for i in layers]


@torch.no_grad()
def validation_loss(model, partners: WeakARDecoders, batches: list[dict], layers: list[int] | None = None
                    ) -> list[float]:
    """The partner loss over `batches` reading each of `layers` (default: all), nats per target token."""
    partners.eval()
    sums, tokens = 0.0, 0
    for batch in batches:
        layer_states, mask, labels = frozen_layer_states(model, batch)
        found, count = partners.token_losses(labels, memories(layer_states, mask, layers), model.model.shared)
        sums, tokens = sums + found, tokens + count.item()
    return [round(value, 4) for value in (sums / max(tokens, 1)).tolist()]


def own_partners_loss(model, batches: list[dict], layers: list[int] | None = None) -> list[float] | None:
    """The validation loss of the partners the model trained with, per layer of `layers` (None: it has none)."""
    return None if model.weak_ar is None else validation_loss(model, model.weak_ar, batches, layers)


def train_probe(model, partners, train_pairs, valid_batches, updates: int, max_tokens: int, learning_rate: float,
                warmup: int, eval_every: int, seed: int, layers: list[int] | None = None) -> list[dict]:
    """Train `partners` on the frozen model's `layers` (all of them each update, the model's label smoothing) ->
    the validation curve [{"step", "loss_by_layer", "loss"}], the last at `updates`."""
    optimizer = torch.optim.AdamW(partners.parameters(), lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(warmup, 1)))
    curve, step, epoch = [], 0, 0
    while step < updates:
        for batch in batches_of(train_pairs, max_tokens, model.config.pad_token_id, seed + epoch):
            layer_states, mask, labels = frozen_layer_states(model, batch)
            partners.train()
            loss = partners.loss(labels, memories(layer_states, mask, layers), model.model.shared)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(partners.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % eval_every == 0 or step == updates:
                by_layer = validation_loss(model, partners, valid_batches, layers)
                curve.append({"step": step, "loss_by_layer": by_layer, "loss": round(statistics.mean(by_layer), 4)})
                print(f"update {step}: probe validation loss {curve[-1]['loss']:.3f} nats/token {by_layer}",
                      flush=True)
            if step == updates:
                break
        epoch += 1
    return curve


def probe(model, tokenizer, corpus: Path, updates: int, max_tokens: int = 2048, learning_rate: float = 1e-3,
          warmup: int = 200, eval_every: int = 250, seed: int = 1, max_train_pairs: int | None = None,
          layers: list[int] | None = None) -> dict:
    """The whole measurement on one frozen model (see the module docstring); `layers`: 0-based, default all."""
    was_training = model.training
    model.eval()  # no dropout in the states read; no gradient reaches the model (no_grad states, detached embedding)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = model.config
    train_pairs = tokenized_pairs(read_lines(corpus / "train.de", max_train_pairs),
                                  read_lines(corpus / "train.en", max_train_pairs), tokenizer, config)
    valid_pairs = tokenized_pairs(read_lines(corpus / "valid.de"), read_lines(corpus / "valid.en"), tokenizer, config)
    valid_batches = batches_of(valid_pairs, max_tokens, config.pad_token_id, seed=0)
    started = time.time()
    partners = fresh_partners(model, seed)
    curve = train_probe(model, partners, train_pairs, valid_batches, updates, max_tokens, learning_rate, warmup,
                        eval_every, seed, layers)
    unchanged = all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    model.train(was_training)
    if not unchanged:
        raise RuntimeError("the probed model's weights changed: the probe must train its own partner only")
    layers = list(range(config.decoder_layers)) if layers is None else layers
    return {"nar_type": config.nar_type, "decoder_layers": config.decoder_layers, "layers": [i + 1 for i in layers],
            "trained_with_partners": model.weak_ar is not None, "updates": updates, "max_tokens": max_tokens,
            "learning_rate": learning_rate, "warmup": warmup, "seed": seed, "train_pairs": len(train_pairs),
            "validation_pairs": len(valid_pairs), "seconds": round(time.time() - started, 1),
            "probe": curve, "probe_loss_by_layer": curve[-1]["loss_by_layer"], "probe_loss": curve[-1]["loss"],
            "own_partners_loss_by_layer": own_partners_loss(model, valid_batches, layers)}


def summarize(folder: Path) -> str:
    """The markdown table of every `<arm>-seed<N>.json` in `folder`."""
    results: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("*-seed*.json")):
        arm, seed = arm_and_seed(path)
        results.setdefault(arm, {})[seed] = json.loads(path.read_text())
    if not results:
        raise SystemExit(f"{folder} holds no <arm>-seed<N>.json probe results")
    arms = sorted(results, key=len)  # the baseline (the shorter name) first
    paired = sorted(set.intersection(*(set(results[a]) for a in arms))) if len(arms) == 2 else []
    read_layers = {tuple(r["layers"]) for arm in arms for r in results[arm].values()}
    if len(read_layers) != 1:
        raise SystemExit(f"{folder}: the probes read different layers ({sorted(read_layers)}); compare like with like")
    layers = read_layers.pop()
    header = ["validation, nats per target token"] + [
        f"{arm} (seeds {', '.join(map(str, sorted(results[arm])))})" for arm in arms]
    header += [f"Δ, seed {seed}" for seed in paired]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [(f"fresh partner, layer {layer}, after {{updates}} updates", lambda r, i=i: r["probe_loss_by_layer"][i])
            for i, layer in enumerate(layers)]
    rows += [(f"fresh partner, layer {layer}, lowest on its curve",
              lambda r, i=i: min(point["loss_by_layer"][i] for point in r["probe"])) for i, layer in enumerate(layers)]
    rows += [(f"own partners (trained with the model), layer {layer}",
              lambda r, i=i: r["own_partners_loss_by_layer"][i] if r["own_partners_loss_by_layer"] else None)
             for i, layer in enumerate(layers)]
    first = next(iter(results[arms[0]].values()))
    for label, read in rows:
        label = label.format(updates=first["updates"])
        cells = []
        for arm in arms:
            values = [v for v in (read(r) for r in results[arm].values()) if v is not None]
            cells.append(spread(values, digits=3) if values else "—")
        for seed in paired:
            pair = [read(results[arm][seed]) for arm in arms]
            cells.append(f"{pair[1] - pair[0]:+.3f}" if None not in pair else "")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines += ["", f"{first['updates']} probe updates of {first['max_tokens']} tokens, learning rate "
              f"{first['learning_rate']}, {first['train_pairs']} training pairs, {first['validation_pairs']} "
              "validation pairs."]
    return "\n".join(lines) + "\n"


def layer_indices(text: str) -> list[int] | None:
    """"all" -> None; "1,3" -> [0, 2]."""
    return None if text == "all" else [int(layer) - 1 for layer in text.split(",")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a trained WeakNAT folder with its tokenizer (a study run's average-* folder)")
    p.add_argument("--summarize", metavar="FOLDER", help="instead: the table of the <arm>-seed<N>.json files there, "
                   "written to its README.md")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --model's)")
    p.add_argument("--corpus", default=str(CORPUS), help="a folder with train.de/en and valid.de/en")
    p.add_argument("--updates", type=int, default=2000)
    p.add_argument("--max_tokens", type=int, default=2048)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max_train_pairs", type=int, default=None)
    p.add_argument("--layers", default="all", help="the decoder layers the partner reads, 1-based (e.g. 3 or 1,3): "
                   "each adds a vocabulary projection of the batch per update")
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)
    if args.summarize:
        table = summarize(Path(args.summarize))
        (Path(args.summarize) / "README.md").write_text(SUMMARY_HEADER + table)
        print(table)
        return table
    if not args.model:
        p.error("--model (or --summarize) is required")
    model = WeakNATForConditionalGeneration.from_pretrained(args.model)
    layers = layer_indices(args.layers)
    if layers is not None and not all(0 <= i < model.config.decoder_layers for i in layers):
        p.error(f"--layers {args.layers}: the model has decoder layers 1 to {model.config.decoder_layers}")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    result = {"model": recorded_path(args.model), "corpus": recorded_path(args.corpus),
              **probe(model, tokenizer, Path(args.corpus), args.updates, args.max_tokens, args.learning_rate,
                      args.warmup, args.eval_every, args.seed, args.max_train_pairs, layers)}
    print(f"fresh partner: {result['probe_loss']:.3f} nats/token {result['probe_loss_by_layer']}; own partners: "
          f"{result['own_partners_loss_by_layer']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
