"""Multi-process training: every recipe feature under a real `accelerate launch` of training/train.py with 2 gloo
processes on the CPU, resumed bit-exactly and exported; a resume with another number of processes; the FSDP
mixed-precision policy.

The matrix (docs/training.md, "Distributed training"): each run combines features that do not exclude each other, so
that every feature is covered by a 2-process run that trains 6 updates (checkpoint at 3) and a run resumed from the
checkpoint at 3 that must end with the same weights. fp16 is the one feature that needs a GPU: on the CPU accelerate
would train in fp32 without saying so, so train.py refuses it there (tested below).
"""

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env

from hf_weaknat import WeakNATForConditionalGeneration
from training_runs import DEMO, ENV, REPO, TINY, TRAIN, final_weights, records, run
from training.checkpoints import MODEL_DIR, STATE_FILE, resolve_checkpoint

# `accelerate launch` runs several CPU processes through its multi-GPU launcher, told to use the CPU: its --cpu flag
# starts one process unless MPI is installed
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]
CPU = {"ACCELERATE_USE_CPU": "1"}

MATRIX = {
    # the partners share parameters (the default) and get no gradient before the warm-in ends (update 4: after the
    # resume), with gradient accumulation
    "shared_partners+warm_in+accumulation": ["--weak_ar_warmup_steps", "4", "--gradient_accumulation_steps", "2"],
    # one decoder per layer, only the sampled half runs each step; the partners' gradient stays out of the embedding
    "unshared_partners+detached_embedding+glancing": ["--weak_ar_share_parameters", "false",
                                                      "--weak_ar_detach_embedding", "true", "--glancing", "true"],
    "vanilla_nar+weak_ar": ["--nar_type", "vanilla"],
    "plain_ctc+bf16": ["--weak_ar_layers", "0", "--mixed_precision", "bf16"],
}


def free_port() -> int:
    """A port no process listens on now: accelerate's default (29500) clashes with a launch running beside this one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(arguments: list[str], processes: int = 2):
    command = [*LAUNCH, "--main_process_port", str(free_port()), *arguments] if processes == 2 else [
        sys.executable, *arguments]
    ENV.update(CPU)
    try:
        return run(command, timeout=300)
    finally:
        for key in CPU:
            ENV.pop(key)


@cache
def common(tokenizer_dir: Path, cell: str) -> tuple[str, ...]:
    return (TRAIN, DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir), "--max_steps", "6", "--save_steps", "3",
            "--eval_steps", "0", "--report_to", "none", *MATRIX[cell])


@pytest.fixture(scope="module")
def uninterrupted(tokenizer_dir, tmp_path_factory):
    """cell -> (run folder, stdout) of its 2-process run to update 6, trained once per module."""
    done = {}

    def train(cell: str):
        if cell not in done:
            folder = tmp_path_factory.mktemp("ddp") / cell
            done[cell] = folder, launch([*common(tokenizer_dir, cell), "--output_dir", str(folder)]).stdout
        return done[cell]
    return train


def resumable_copy(folder: Path, destination: Path) -> Path:
    """The run folder as it was at update 3: its later checkpoint and final files left out."""
    shutil.copytree(folder, destination, ignore=shutil.ignore_patterns("step-00000006", "export", "predictions-*"))
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    (destination / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 3))
    return destination


@pytest.mark.parametrize("cell", MATRIX)
def test_two_processes_train_resume_bit_exactly_and_export(cell, uninterrupted, tokenizer_dir, tmp_path):
    folder, stdout = uninterrupted(cell)
    assert "2 process(es), DistributedType.MULTI_CPU" in stdout
    checkpoint = folder / "checkpoints/step-00000003"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    resumed = resumable_copy(folder, tmp_path / "resumed")
    result = launch([*common(tokenizer_dir, cell), "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert "(step 3," in result.stdout
    expected, got = final_weights(folder), final_weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "the resumed 2-process run took another path"
    assert [r["step"] for r in records(resumed) if r["split"] == "train"] == [2, 4, 6]

    final = resolve_checkpoint(resumed / "checkpoints", "latest")
    exported = WeakNATForConditionalGeneration.from_pretrained(resumed / "export")
    trained = WeakNATForConditionalGeneration.from_pretrained(final / MODEL_DIR).state_dict()
    assert exported.weak_ar is None
    for name, tensor in exported.state_dict().items():  # the export is the trained model without its partners
        assert torch.equal(tensor, trained[name]), name
    if "--weak_ar_layers" not in MATRIX[cell]:
        assert any(k.startswith("weak_ar.") for k in expected)  # the partners trained (after any warm-in)
    assert json.loads((final / STATE_FILE).read_text())["num_processes"] == 2


def test_resuming_with_one_process_continues_at_the_epochs_global_position(uninterrupted, tokenizer_dir, tmp_path):
    cell = "shared_partners+warm_in+accumulation"
    folder, _ = uninterrupted(cell)
    saved = json.loads((folder / "checkpoints/step-00000003" / STATE_FILE).read_text())
    resumed = resumable_copy(folder, tmp_path / "one")
    result = launch([*common(tokenizer_dir, cell), "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"],
                    processes=1)
    assert (f"The checkpoint was saved by 2 process(es); resuming with 1. Epoch {saved['epoch']} continues at batch "
            f"{saved['batches_in_epoch']} of its list") in result.stdout
    assert "--gradient_accumulation_steps 4 --allow_recipe_change gradient_accumulation_steps" in result.stdout
    final = json.loads((resolve_checkpoint(resumed / "checkpoints", "latest") / STATE_FILE).read_text())
    assert final["step"] == 6 and final["num_processes"] == 1
    assert (resumed / "export/config.json").is_file()


def test_fp16_on_the_cpu_is_refused_rather_than_run_in_fp32(tokenizer_dir, tmp_path):
    result = subprocess.run([sys.executable, TRAIN, DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir),
                             "--mixed_precision", "fp16", "--max_steps", "2", "--output_dir", str(tmp_path / "r")],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "mixed_precision fp16 needs a GPU" in result.stderr
    assert not (tmp_path / "r/checkpoints").exists()


FSDP_PREPARATION = textwrap.dedent("""
    import json, sys, types
    import torch, torch.distributed as dist
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule
    from hf_weaknat import WeakNATConfig, WeakNATForConditionalGeneration
    from training.arguments import TrainingArguments
    from training.train import fsdp_plugin

    dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + sys.argv[1])
    plugin = fsdp_plugin(TrainingArguments(output_dir="unused", mixed_precision="bf16"))
    plugin.set_mixed_precision("bf16")  # what accelerate's state does with the launch's mixed precision
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="bf16",
                                        is_main_process=True, device=torch.device("cpu"), torch_device_mesh=None)
    config = WeakNATConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, blank_token_id=3,
                           max_position_embeddings=32)
    model = fsdp2_prepare_model(accelerator, WeakNATForConditionalGeneration(config))
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    policies = {str(u._get_fsdp_state()._fsdp_param_group.mp_policy) for u in units
                if u._get_fsdp_state()._fsdp_param_group is not None}
    ids = torch.randint(4, 40, (2, 6))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.randint(4, 40, (2, 4)),
                training_step=0)
    out.loss.backward()
    grads = {str(p.grad.dtype) for p in model.parameters() if p.grad is not None}
    print(json.dumps({"units": len(units), "policies": sorted(policies), "grads": sorted(grads),
                      "params": sorted({str(p.dtype) for p in model.parameters()})}))
    dist.destroy_process_group()
""")


def fsdp_launch_environment() -> dict[str, str]:
    """The FSDP variables `accelerate launch --config_file training/configs/accelerate_fsdp.yaml` gives the script."""
    config = REPO / "training/configs/accelerate_fsdp.yaml"
    arguments = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "1", TRAIN])
    arguments, _, _ = _validate_launch_command(arguments)
    return {k: v for k, v in prepare_multi_gpu_env(arguments).items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}


def test_fsdp_computes_in_bf16_and_reduces_gradients_in_fp32():
    """The policy train.py gives accelerate under the FSDP config, applied by accelerate's own FSDP2 preparation
    (accelerate selects FSDP only on GPUs; FSDP2 itself runs on the CPU with gloo)."""
    launch_environment = fsdp_launch_environment()
    assert launch_environment["ACCELERATE_USE_FSDP"] == "true" and launch_environment["FSDP_VERSION"] == "2"
    result = subprocess.run([sys.executable, "-c", FSDP_PREPARATION, str(free_port())], cwd=REPO,
                            env={**ENV, **launch_environment}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["units"] > 3  # each encoder/decoder layer (weak AR decoder layers included) and the root
    assert found["policies"] == ["MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, "
                                 "output_dtype=None, cast_forward_inputs=True)"]
    assert found["params"] == ["torch.float32"] and found["grads"] == ["torch.float32"]
