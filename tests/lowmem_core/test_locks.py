"""Folder locks exclude a second run and die with their holder; output paths are checked early."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from lowmem_core.errors import ConfigError
from lowmem_core.locks import FolderLock, check_output_file, check_output_folder

HOLD = """
import sys, time
from lowmem_core.locks import FolderLock
FolderLock(sys.argv[1], "x").acquire()
print("held", flush=True)
time.sleep(60)
"""


def _hold_in_child(lock_path) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_holder_is_refused_with_the_first_holders_pid(tmp_path):
    lock_path = tmp_path / ".lock"
    child = _hold_in_child(lock_path)
    try:
        with pytest.raises(ConfigError, match=f"pid {child.pid}"):
            FolderLock(lock_path, "output dir X").acquire()
    finally:
        child.kill()
        child.wait()


def test_a_lock_of_a_killed_process_is_free_at_once(tmp_path):
    lock_path = tmp_path / ".lock"
    child = _hold_in_child(lock_path)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with FolderLock(lock_path, "output dir X"):
        assert lock_path.read_text().strip() == str(os.getpid())


def test_released_locks_can_be_taken_again_in_the_same_process(tmp_path):
    lock = FolderLock(tmp_path / ".lock", "x")
    with lock:
        pass
    with lock:
        pass


def test_output_folder_checks_fail_before_any_work(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_output_folder(a_file, "--output_dir")
    check_output_folder(tmp_path / "new" / "nested", "--output_dir")
    assert (tmp_path / "new" / "nested").is_dir()
    assert list((tmp_path / "new" / "nested").iterdir()) == []
    with pytest.raises(ConfigError, match="GiB free but one training state needs"):
        check_output_folder(tmp_path, "--output_dir", need_bytes=2**62)


def test_output_folder_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        check_output_folder(blocker / "sub", "--output_dir")


def test_output_file_checks(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        check_output_file(tmp_path, "--json")
    check_output_file(tmp_path / "out" / "bench.json", "--json")
    assert not (tmp_path / "out" / "bench.json").exists()
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(ConfigError, match="cannot be written"):
        check_output_file(tmp_path / "blocker" / "bench.json", "--json")
