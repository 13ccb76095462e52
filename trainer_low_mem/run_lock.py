"""One run per output folder: an exclusive lock on OUTPUT_DIR, agreed by every rank.

Rank 0 checks the folder (writable, room for one more state) and takes a `FolderLock` on
`OUTPUT_DIR/.train.lock`; the other ranks learn the outcome through one collective, so a second
trainer on the same folder stops at once on every rank. The lock dies with its process; its file
lists the pids of the ranks on rank 0's node, for `train_low_mem.py stop` (trainer_low_mem/stop.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from lowmem_core.errors import ConfigError
from lowmem_core.locks import FolderLock, check_output_folder
from trainer_low_mem.checkpoint import LOCK_NAME, STATE_DIR_NAME
from trainer_low_mem.distributed import RankContext


class _OutputDirLock(FolderLock):
    """The run's lock on --output_dir; releasing it also removes the folder when this run
    created it and left nothing in it (a run refused at start changes nothing)."""

    def __init__(self, output_dir: Path):
        super().__init__(output_dir / LOCK_NAME, f"--output_dir {output_dir}", True)
        self.created = not output_dir.exists()

    def release(self) -> None:
        super().release()
        if self.created:
            with contextlib.suppress(OSError):
                self.lock_path.parent.rmdir()  # only when empty


def lock_output_dir(output_dir: Path, ctx: RankContext) -> FolderLock | None:
    """Collective, before any step: rank 0 checks that --output_dir can take a state (writable,
    free space for one more state like the one there) and locks it for the run; every rank
    raises when that fails. Returns rank 0's lock (None elsewhere); the caller releases it."""
    output_dir = Path(output_dir)
    lock, failure = None, None
    if ctx.is_main:
        created = not output_dir.exists()
        try:
            latest = output_dir / STATE_DIR_NAME
            need = (
                sum(f.stat().st_size for f in latest.rglob("*") if f.is_file())
                if (latest.is_dir())
                else 0
            )
            lock = _OutputDirLock(output_dir)
            check_output_folder(output_dir, "--output_dir", need_bytes=need)
            lock.acquire()
        except (ConfigError, OSError) as exc:
            failure, lock = exc, None
            if created:
                with contextlib.suppress(OSError):
                    output_dir.rmdir()
    ranks = ctx.gather((socket.gethostname(), os.getpid()))
    if lock is not None:
        # `train_low_mem.py stop` signals them, on this node: another node's pids name unrelated
        # processes here, and a stop seen by one rank stops every rank (its signal is all-reduced).
        lock.record_pids([pid for host, pid in ranks if host == ranks[0][0]])
    if ctx.all_reduce_max(int(failure is not None)) if ctx.world_size > 1 else failure:
        if failure is None:
            raise ConfigError(
                f"--output_dir {output_dir} cannot be used by this run (see rank 0's message)"
            )
        if isinstance(failure, ConfigError):
            raise failure
        raise ConfigError(
            f"--output_dir {output_dir} cannot be used ({failure}); choose another folder"
        ) from None
    return lock
