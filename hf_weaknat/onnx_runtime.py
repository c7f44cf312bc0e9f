# Copyright 2026 The hf_weaknat authors. Licensed under the Apache License, Version 2.0.
"""The one-pass translator as an ONNX graph, run by ONNX Runtime: the fast CPU inference path of a CTC model.

    export_onnx(model, "runs/demo/onnx", tokenizer=tokenizer, quantize=True)   # model.onnx and model_int8.onnx
    python -m hf_weaknat.onnx_runtime runs/demo/export runs/demo/onnx          # the same from a shell
    model = ORTWeakNATForConditionalGeneration.from_pretrained("runs/demo/onnx", file_name="model_int8.onnx")
    model.generate(**tokenizer(texts, padding=True, return_tensors="pt"), num_beams=5)
    pipeline("weaknat-translation", model=model, tokenizer=tokenizer)

`export_onnx` writes the inference graph (embedding, encoder, upsampler, NAR decoder, output head, and each frame's
argmax) with dynamic batch and source-length axes (`OnePassGraph`), next to the model's config and generation config;
`quantize=True` adds ONNX Runtime's dynamic int8 quantization of it (int8 weights, activations quantized per call).
`fuse=True` rewrites attention into ONNX Runtime's attention ops (`fuse_attention`): same tokens, but off by default,
as at the base size, batch 64, int8 took 18.3 ms/sentence fused against 13.4 unfused (fp32 the same).
`ORTWeakNATForConditionalGeneration.generate` takes the PyTorch model's arguments, checks and output classes
(`generation.py`) and decodes the graph's outputs with the same CTC code (`ctc_generation.ctc_decode`): plain greedy
reads only the argmax ids, everything else (beam search, sampling, suppressed tokens, scores) the frame logits.

Needs `pip install hf_weaknat[onnx]` (onnx, onnxscript for torch's exporter, onnxruntime). CTC models only: a vanilla
model's decoder length depends on its own prediction, which this graph does not export.
"""

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, GenerationConfig

from .configuration_weaknat import WeakNATConfig
from .ctc_generation import check_blank_not_suppressed, ctc_decode, emitting_frames, wants_frame_logits
from .generation import finish_generation, prepare_generation
from .modeling_weaknat import checked_source_mask

ONNX_FILE, INT8_FILE = "model.onnx", "model_int8.onnx"
INPUT_NAMES, OUTPUT_NAMES = ("input_ids", "attention_mask"), ("logits", "frame_ids", "frame_mask")


class OnePassGraph(nn.Module):
    """What the ONNX graph computes, without the input checks (`generate` runs them before the graph).

    input_ids, attention_mask (batch, src_len) -> logits (batch, frames, vocab), frame_ids (batch, frames) their
    argmax, frame_mask (batch, frames) the frames of real source tokens."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        nar = self.model.model
        encoder_states = nar.encoder(nar.shared(input_ids), attention_mask).last_hidden_state
        frames, frame_mask = nar.upsampler(encoder_states, attention_mask)
        hidden = nar.decoder(frames, frame_mask, encoder_states, attention_mask).last_hidden_state
        logits = self.model.ctc_head(hidden)
        return logits, logits.argmax(-1), frame_mask


def export_onnx(model, output_dir, tokenizer=None, quantize: bool = True, fuse: bool = False,
                opset_version: int = 18) -> Path:
    """Write `model` (a CTC `WeakNATForConditionalGeneration`, or its directory) to `output_dir` as `model.onnx`
    (fp32; attention fused into ONNX Runtime's ops if `fuse`), with `model_int8.onnx` if `quantize`, its config,
    generation config and `tokenizer` (or the directory's own). Returns `output_dir`."""
    from transformers import AutoModelForSeq2SeqLM

    if isinstance(model, (str, os.PathLike)):
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
        model = AutoModelForSeq2SeqLM.from_pretrained(model)
    if not model.config.is_ctc:
        raise ValueError("export_onnx exports CTC models; a vanilla model's decoder length depends on its own "
                         "prediction, which this one-pass graph does not express")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    graph = OnePassGraph(model).eval()
    example = (torch.tensor([[5, 6, 7, 2], [5, 6, 2, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    dynamic = {"input_ids": {0: "batch", 1: "src_len"}, "attention_mask": {0: "batch", 1: "src_len"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")  # torch's exporter internals
        warnings.filterwarnings("ignore", message="# The axis name")  # frames = ratio * src_len: one named axis
        program = torch.onnx.export(graph, example, dynamo=True, dynamic_shapes=dynamic, input_names=INPUT_NAMES,
                                    output_names=OUTPUT_NAMES, opset_version=opset_version, verbose=False)
    program.save(str(output_dir / ONNX_FILE), external_data=False)
    if fuse:
        fuse_attention(output_dir / ONNX_FILE)
    if quantize:
        quantize_onnx(output_dir / ONNX_FILE, output_dir / INT8_FILE)
    model.config.save_pretrained(output_dir)
    model.generation_config.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir


def fuse_attention(path) -> Path:
    """onnxscript's fusions for ONNX Runtime, in place: each attention's head reshapes, transposes, scaled dot
    products, mask and softmax become one `MultiHeadAttention` (or `Attention`) op, and residual + LayerNorm one
    `SkipLayerNormalization`. Same outputs and fewer ops, but slower in int8: the rewrite leaves some projections as
    `FusedMatMul`s, which ONNX Runtime's int8 quantizer keeps in fp32."""
    from onnxscript import ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    fused, _ = optimize_for_ort(ir.load(str(path)))
    ir.save(fused, str(path))
    return Path(path)


def quantize_onnx(source, target) -> Path:
    """ONNX Runtime's dynamic int8 quantization, after its recommended pre-processing (graph optimisation, shape
    inference): MatMul weights to int8 per output channel, activations quantized on the fly. The embedding (a
    Gather), the LayerNorms and attention's own products stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # ORT's symbolic shape inference does not know the fused contrib ops; ONNX's own shape inference still runs
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
    return Path(target)


class ORTWeakNATForConditionalGeneration:
    """A CTC WeakNAT translator run by ONNX Runtime (CPU): `generate` as `WeakNATForConditionalGeneration.generate`
    (greedy, prefix beam search, sampling, transformers' output classes), without `inputs_embeds`, attentions or
    hidden states (the graph returns none)."""

    main_input_name = "input_ids"
    device = torch.device("cpu")

    def __init__(self, session, config: WeakNATConfig, generation_config: GenerationConfig | None = None):
        self.session, self.config = session, config
        self.generation_config = generation_config or GenerationConfig(max_length=config.max_frames)

    @classmethod
    def from_pretrained(cls, directory, file_name: str = ONNX_FILE, num_threads: int | None = None,
                        session_options=None, config_directory=None):
        """Load `directory/file_name` (written by `export_onnx`). `num_threads`: ONNX Runtime's intra-op threads
        (default: its own choice, all cores). `config_directory`: where the config and generation config are, a
        directory or Hub id (default: `directory`, where `export_onnx` writes them)."""
        import onnxruntime as ort

        directory = Path(directory)
        if not (directory / file_name).is_file():
            raise FileNotFoundError(f"No {file_name} in {directory}: write one with hf_weaknat.export_onnx")
        options = session_options or ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        session = ort.InferenceSession(str(directory / file_name), options, providers=["CPUExecutionProvider"])
        config_directory = config_directory or directory
        config = WeakNATConfig.from_pretrained(config_directory)
        try:
            generation_config = GenerationConfig.from_pretrained(config_directory)
        except OSError:  # none saved: the defaults of __init__
            generation_config = None
        return cls(session, config, generation_config)

    def can_generate(self) -> bool:
        return True

    def to(self, device):
        if torch.device(device).type != "cpu":
            raise ValueError(f"{type(self).__name__} runs on ONNX Runtime's CPU provider, not on {device}")
        return self

    def eval(self):
        return self

    def __call__(self, input_ids, attention_mask=None, outputs=OUTPUT_NAMES) -> dict[str, torch.Tensor]:
        """Run the graph after the PyTorch model's source checks: {name: tensor} for the `outputs` asked for."""
        return self.run_graph(input_ids, checked_source_mask(self.config, input_ids, attention_mask), outputs)

    def run_graph(self, input_ids, attention_mask, outputs=OUTPUT_NAMES) -> dict[str, torch.Tensor]:
        feed = {"input_ids": input_ids.long().numpy(), "attention_mask": attention_mask.long().numpy()}
        return dict(zip(outputs, (torch.from_numpy(x) for x in self.session.run(list(outputs), feed))))

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, beam_token_candidates=None, **kwargs):
        """`WeakNATForConditionalGeneration.generate` on the ONNX graph (see there for every argument)."""
        request = prepare_generation(self, inputs, generation_config, kwargs)
        if request.inputs_embeds is not None or request.output_attentions or request.output_hidden_states:
            raise ValueError(f"{type(self).__name__} takes input_ids and returns no attentions or hidden states; "
                             "use the PyTorch model for those")
        check_blank_not_suppressed(request, self.config.blank_token_id)
        if request.is_empty:
            return finish_generation(request, *request.empty_hypotheses(self.device))
        # the graph's argmax saw no logits processors: with any of them, decode from the logits
        argmax_is_enough = not (wants_frame_logits(request) or request.suppressed_token_ids
                                or request.config.remove_invalid_values)
        source_mask = checked_source_mask(self.config, request.input_ids, request.attention_mask)
        outputs = self.run_graph(request.input_ids, source_mask,
                                 ("frame_ids", "frame_mask") if argmax_is_enough else ("logits", "frame_mask"))
        frame_mask = emitting_frames(outputs["frame_mask"], request.input_ids, source_mask, self.config)
        hypotheses, scores, frame_scores = ctc_decode(request, frame_mask, self.config.blank_token_id,
                                                      logits=outputs.get("logits"), frame_ids=outputs.get("frame_ids"),
                                                      beam_token_candidates=beam_token_candidates)
        return finish_generation(request, hypotheses, scores, scores=frame_scores, logits=outputs.get("logits"))


__all__ = ["OnePassGraph", "export_onnx", "quantize_onnx", "ORTWeakNATForConditionalGeneration"]


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Export a CTC WeakNAT model to ONNX (fp32 and int8).")
    parser.add_argument("model", help="a model directory (e.g. runs/demo/export) or Hub repo id")
    parser.add_argument("output_dir")
    parser.add_argument("--no_int8", action="store_true", help="skip the int8 copy")
    parser.add_argument("--fuse", action="store_true", help="fuse attention into ONNX Runtime's ops (slower in int8)")
    args = parser.parse_args(argv)
    directory = export_onnx(args.model, args.output_dir, quantize=not args.no_int8, fuse=args.fuse)
    print(f"wrote {', '.join(sorted(p.name for p in directory.glob('*.onnx')))} to {directory}")


if __name__ == "__main__":
    main()

