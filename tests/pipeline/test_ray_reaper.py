"""The processes a driver started die with it, even when the driver is killed with -9."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil

DRIVER = textwrap.dedent(
    """
    import subprocess, sys, time
    from pipeline.ray_reaper import Reaper

    reaper = Reaper()
    # A child that starts a grandchild, as raylet starts its agents.
    child = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time;"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
        "print(g.pid, flush=True); time.sleep(600)"
    )], stdout=subprocess.PIPE, text=True)
    print(child.pid, child.stdout.readline().strip(), flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_driver_s_descendants_are_killed_once_it_is_killed():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    child, grandchild = (int(pid) for pid in driver.stdout.readline().split())
    time.sleep(2.5)  # the watcher notes the driver's descendants every second
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 30
    while (_alive(child) or _alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child) and not _alive(grandchild)
