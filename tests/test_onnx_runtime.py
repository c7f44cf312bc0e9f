"""The ONNX Runtime path (hf_weaknat/onnx_runtime.py): the exported one-pass graph translates as the PyTorch model
does, through the same generate() and pipeline."""

import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install hf_weaknat[onnx])")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install hf_weaknat[onnx])")

from transformers import pipeline  # noqa: E402 - after the skips: nothing here runs without the extra

from conftest import read_lines, tiny_config  # noqa: E402
from hf_weaknat import WeakNATForConditionalGeneration  # noqa: E402
from hf_weaknat.onnx_runtime import INT8_FILE, ORTWeakNATForConditionalGeneration, export_onnx, main  # noqa: E402


@pytest.fixture(scope="module")
def onnx_dir(memorized, tokenizer, tmp_path_factory):
    model, _, _ = memorized
    return export_onnx(model, tmp_path_factory.mktemp("onnx"), tokenizer=tokenizer, quantize=True)


@pytest.fixture(scope="module")
def sentences(memorized):
    """The memorised sources and real test sentences of many lengths (the model has not seen them)."""
    _, sources, _ = memorized
    return sources + read_lines("test.de", 24)


def test_the_fp32_graph_gives_the_pytorch_models_tokens(memorized, tokenizer, onnx_dir, sentences):
    model, _, _ = memorized
    onnx_model = ORTWeakNATForConditionalGeneration.from_pretrained(onnx_dir, num_threads=1)
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=model.config.max_position_embeddings,
                      return_tensors="pt")
    for arguments in ({}, {"num_beams": 4}, {"num_beams": 4, "num_return_sequences": 2}, {"suppress_tokens": [7]},
                      {"max_new_tokens": 5}):
        assert torch.equal(onnx_model.generate(**batch, **arguments), model.generate(**batch, **arguments)), arguments
    scored = dict(num_beams=3, return_dict_in_generate=True, output_scores=True)
    ours, theirs = onnx_model.generate(**batch, **scored), model.generate(**batch, **scored)
    assert torch.allclose(ours.sequences_scores, theirs.sequences_scores, atol=1e-4)
    assert len(ours.scores) == len(theirs.scores) and torch.allclose(ours.scores[0], theirs.scores[0], atol=1e-4)


def test_the_int8_graph_translates_what_the_model_memorised(memorized, tokenizer, onnx_dir):
    model, sources, targets = memorized
    int8 = ORTWeakNATForConditionalGeneration.from_pretrained(onnx_dir, file_name=INT8_FILE, num_threads=1)
    assert (onnx_dir / INT8_FILE).stat().st_size < 0.6 * (onnx_dir / "model.onnx").stat().st_size
    batch = tokenizer(sources, padding=True, return_tensors="pt")
    assert tokenizer.batch_decode(int8.generate(**batch), skip_special_tokens=True) == targets


def test_the_translation_pipeline_runs_the_onnx_model(memorized, tokenizer, onnx_dir):
    _, sources, targets = memorized
    onnx_model = ORTWeakNATForConditionalGeneration.from_pretrained(onnx_dir, num_threads=1)
    translator = pipeline("weaknat-translation", model=onnx_model, tokenizer=tokenizer)
    assert [r["translation_text"] for r in translator(sources, batch_size=2)] == targets
    assert translator(["", "   "]) == [{"translation_text": ""}, {"translation_text": ""}]


def test_bad_input_gets_the_pytorch_models_errors(onnx_dir, tokenizer):
    onnx_model = ORTWeakNATForConditionalGeneration.from_pretrained(onnx_dir, num_threads=1)
    vocabulary = onnx_model.config.vocab_size
    with pytest.raises(ValueError, match=f"outside this model's vocabulary of {vocabulary}"):
        onnx_model.generate(input_ids=torch.tensor([[5, vocabulary, 2]]))
    with pytest.raises(ValueError, match="right-padded"):
        onnx_model.generate(input_ids=torch.tensor([[0, 5, 2]]), attention_mask=torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="takes input_ids"):
        onnx_model.generate(inputs_embeds=torch.zeros(1, 3, onnx_model.config.d_model))
    with pytest.raises(ValueError, match="CPU provider"):
        onnx_model.to("cuda")
    empty = onnx_model.generate(input_ids=torch.zeros((0, 1), dtype=torch.long))
    assert empty.shape[0] == 0


def test_a_missing_graph_or_a_vanilla_model_is_refused_with_the_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        ORTWeakNATForConditionalGeneration.from_pretrained(tmp_path)
    vanilla = WeakNATForConditionalGeneration(tiny_config(nar_type="vanilla", weak_ar_layers=0))
    with pytest.raises(ValueError, match="exports CTC models"):
        export_onnx(vanilla, tmp_path / "vanilla", quantize=False)


def test_the_command_line_exports_a_saved_model_directory(memorized, tokenizer, tmp_path, capsys):
    model, sources, targets = memorized
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    main([str(tmp_path / "model"), str(tmp_path / "onnx"), "--no_int8"])
    assert "wrote model.onnx to" in capsys.readouterr().out and not (tmp_path / "onnx" / INT8_FILE).exists()
    onnx_model = ORTWeakNATForConditionalGeneration.from_pretrained(tmp_path / "onnx", num_threads=1)
    translator = pipeline("weaknat-translation", model=onnx_model, tokenizer=str(tmp_path / "onnx"))
    assert [r["translation_text"] for r in translator(sources)] == targets


def test_fused_attention_is_an_option_that_translates_the_same(memorized, tokenizer, onnx_dir, tmp_path):
    import onnx

    def op_types(path):
        return {node.op_type for node in onnx.load(path).graph.node}

    plain = op_types(onnx_dir / "model.onnx")  # the default: plain ONNX attention (fusion measured slower in int8)
    assert "Softmax" in plain and "MultiHeadAttention" not in plain
    fused_dir = export_onnx(memorized[0], tmp_path, quantize=True, fuse=True)
    fused = op_types(fused_dir / "model.onnx")
    assert "MultiHeadAttention" in fused and "SkipLayerNormalization" in fused and "Softmax" not in fused
    int8 = ORTWeakNATForConditionalGeneration.from_pretrained(fused_dir, file_name=INT8_FILE, num_threads=1)
    model, sources, targets = memorized
    batch = tokenizer(sources, padding=True, return_tensors="pt")
    plain_model = ORTWeakNATForConditionalGeneration.from_pretrained(onnx_dir, num_threads=1)
    fused_model = ORTWeakNATForConditionalGeneration.from_pretrained(fused_dir, num_threads=1)
    assert torch.equal(fused_model.generate(**batch), plain_model.generate(**batch))
    assert tokenizer.batch_decode(int8.generate(**batch), skip_special_tokens=True) == targets


def test_the_evidence_tool_scores_the_onnx_graphs(memorized, onnx_dir, tmp_path):
    """`analyze.py --onnx_file`: how the int8 graph's BLEU on a test set is measured against the PyTorch model's."""
    from training.evidence.analyze import main as analyze

    _, sources, targets = memorized
    (tmp_path / "src").write_text("".join(s + "\n" for s in sources), encoding="utf-8")
    (tmp_path / "ref").write_text("".join(t + "\n" for t in targets), encoding="utf-8")
    reports = {name: analyze(["--model", str(onnx_dir), "--onnx_file", name, "--source", str(tmp_path / "src"),
                              "--reference", str(tmp_path / "ref"), "--batch_size", "2",
                              "--json", str(tmp_path / f"{name}.json")])
               for name in ("model.onnx", INT8_FILE)}
    for name, report in reports.items():  # both graphs translate what the model memorised
        written = json.loads((tmp_path / f"{name}.json").read_text())
        assert written["translations"] == targets and written["onnx_file"] == name
        assert report["bleu"] == pytest.approx(100.0)
    with pytest.raises(SystemExit):  # a graph needs its directory
        analyze(["--hypotheses", str(tmp_path / "ref"), "--reference", str(tmp_path / "ref"), "--onnx_file", "x.onnx"])
