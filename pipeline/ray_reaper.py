"""The processes of a Ray cluster this process started die with it, even after `kill -9`.

`ray.init()` without an address starts a local cluster (GCS, raylet, agents, workers) as this
process's descendants; `ray.shutdown()` stops them, but a driver killed with -9 runs nothing,
and Ray's agents then live on, orphaned. `Reaper` starts a small watcher in a session of its
own: while the driver lives it notes the driver's descendants every second; once the driver is
gone it kills those still running (each checked by its start time, so a reused pid is spared).

Run as `python -m pipeline.ray_reaper PID`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

POLL_S = 1.0


class Reaper:
    """Watch this process from outside; `stop()` once the cluster was shut down cleanly."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.ray_reaper", str(psutil.Process().pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a signal to the driver's process group spares it
        )

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait()


def watch(driver_pid: int) -> None:
    """Note `driver_pid`'s descendants until it exits, then kill the ones still running."""
    driver, me = psutil.Process(driver_pid), os.getpid()
    seen: dict[int, float] = {}  # pid -> create time
    while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        try:
            for child in driver.children(recursive=True):
                if child.pid != me:  # the watcher is the driver's child too
                    seen.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass
        time.sleep(POLL_S)
    for pid, created in seen.items():
        try:
            orphan = psutil.Process(pid)
            if orphan.create_time() == created:
                orphan.kill()
        except psutil.Error:
            continue


if __name__ == "__main__":
    watch(int(sys.argv[1]))
