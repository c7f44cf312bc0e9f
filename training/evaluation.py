"""Validation: loss, sacreBLEU + chrF and the repeated-token rate of greedy translations (CTC greedy, or greedy AR
for the Marian baseline), split across processes.

`evaluate.load("sacrebleu")` needs the Hub; `TranslationScores` is the same computation as an `evaluate.Metric`
that works offline, and reports sacrebleu's signatures so scores can be quoted exactly.
"""

from collections.abc import Callable, Sequence

import datasets
import evaluate
import torch
from accelerate.utils import DistributedType, gather_object
from sacrebleu.metrics import BLEU, CHRF

from training.ar_baseline import generation_limits
from training.batching import collate, pack_by_tokens


class TranslationScores(evaluate.Metric):
    """Corpus-level sacreBLEU and chrF of detokenized translations against one reference each."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus sacreBLEU and chrF (sacrebleu), computed locally.",
            citation="Post, 2018, A Call for Clarity in Reporting BLEU Scores; Popovic, 2015, chrF.",
            inputs_description="predictions: list of str; references: list of str (one reference per prediction)",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, tokenize="13a"):
        bleu, chrf = BLEU(tokenize=tokenize), CHRF()
        return {"bleu": bleu.corpus_score(predictions, [references]).score,
                "chrf": chrf.corpus_score(predictions, [references]).score,
                "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def score_translations(predictions: list[str], references: list[str]) -> dict:
    # keep_in_memory: no cache files or locks, each process may score on its own
    return TranslationScores(keep_in_memory=True).compute(predictions=predictions, references=references)


def repetition_rate(hypotheses: Sequence[str], tokenize: Callable[[str], list[str]] = str.split) -> float:
    """Repeated-token rate of the paper's Table 5 (as in Saharia et al. 2020), a fraction in [0, 1].

    Each hypothesis is split into tokens (whitespace by default; pass e.g. a Moses or sacreBLEU tokenizer to split
    punctuation too). A token is repeated when it equals the token immediately before it IN THE SAME sentence
    ("a a a b" has two repeats). Rate = repeated tokens / all tokens, summed over the corpus (0.0 when empty).
    """
    repeats = total = 0
    for hypothesis in hypotheses:
        tokens = tokenize(hypothesis)
        total += len(tokens)
        repeats += sum(current == previous for previous, current in zip(tokens, tokens[1:]))
    return repeats / total if total else 0.0


def length_sorted_batches(examples: list[dict], max_tokens: int) -> list[list[int]]:
    """Indices of `examples` in batches of similar length (little padding), at most `max_tokens` padded tokens."""
    lengths = [max(len(e["input_ids"]), len(e["labels"])) for e in examples]
    return pack_by_tokens(sorted(range(len(examples)), key=lengths.__getitem__), lengths, max_tokens)


@torch.no_grad()
def evaluate_split(accelerator, model, tokenizer, dataset, max_tokens: int) -> dict:
    """Loss and scores of `model` (unwrapped) on a tokenized evaluation set that kept its `target` texts.

    Each process translates every world_size-th sentence; translations are gathered so every process gets the
    same scores (and can take the same checkpoint decisions). Under FSDP every forward needs every process (the
    weights are sharded), so there each process runs the whole set, in the same batches.
    """
    split_work = accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.FSDP
    rank, world = (accelerator.process_index, accelerator.num_processes) if split_work else (0, 1)
    indices = list(range(rank, len(dataset), world))
    examples = [dataset[i] for i in indices]
    was_training = model.training
    model.eval()
    loss_sum, scored_pairs, translations = torch.zeros((), device=accelerator.device), 0, []
    dependence = PartnerDependence(model, accelerator.device)
    with accelerator.autocast():
        for batch_indices in length_sorted_batches(examples, max_tokens):
            batch = {k: v.to(accelerator.device)
                     for k, v in collate([examples[i] for i in batch_indices], tokenizer.pad_token_id).items()}
            out = model(**batch)
            fitting = len(batch_indices) - int(getattr(out, "num_unfit_pairs", 0))  # AR models: all fit
            loss_sum += out.loss.float() * fitting
            scored_pairs += fitting
            dependence.add(batch)
            ids = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 **generation_limits(model, batch["input_ids"]))
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
            translations += [(indices[i], text) for i, text in zip(batch_indices, texts)]
    model.train(was_training)
    totals = torch.stack([loss_sum, torch.tensor(float(scored_pairs), device=loss_sum.device)])
    if split_work:
        totals, translations = accelerator.reduce(totals, reduction="sum"), gather_object(translations)
    partner_scores = dependence.result(accelerator if split_work else None)
    by_index = dict(translations)
    predictions = [by_index[i] for i in range(len(dataset))]
    scores = score_translations(predictions, list(dataset["target"]))
    return {"loss": (totals[0] / totals[1].clamp(min=1)).item(), **scores,
            "repetition_rate": repetition_rate(predictions), "num_sentences": len(dataset),
            "num_unfit_pairs": len(dataset) - int(totals[1].item()), **partner_scores, "predictions": predictions}


class PartnerDependence:
    """The weak AR partners' validation loss reading their own sentences' NAR states vs another sentence's
    (`WeakNATForConditionalGeneration.weak_ar_dependence`), summed over batches. Nothing for a model without
    partners (plain CTC, the Marian baseline)."""

    def __init__(self, model, device):
        self.model = model if getattr(model, "weak_ar", None) is not None else None
        self.sums = None if self.model is None else torch.zeros(2, model.config.decoder_layers + 1, device=device)

    def add(self, batch: dict):
        if self.model is None or batch["input_ids"].shape[0] < 2:  # a lone sentence has no other to compare with
            return
        found = self.model.weak_ar_dependence(batch["input_ids"], batch["attention_mask"], batch["labels"])
        tokens = found["tokens"].float()
        self.sums[0] += torch.cat([found["own"], tokens[None]])
        self.sums[1] += torch.cat([found["other"], tokens[None]])

    def result(self, accelerator=None) -> dict:
        """`partner_loss_own` / `partner_loss_other` (nats per target token, mean over layers), their difference
        `partner_gap`, and the gap of each NAR layer's partner, first layer first."""
        if self.model is None:
            return {}
        sums = accelerator.reduce(self.sums, reduction="sum") if accelerator is not None else self.sums
        per_token = sums[:, :-1] / sums[:, -1:].clamp(min=1)  # (own/other, layers)
        gap = per_token[1] - per_token[0]
        return {"partner_loss_own": per_token[0].mean().item(), "partner_loss_other": per_token[1].mean().item(),
                "partner_gap": gap.mean().item(), "partner_gap_by_layer": [round(g, 4) for g in gap.tolist()]}
