"""Stopping a whole training job: `train_low_mem.py stop OUTPUT_DIR`, and ranks that stop when
their launcher dies.

Every rank's pid is recorded in the run's lock file (OUTPUT_DIR/.train.lock, rank 0 first), so
`stop` signals all of them, on this node, wherever the launcher is: each saves the state at the
next step boundary and exits (signals.py). A launcher killed with -9 cannot forward a signal, so
each rank asks the kernel for SIGTERM when its parent dies (Linux `PR_SET_PDEATHSIG`): the job
saves and stops instead of training on, re-parented, with nobody to see it.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
import time
from pathlib import Path

from lowmem_core.errors import ConfigError
from trainer_low_mem.checkpoint import LOCK_NAME

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_when_parent_dies(signum: int = signal.SIGTERM) -> bool:
    """Ask for `signum` when this process's parent (the launcher) exits; True where supported
    (Linux). A parent that died before the request was made is caught here too."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # re-parented already: the launcher is gone
        os.kill(os.getpid(), signum)
    return True


def run_pids(output_dir: Path) -> list[int]:
    """The pids of the ranks of the run that holds OUTPUT_DIR's lock; [] when no run holds it."""
    lock_path = Path(output_dir) / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a run is live
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            return [int(word) for word in text.split() if word.isdigit()]
        fcntl.flock(fd, fcntl.LOCK_UN)
        return []
    finally:
        os.close(fd)


def stop_run(output_dir: Path, wait_s: float = 600.0, poll_s: float = 0.5) -> str:
    """Send SIGTERM to every rank of the run in `output_dir` and wait for them to save and exit;
    returns what happened, in one line."""
    pids = run_pids(output_dir)
    if not pids:
        raise ConfigError(
            f"no training run holds --output_dir {output_dir} (no live {LOCK_NAME} there); "
            "nothing to stop"
        )
    signalled = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            signalled.append(pid)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + wait_s
    while run_pids(output_dir) and time.monotonic() < deadline:
        time.sleep(poll_s)
    ranks = ", ".join(map(str, signalled))
    if run_pids(output_dir):
        return (
            f"sent SIGTERM to ranks {ranks}; still running after {wait_s:.0f} s (a save in "
            "progress, or ranks on other nodes: run `stop` there too)"
        )
    return f"sent SIGTERM to ranks {ranks}; the run saved its state and stopped"
