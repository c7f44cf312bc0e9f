"""The AR baseline (`train.py --model_type marian`) and distillation (`distill.py`): teacher -> distilled corpus -> NAR."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import MULTI30K
from huggingface_hub import ModelCard
from training_runs import DEMO, ENV, REPO, TINY, TRAIN, records, run
from transformers import AutoTokenizer, MarianMTModel

from training import data
from training.ar_baseline import MarianBaseline, marian_config
from training.checkpoints import MODEL_DIR, resolve_checkpoint

DISTILL = str(REPO / "training/distill.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def teacher_run(tokenizer_dir, tmp_path_factory):
    """A tiny MarianMTModel trained by train.py on the demo recipe: the AR baseline, and the teacher below."""
    run_dir = tmp_path_factory.mktemp("marian") / "run"
    # the demo's sizes, with its NAR-only upsampling ratio back at the default (the baseline refuses NAR-only values)
    result = run([sys.executable, TRAIN, DEMO, *TINY, "--model_type", "marian", "--upsample_ratio", "3",
                  "--tokenizer_name", str(tokenizer_dir),
                  "--max_steps", "12", "--eval_steps", "6", "--save_steps", "6", "--report_to", "none",
                  "--output_dir", str(run_dir)])
    return run_dir, result.stdout + result.stderr


def test_marian_loss_is_label_smoothed_cross_entropy_on_shifted_labels(tokenizer):
    torch.manual_seed(0)
    sizes = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    model = MarianBaseline(marian_config(tokenizer, **sizes), label_smoothing=0.1).eval()
    batch = tokenizer(["Ein Hund rennt.", "Zwei Männer"], text_target=["A dog runs.", "Two men"], padding=True,
                      return_tensors="pt")
    labels = batch["labels"].masked_fill(batch["labels"] == tokenizer.pad_token_id, -100)
    out = model(batch["input_ids"], batch["attention_mask"], labels=labels, training_step=3)
    start = model.config.decoder_start_token_id  # the last id, never a target: outside the softmax
    assert start == len(tokenizer) == model.config.vocab_size - 1
    expected = F.cross_entropy(out.logits[..., :start].flatten(0, 1), labels.flatten(), ignore_index=-100,
                               label_smoothing=0.1)
    assert torch.allclose(out.loss, expected)


def test_marian_decoder_start_keeps_a_zero_embedding_through_training(tokenizer):
    """Marian's layout (CTranslate2 starts the decoder from a zero vector and drops the last row)."""
    torch.manual_seed(0)
    sizes = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    model = MarianBaseline(marian_config(tokenizer, **sizes), label_smoothing=0.1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    batch = tokenizer(["Ein Hund rennt.", "Zwei Männer"], text_target=["A dog runs.", "Two men"], padding=True,
                      return_tensors="pt")
    labels = batch["labels"].masked_fill(batch["labels"] == tokenizer.pad_token_id, -100)
    embeddings = model.get_input_embeddings().weight
    before = embeddings.detach().clone()
    for _ in range(3):
        model(batch["input_ids"], batch["attention_mask"], labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(embeddings[:-1], before[:-1])  # the rest trained
    assert torch.count_nonzero(embeddings[-1]) == 0 and model.config.decoder_start_token_id == len(embeddings) - 1


def test_an_ar_model_keeps_pairs_whose_target_cannot_fit_ctc_frames():
    source, long_target = [5, 6, 2], [7, 8, 9, 10, 11, 12, 13, 14, 15, 2]
    assert data.fit_reason(source, long_target, upsample_ratio=3, max_source_tokens=48) == data.TARGET_DOES_NOT_FIT
    assert data.fit_reason(source, long_target, upsample_ratio=None, max_source_tokens=48) == data.FITS
    assert data.fit_reason(source, long_target, upsample_ratio=None, max_source_tokens=8) == data.TARGET_DOES_NOT_FIT


def test_marian_baseline_trains_validates_and_exports_a_plain_marian_model(teacher_run):
    run_dir, log = teacher_run
    validation = [r for r in records(run_dir) if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [6, 12] and all(r["bleu"] >= 0 and r["loss"] > 0 for r in validation)
    assert all(r["ctc_loss"] is None and r["ar_loss"] is None for r in records(run_dir) if r["split"] == "train")
    export = run_dir / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "marian" and config["architectures"] == ["MarianMTModel"]
    exported = MarianMTModel.from_pretrained(export)
    trained = MarianMTModel.from_pretrained(resolve_checkpoint(run_dir / "checkpoints", "latest") / MODEL_DIR)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, trained.state_dict()[name]), name
    card = ModelCard.load(export / "README.md")
    assert [r.metric_type for r in card.data.eval_results] == ["sacrebleu", "chrf"]
    assert "MarianMTModel" in card.text and "trust_remote_code" not in card.text
    test_bleu = json.loads((export / "eval_results.json").read_text())["bleu"]
    assert f"test BLEU {test_bleu:.2f}" in log and "  -> " in log  # scored, then translated with the export


def translate_alone(model, tokenizer, source: str) -> str:
    """Beam-2 translation of one sentence, unbatched, within the teacher's 48 positions (2 x source + 10 tokens)."""
    batch = tokenizer([source], truncation=True, max_length=48, return_tensors="pt")
    limit = min(2 * batch["input_ids"].shape[1] + 10, model.config.max_position_embeddings - 1)
    ids = model.generate(**batch, num_beams=2, max_new_tokens=limit)
    return tokenizer.decode(ids[0], skip_special_tokens=True).strip()


def distill(teacher: Path, output_dir: Path, *extra, launcher=(sys.executable,)) -> str:
    result = run([*launcher, DISTILL, "--teacher", str(teacher), "--output_dir", str(output_dir), "--num_beams", "2",
                  "--max_samples", "50", "--shard_size", "16", "--max_tokens", "256", "--keep_splits", "valid,test",
                  *extra], timeout=300)
    return result.stdout + result.stderr


def test_distillation_translates_every_source_with_beam_search_and_resumes_by_shard(teacher_run, tmp_path):
    teacher = teacher_run[0] / "export"
    out = tmp_path / "distilled"
    log = distill(teacher, out)
    assert "50 sentences in 4 shards: 0 already done, 4 to translate" in log
    sources = (MULTI30K / "train.de").read_text(encoding="utf-8").splitlines()[:50]
    assert (out / "train.de").read_text(encoding="utf-8").splitlines() == sources
    distilled = (out / "train.en").read_text(encoding="utf-8").splitlines()
    # each line is the teacher's own beam-2 translation of that source, translated alone (no batch, no padding)
    model, tokenizer = MarianMTModel.from_pretrained(teacher).eval(), AutoTokenizer.from_pretrained(teacher)
    for i in (0, 17, 49):
        assert distilled[i] == translate_alone(model, tokenizer, sources[i])
    for split in ("valid", "test"):  # kept with their human references
        assert (out / f"{split}.en").read_bytes() == (MULTI30K / f"{split}.en").read_bytes()
    record = json.loads((out / "distillation.json").read_text())
    assert record["pairs"] == 50 and record["num_beams"] == 2 and record["kept_splits"] == ["valid", "test"]
    assert record["sources_cut"] == sum(len(ids) > 48 for ids in tokenizer(sources)["input_ids"])  # counted, not lost

    # a run killed after some shards: the finished shards are kept, the rest is translated, the result is the same
    (out / "shards/shard-00002.jsonl").unlink()
    (out / "shards/.shard-00003.jsonl.tmp-123").write_text('{"half": ')  # a write cut short is never a shard
    (out / "train.en").unlink()
    resumed = distill(teacher, out)
    assert "50 sentences in 4 shards: 3 already done, 1 to translate" in resumed
    assert (out / "train.en").read_text(encoding="utf-8").splitlines() == distilled

    with pytest.raises(AssertionError, match="holds shards of another distillation"):
        distill(teacher, out, "--num_beams", "3")  # other settings never mix with these shards


def test_ctranslate2_distillation_converts_the_marian_teacher_and_agrees_with_generate(teacher_run, tmp_path):
    """The AR baseline is in Marian's layout, so CTranslate2's own converter takes it as is; its beam search may
    break near-ties differently, so most (not necessarily all) lines equal transformers' beam search."""
    pytest.importorskip("ctranslate2", reason="the ctranslate2 engine is an optional extra (pip install ctranslate2)")
    teacher = teacher_run[0] / "export"
    distill(teacher, tmp_path / "hf")
    log = distill(teacher, tmp_path / "ct2", "--engine", "ctranslate2")
    assert "4 to translate" in log and (tmp_path / "ct2" / "ctranslate2_teacher" / "model.bin").is_file()
    reference = (tmp_path / "hf" / "train.en").read_text(encoding="utf-8").splitlines()
    fast = (tmp_path / "ct2" / "train.en").read_text(encoding="utf-8").splitlines()
    assert len(fast) == 50 and sum(a == b for a, b in zip(reference, fast)) >= 45
    assert json.loads((tmp_path / "ct2" / "distillation.json").read_text())["engine"] == "ctranslate2"


def test_two_processes_share_the_shards_and_write_the_same_corpus(teacher_run, tmp_path):
    teacher = teacher_run[0] / "export"
    distill(teacher, tmp_path / "one")
    ENV["ACCELERATE_USE_CPU"] = "1"
    try:
        log = distill(teacher, tmp_path / "two", launcher=TORCHRUN)
    finally:
        ENV.pop("ACCELERATE_USE_CPU")
    assert "4 to translate on 2 process(es)" in log
    for name in ("train.de", "train.en", "valid.en"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_train_py_trains_a_nar_student_on_the_distilled_corpus(teacher_run, tokenizer_dir, tmp_path):
    distilled = tmp_path / "distilled"
    distill(teacher_run[0] / "export", distilled)
    shutil.rmtree(distilled / "shards")  # the corpus alone is what train.py needs
    run_dir = tmp_path / "student"
    run([sys.executable, TRAIN, DEMO, *TINY, "--dataset", str(distilled), "--distilled", "true", "--tokenizer_name",
         str(tokenizer_dir), "--max_steps", "4", "--eval_steps", "0", "--save_steps", "4", "--report_to", "none",
         "--output_dir", str(run_dir)])
    assert json.loads((run_dir / "data_stats.json").read_text())["train_pairs"]["kept"] > 0
    card = ModelCard.load(run_dir / "export/README.md")
    assert "distilled" in card.data.tags and "knowledge distillation targets" in card.text
