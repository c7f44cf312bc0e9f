"""One writer per run folder, as fairseq and Marian keep it: `<run>/.owner.json` names the process that writes there.

    with own_run_folder(run_dir, "train.py"):
        ...  # train, export, average: nobody else writes into run_dir meanwhile

The file holds the owner's host, pid, the start time of that pid (so a recycled pid is not mistaken for the owner),
what it is doing and since when, and is refreshed every `HEARTBEAT_S` seconds. Another run on the folder refuses
with `RunFolderBusy` naming that host and pid while the owner lives. An owner that died without cleaning up is taken
over with a warning: on the same host, its pid is gone (or belongs to a newer process); from another host, its file
has not been refreshed for `STALE_S` seconds.
"""

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

OWNER_FILE = ".owner.json"
HEARTBEAT_S = 30
STALE_S = 300


class RunFolderBusy(RuntimeError):
    """Another live process owns the run folder."""


def process_start(pid: int) -> str | None:
    """When `pid` started (Linux: ticks since boot, /proc/<pid>/stat field 22), or None where that is not known."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(owner: dict) -> bool:
    """Whether the process `owner` describes still runs: on this host by its pid (and start time), from another
    host by the age of its heartbeat."""
    if owner.get("host") != socket.gethostname():
        return time.time() - owner.get("heartbeat", 0) < STALE_S
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    started = process_start(owner["pid"])
    return started is None or owner.get("pid_started") in (None, started)


def describe(owner: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return f"{owner.get('what', 'a process')} (host {owner.get('host')}, pid {owner.get('pid')}, since {since})"


def read_owner(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # half-written by an owner killed while writing it: nobody can own with it
        return {"host": None, "pid": None, "heartbeat": 0}


class RunFolderOwner:
    def __init__(self, run_dir: Path, what: str, print_function=print):
        self.path, self.what, self.print = Path(run_dir) / OWNER_FILE, what, print_function
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": process_start(os.getpid()),
                   "what": what, "since": time.time()}
        self.stop_heartbeat = threading.Event()
        self.heartbeat, self.nested = None, False

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # another process may take over the same stale owner at the same moment: try again
            if self.create():
                self.heartbeat = threading.Thread(target=self.beat, daemon=True)
                self.heartbeat.start()
                return self
            owner = read_owner(self.path)
            if owner is None:
                continue  # the owner just left
            if owner.get("host") == self.me["host"] and owner.get("pid") == self.me["pid"]:
                self.nested = True  # e.g. train.py exporting at its end: the outer owner releases the folder
                return self
            if alive(owner):
                raise RunFolderBusy(
                    f"{self.path.parent} is in use by {describe(owner)}: one run writes into a folder at a time. "
                    f"Wait for it to end, stop it, or choose another --output_dir. If that process is gone (its "
                    f"machine is down), delete {self.path} to take the folder over.")
            self.print(f"Warning: {self.path.parent} was owned by {describe(owner)}, which is no longer running "
                       "(killed or crashed without cleaning up); taking it over")
            with contextlib.suppress(FileNotFoundError):  # only one of two takers renames it away
                os.replace(self.path, self.path.with_name(f"{OWNER_FILE}.stale-{os.getpid()}"))
                os.unlink(self.path.with_name(f"{OWNER_FILE}.stale-{os.getpid()}"))
        raise RunFolderBusy(f"Could not take {self.path.parent}: other processes keep claiming it")

    def create(self) -> bool:
        """Write the owner file if there is none, atomically: a complete file appears by one link, or nothing."""
        temp = self.path.with_name(f"{OWNER_FILE}.{os.getpid()}.tmp")
        temp.write_text(json.dumps({**self.me, "heartbeat": time.time()}))
        try:
            os.link(temp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            temp.unlink()

    def beat(self):
        while not self.stop_heartbeat.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                temp = self.path.with_name(f"{OWNER_FILE}.{os.getpid()}.tmp")
                temp.write_text(json.dumps({**self.me, "heartbeat": time.time()}))
                if (read_owner(self.path) or {}).get("pid") == self.me["pid"]:
                    os.replace(temp, self.path)
                else:
                    temp.unlink()

    def release(self):
        if self.nested:
            return
        self.stop_heartbeat.set()
        if self.heartbeat is not None:
            self.heartbeat.join()
        owner = read_owner(self.path)
        if owner and owner.get("pid") == self.me["pid"] and owner.get("host") == self.me["host"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


@contextlib.contextmanager
def own_run_folder(run_dir, what: str, print_function=print, enabled: bool = True):
    """Own `run_dir` for the block (`enabled=False`: a no-op, for the non-main processes of a distributed run)."""
    if not enabled:
        yield None
        return
    owner = RunFolderOwner(run_dir, what, print_function).acquire()
    try:
        yield owner
    finally:
        owner.release()
