"""Hugging Face's standard training path, with no code of ours in between: Seq2SeqTrainer + DataCollatorForSeq2Seq +
Seq2SeqTrainingArguments(predict_with_generate=True) train a tiny weak-AR + glancing model and evaluate it with
generate, and compute_metrics gets real strings for sacreBLEU."""

import pytest
import torch
from conftest import read_lines, tiny_config

from hf_weaknat import WeakNATForConditionalGeneration

datasets = pytest.importorskip("datasets")
sacrebleu = pytest.importorskip("sacrebleu")
pytest.importorskip("accelerate")
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments  # noqa: E402


def test_seq2seq_trainer_trains_the_weak_ar_decoders_and_glancing_and_evaluates_bleu_with_generate(tokenizer,
                                                                                                  tmp_path):
    de, en = read_lines("train.de", 200), read_lines("train.en", 200)
    pairs = sorted(zip(de, en), key=lambda p: len(p[0]))[:8]
    raw = datasets.Dataset.from_dict({"de": [p[0] for p in pairs], "en": [p[1] for p in pairs]})
    data = raw.map(lambda rows: tokenizer(rows["de"], text_target=rows["en"]), batched=True,
                   remove_columns=["de", "en"])
    torch.manual_seed(0)
    model = WeakNATForConditionalGeneration(tiny_config(vocab_size=len(tokenizer), d_model=64, dropout=0.0,
                                                        max_position_embeddings=40, encoder_ffn_dim=128,
                                                        decoder_ffn_dim=128, glancing=True))
    weak_ar_before = {k: v.clone() for k, v in model.weak_ar.state_dict().items()}
    glances = []
    glance = model.glance
    model.glance = lambda *args: glances.append(args[-1]) or glance(*args)  # records the training_step it got

    decoded = {}

    def compute_metrics(prediction):
        ids = [[t for t in row if t >= 0] for row in prediction.predictions]
        refs = [[t for t in row if t >= 0] for row in prediction.label_ids]
        decoded["hypotheses"] = tokenizer.batch_decode(ids, skip_special_tokens=True)
        decoded["references"] = tokenizer.batch_decode(refs, skip_special_tokens=True)
        return {"bleu": sacrebleu.corpus_bleu(decoded["hypotheses"], [decoded["references"]]).score}

    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=150,
        learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, predict_with_generate=True, generation_num_beams=2, generation_max_length=64,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), processing_class=tokenizer,
                             compute_metrics=compute_metrics)
    assert not trainer.model_accepts_loss_kwargs  # our loss is a mean: the Trainer scales it for accumulation
    trainer.train()

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 150 and sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert any(not torch.equal(weak_ar_before[k], v) for k, v in model.weak_ar.state_dict().items())
    assert glances and set(glances) == {None}  # glancing ran, at glancing_start_ratio (the Trainer passes no step)

    calls = []
    generate = model.generate
    model.generate = lambda **kwargs: calls.append(set(kwargs)) or generate(**kwargs)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert metrics["eval_bleu"] > 20  # 8 pairs seen 150 times: it has learnt them (100.0 here)
    assert len(decoded["hypotheses"]) == len(pairs) and decoded["references"] == [p[1] for p in pairs]
    assert {"synced_gpus", "num_beams", "max_length", "labels"} <= calls[0]  # what prediction_step passes
    assert model.generation_config.max_length == model.config.max_frames  # not overwritten with 20 by the Trainer
