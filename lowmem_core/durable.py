"""Durable file helpers shared by the dataset build and the checkpointer: checksums and fsync.

Both promise that a reader never sees a half-written result; that rests on fsyncing files and
their folder before a rename, and on checksums recorded last and verified on open.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (through a read-only descriptor, which flushes its dirty pages
    too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
