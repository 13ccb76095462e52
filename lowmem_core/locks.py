"""Exclusive locks on output folders, and the start-up checks that a folder can take the output.

A lock is an `fcntl.flock` on a small file beside the folder it guards, so it dies with the
process that holds it: a run killed with -9 leaves no stale lock behind. The file also records
the holder's pid for the error message of the run that finds it taken.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from lowmem_core.errors import ConfigError


class FolderLock:
    """Hold `lock_path` exclusively while the object is open (a context manager)."""

    def __init__(self, lock_path: Path, what: str, remove_on_release: bool = False):
        self.lock_path = Path(lock_path)
        self.what = what
        self.remove_on_release = remove_on_release  # leave no lock file behind once released
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ConfigError(
                    f"{self.what} is in use by another process (pid {holder}); wait for it to "
                    "finish or choose another folder"
                ) from None
            # A holder that removes the file on release may have done so between our open and
            # flock: then we locked a file no longer at the path, and try again.
            try:
                if os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def record_pids(self, pids: list[int]) -> None:
        """Record every process of the holder (e.g. each rank of a job), the holder first."""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, "".join(f"{pid}\n" for pid in pids).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            if self.remove_on_release:
                self.lock_path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_output_folder(folder: Path, flag: str, need_bytes: int = 0) -> None:
    """Fail now, not at the first save: `folder` must be a writable folder with room to spare.

    Creates the folder when missing, writes and removes a probe file, and compares the free
    space with `need_bytes`.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file; give a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{flag} {folder} is not writable ({exc.strerror}); fix its permissions or choose "
            "another folder"
        ) from None
    free = shutil.disk_usage(folder).free
    if need_bytes and free < need_bytes:
        raise ConfigError(
            f"{flag} {folder} has {free / 2**30:.2f} GiB free but one training state needs about "
            f"{need_bytes / 2**30:.2f} GiB; free space or choose another folder"
        )


def check_output_file(path: Path, flag: str) -> None:
    """Fail now, not after the work: the file at `path` can be created (its folder too)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with open(path, "a"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{flag} {path} cannot be written ({exc.strerror}); choose another path"
        ) from None
