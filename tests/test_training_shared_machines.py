"""Runs on shared machines: preemption (SIGTERM / SIGINT), one writer per run folder, and failed writes lose nothing."""

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from training_runs import DEMO, ENV, REPO, TINY, TRAIN, final_weights, records, run

from training import average_checkpoints, export, train
from training.checkpoints import STATE_FILE, CheckpointWriteError, complete_checkpoints, resolve_checkpoint
from training.run_lock import OWNER_FILE, RunFolderBusy, own_run_folder

STOP_BOUND_S = 30  # the tiny recipe's update takes milliseconds: the bound is the save and the process's exit


def logged_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []
    return max(steps, default=0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_at_the_current_update_and_resume_ends_like_an_uninterrupted_run(tokenizer_dir, tmp_path,
                                                                                              signum):
    common = [sys.executable, TRAIN, DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir), "--max_steps", "60",
              "--logging_steps", "1", "--save_steps", "25", "--eval_steps", "20", "--report_to", "none"]
    stopped = tmp_path / "stopped"
    process = subprocess.Popen([*common, "--output_dir", str(stopped)], cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = random.Random(int(signum)).randint(3, 40)  # a random update, usually not a save step
    deadline = time.time() + 180
    while logged_step(stopped) < target and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    sent = time.time()
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, output[-3000:]
    assert time.time() - sent < STOP_BOUND_S
    checkpoint = resolve_checkpoint(stopped / "checkpoints", "latest")
    step = json.loads((checkpoint / STATE_FILE).read_text())["step"]
    assert target <= step < 60 and checkpoint.name == f"step-{step:08d}"  # the update it was at, saved
    assert {"split": "stopped", "step": step, "signal": signal.Signals(signum).name} in records(stopped)
    assert f"stopped after update {step}" in output and "--resume_from_checkpoint latest" in output
    assert not (stopped / "export").exists() and not (stopped / OWNER_FILE).exists()

    run([*common, "--output_dir", str(stopped), "--resume_from_checkpoint", "latest"])
    uninterrupted = tmp_path / "uninterrupted"
    run([*common, "--output_dir", str(uninterrupted)])
    expected, got = final_weights(uninterrupted), final_weights(stopped)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "the stop changed the training trajectory"


def test_signals_during_the_stop_save_do_not_interrupt_it(tokenizer_dir, tmp_path, monkeypatch):
    """A second (and third) signal arrives while the stop checkpoint is written: the checkpoint still completes."""
    import training.trainer as trainer_module

    real_save = trainer_module.save_checkpoint

    def save_under_fire(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kwargs)

    run_dir = tmp_path / "run"
    arguments = [DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir), "--max_steps", "30", "--save_steps", "0",
                 "--eval_steps", "0", "--report_to", "none", "--output_dir", str(run_dir)]
    original_step = trainer_module.Trainer.after_step

    def signal_at_update_7(self, totals):
        original_step(self, totals)
        if self.state.step == 7:
            monkeypatch.setattr(trainer_module, "save_checkpoint", save_under_fire)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer_module.Trainer, "after_step", signal_at_update_7)
    with pytest.raises(train.TrainingStopped) as stopped:
        train.main(arguments)
    assert stopped.value.exit_status == 128 + signal.SIGTERM and stopped.value.step == 7
    assert [c.name for c in complete_checkpoints(run_dir / "checkpoints")] == ["step-00000007"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are gone with the loop


def test_a_second_run_on_a_live_runs_folder_is_refused_naming_it(tokenizer_dir, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, TRAIN, DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir),
                              "--max_steps", "100000", "--save_steps", "0", "--eval_steps", "0", "--report_to", "none",
                              "--output_dir", str(run_dir)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / OWNER_FILE).is_file() and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run([sys.executable, TRAIN, DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir),
                                 "--max_steps", "5", "--output_dir", str(run_dir)], cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert f"is in use by training/train.py (host {socket.gethostname()}, pid {first.pid}," in second.stderr
        for tool, arguments in ((export.main, ["--run_dir", str(run_dir), "--checkpoint", "latest"]),
                                (average_checkpoints.main, ["--run_dir", str(run_dir), "--last", "1"])):
            with pytest.raises(RunFolderBusy, match=f"pid {first.pid}"):
                tool(arguments)
        first.kill()  # SIGKILL: no cleanup, the owner file stays behind
        first.wait()
        assert (run_dir / OWNER_FILE).is_file()
        taken = run([sys.executable, TRAIN, DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir), "--max_steps", "4",
                     "--save_steps", "0", "--eval_steps", "0", "--report_to", "none", "--compare_with", "",
                     "--output_dir", str(run_dir)])
        assert f"pid {first.pid}" in taken.stdout and "no longer running" in taken.stdout
        assert not (run_dir / OWNER_FILE).exists()  # released at the end
    finally:
        if first.poll() is None:
            first.kill()


def test_an_owner_on_another_host_is_stale_only_without_a_recent_heartbeat(tmp_path):
    owner = {"host": "another-host", "pid": 1, "what": "training/train.py", "since": time.time()}
    (tmp_path / OWNER_FILE).write_text(json.dumps({**owner, "heartbeat": time.time()}))
    with pytest.raises(RunFolderBusy, match="host another-host, pid 1"):
        with own_run_folder(tmp_path, "test"):
            pass
    (tmp_path / OWNER_FILE).write_text(json.dumps({**owner, "heartbeat": time.time() - 3600}))
    taken = []
    with own_run_folder(tmp_path, "test", print_function=taken.append):
        assert json.loads((tmp_path / OWNER_FILE).read_text())["pid"] == os.getpid()
    assert "no longer running" in taken[0] and not (tmp_path / OWNER_FILE).exists()


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "the file being written")  # what a full disk raises


def test_a_full_disk_during_a_checkpoint_stops_the_run_and_keeps_the_earlier_ones(tokenizer_dir, tmp_path,
                                                                                    monkeypatch):
    run_dir = tmp_path / "run"
    arguments = [DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir), "--max_steps", "20", "--save_steps", "5",
                 "--eval_steps", "0", "--report_to", "none", "--output_dir", str(run_dir)]
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained
    calls = {"n": 0}

    def fills_the_disk_on_the_third_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            full_disk()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fills_the_disk_on_the_third_save)
    with pytest.raises(CheckpointWriteError) as failure:
        train.main(arguments)
    message = str(failure.value)
    assert f"Could not write checkpoint {run_dir / 'checkpoints' / 'step-00000015'}" in message
    assert "No space left on device (ENOSPC) writing the file being written" in message
    assert f"newest: {run_dir / 'checkpoints' / 'step-00000010'}" in message
    assert [c.name for c in complete_checkpoints(run_dir / "checkpoints")] == ["step-00000005", "step-00000010"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", original)  # space freed: the run resumes
    train.main([*arguments, "--resume_from_checkpoint", "latest", "--compare_with", ""])
    assert resolve_checkpoint(run_dir / "checkpoints", "latest").name == "step-00000020"


def test_a_failed_export_or_average_leaves_no_folder_that_looks_complete(tokenizer_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run([sys.executable, TRAIN, DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir), "--max_steps", "4",
         "--save_steps", "2", "--eval_steps", "0", "--report_to", "none", "--output_dir", str(run_dir)])
    earlier_card = (run_dir / "export" / "README.md").read_text()
    from huggingface_hub import ModelCard

    monkeypatch.setattr(ModelCard, "save", full_disk)
    with pytest.raises(OSError, match=r"Could not write the export .*export: No space left on device writing "
                                      r"the file being written\. Nothing of it was kept; the earlier .* is untouched"):
        export.main(["--run_dir", str(run_dir), "--checkpoint", "latest", "--output_dir", str(run_dir / "export")])
    assert (run_dir / "export" / "README.md").read_text() == earlier_card
    assert not list(run_dir.glob(".tmp-*"))
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="Could not write the averaged model"):
        average_checkpoints.main(["--run_dir", str(run_dir), "--last", "2", "--output_dir", str(tmp_path / "avg")])
    assert not (tmp_path / "avg").exists() and not list(tmp_path.glob(".tmp-*"))


def test_resuming_with_a_changed_recipe_is_refused_naming_the_fields_unless_allowed(tokenizer_dir, tmp_path):
    run_dir = tmp_path / "run"
    common = [DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir), "--save_steps", "3", "--eval_steps", "0",
              "--report_to", "none", "--output_dir", str(run_dir)]
    train.main([*common, "--max_steps", "3"])
    resume = [*common, "--max_steps", "6", "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match=r"different recipe: model\.dropout: 0\.1 -> 0\.2; "
                                         r"training\.learning_rate: 0\.003 -> 0\.001\. .*--allow_recipe_change "
                                         r"dropout,learning_rate"):
        train.main([*resume, "--dropout", "0.2", "--learning_rate", "1e-3"])
    with pytest.raises(ValueError, match=r"model\.d_model: 32 -> 64"):
        train.main([*resume, "--d_model", "64"])
    assert resolve_checkpoint(run_dir / "checkpoints", "latest").name == "step-00000003"  # nothing trained
    train.main([*resume, "--dropout", "0.2", "--allow_recipe_change", "dropout"])  # asked for: allowed
    assert resolve_checkpoint(run_dir / "checkpoints", "latest").name == "step-00000006"  # more max_steps: always


def test_a_training_set_with_no_usable_pair_stops_before_training(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    long = " ".join(["Wort"] * 200)
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.de").write_text(f"{long}\n{long}\n")
        (corpus / f"{split}.en").write_text("word\nword\n")
    from training.data import DataError

    with pytest.raises(DataError, match=r"No trainable pair left after filtering the 2 training pairs \(2 "
                                        r"source_too_long\)"):
        train.main([DEMO, *TINY, "--dataset", str(corpus), "--output_dir", str(tmp_path / "run")])
    assert not complete_checkpoints(tmp_path / "run" / "checkpoints")


def test_two_processes_stop_at_the_same_update_when_only_one_is_signalled(tokenizer_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launcher, TRAIN, DEMO, *TINY, "--tokenizer_name", str(tokenizer_dir), "--max_steps", "100000",
               "--logging_steps", "1", "--save_steps", "0", "--eval_steps", "0", "--report_to", "none",
               "--output_dir", str(run_dir)]
    launched = subprocess.Popen(command, cwd=REPO, env={**ENV, "ACCELERATE_USE_CPU": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while logged_step(run_dir) < 5 and launched.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(launched.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGTERM)  # one of the two: a scheduler may signal only some processes
    output, _ = launched.communicate(timeout=120)
    stops = [r for r in records(run_dir) if r["split"] == "stopped"]
    assert len(stops) == 1, output[-3000:]
    checkpoint = resolve_checkpoint(run_dir / "checkpoints", "latest")
    assert json.loads((checkpoint / STATE_FILE).read_text())["step"] == stops[0]["step"]
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
