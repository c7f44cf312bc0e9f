"""Preemption: SIGTERM (a cluster scheduler, a spot instance going away) or SIGINT (Ctrl-C) stops a run cleanly.

The first signal only asks: the current update finishes, then every process stops at the same update (one tiny
all-reduce per update in a distributed run), a complete checkpoint is written by the usual atomic save, the stop is
recorded in metrics.jsonl, and train.py exits with `128 + the signal number` (143 for SIGTERM, 130 for SIGINT).
`--resume_from_checkpoint latest` then continues to the weights an uninterrupted run ends with. Signals that arrive
while that checkpoint is written are noted and do not interrupt it; SIGKILL (what SLURM sends after its grace
period) can, and leaves that checkpoint invisible (`.tmp-step-...`): the previous one stands.
"""

import signal
import threading

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """The run stopped at a signal after saving its checkpoint; `exit_status` is 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_status = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} received: stopped after update {step}, checkpoint "
                         f"{checkpoint}; continue with --resume_from_checkpoint latest")


class StopRequests:
    """Catches SIGTERM and SIGINT while installed (`with StopRequests() as stop:`): `stop.signum` is the first one
    received (None if none), `stop.count` how many. Outside the main thread it installs nothing (signals are only
    delivered there)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals, self.signum, self.count, self.previous = signals, None, 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
        return False

    def handle(self, signum, frame):
        self.count += 1
        if self.signum is None:
            self.signum = signum

    def agreed(self, accelerator) -> int | None:
        """The signal that stops every process now: any process's request counts (a scheduler may signal only
        some of them), so all stop after the same update."""
        if accelerator.num_processes == 1:
            return self.signum
        mine = torch.tensor([self.signum or 0], device=accelerator.device)
        signum = int(accelerator.reduce(mine, "max").item())
        return signum or None
