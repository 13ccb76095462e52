"""Durable writes shared by the dataset build, its caches, the checkpointer and the export.

Each promises that a reader finds the old content or the new, never a half-written one. A file
is written under a temp name beside it, fsynced, renamed over the old one and its folder
fsynced (`atomic_file`, `write_atomic`); a folder is filled under a temp name, fsynced file by
file, and swapped in with the old one moved aside until the new one is in place
(`atomic_folder`, `swap_in_folder`). Checksums (`file_sha256`) are recorded last and verified on
open.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fd_sha256(fd: int, start: int = 0, prefix: bytes = b"") -> str:
    """sha256 of `prefix`, then of open file `fd`'s bytes from `start` to its end: read with
    pread, 1 MiB at a time, through the page cache (nothing is mapped, so no page of the file
    stays resident in this process)."""
    digest = hashlib.sha256(prefix)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    at = start
    while got := os.preadv(fd, [buf], at):
        digest.update(view[:got])
        at += got
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (through a read-only descriptor, which flushes its dirty pages
    too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, and `folder` itself."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            fsync_path(Path(dirpath, name))
        fsync_path(Path(dirpath))


@contextmanager
def atomic_file(path: Path, tag: str = "") -> Iterator[BinaryIO]:
    """A new file (read-write, binary) that becomes `path` when the block ends without an
    exception: it is fsynced, renamed over `path`, and the folder fsynced. On an exception it
    is removed and `path` is left as it was.

    Its name, `NAME.tmp-TAGPID-RANDOM` beside `path`, is unique among writers of the same path,
    so a crashed writer's leftover (matching `NAME.tmp-*`) is never reused, and can be removed;
    `tag` (e.g. a host's) lets a sweep match only its own writers' leftovers.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{tag}{os.getpid()}-{secrets.token_hex(4)}")
    # 0o666 before the umask, as open() creates files: readable wherever open()'s would be.
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace `path`'s content with `data` (str as UTF-8) atomically and durably (see
    `atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


@contextmanager
def atomic_folder(path: Path, tmp: Path, aside: Path) -> Iterator[Path]:
    """Create the folder `tmp` (and missing parents) for the block to fill; when the block ends
    without an exception, fsync everything in it and swap it in at `path` (`swap_in_folder`,
    with `aside` holding the old folder meanwhile). On an exception `tmp` is removed and `path`
    is left as it was. The caller names `tmp` and `aside`, so its recovery after a crash knows
    them."""
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        swap_in_folder(tmp, path, aside)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in_folder(tmp: Path, path: Path, aside: Path) -> None:
    """Put the finished folder `tmp` at `path`: fsync `tmp` itself (its files must be durable
    already), move a folder at `path` to `aside` (replacing what `aside` held), rename `tmp` to
    `path`, fsync the parent, then remove `aside`. A crash leaves the old folder (at `path` or
    `aside`) or the new one complete; a failed rename puts the old one back at `path`."""
    fsync_path(tmp)
    moved = path.exists()
    if moved:
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        if moved:
            os.rename(aside, path)
        raise
    fsync_path(path.parent)
    shutil.rmtree(aside, ignore_errors=True)
    fsync_path(path.parent)  # the removal too: after a crash only the new folder is there
