"""The build's output folder: which --out may be written or replaced, the names beside it
(temp folder, lock, moved-aside dataset), the atomic commit, and recovery after a killed build.

The temporary folder replaces the output only when complete, under a lock on the output, and
only if the output is missing, empty, or a dataset this project built (never a folder of other
files, a training output, or one holding an input or the current folder).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from lowmem_core.durable import swap_in_folder
from lowmem_core.errors import PipelineError
from lowmem_core.format import INDEX_NAME
from pipeline.inputs import Source
from pipeline.manifest import read_manifest

_TRAINING_MARKERS = ("train_latest_state", "model.safetensors")


def aside(out: Path, kind: str, pid: int | None = None) -> Path:
    """A name beside `out` for this build's temp folder, a moved-aside old dataset, or the lock:
    `.NAME.lowmem-KIND[-PID]`, which no user file is likely to carry."""
    suffix = f"-{os.getpid() if pid is None else pid}" if kind != "lock" else ""
    return out.parent / f".{out.name}.lowmem-{kind}{suffix}"


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(out: Path, overwrite: bool, sources: list[Source]) -> None:
    """Refuse an --out that this build must not write to or replace (one line each)."""
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if _within(cwd, resolved):
        raise PipelineError(
            f"--out {out} is the current folder or holds it; give a new folder, e.g. --out "
            f"{out / 'tokens'}"
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise PipelineError(f"output {out} is a file; give --out a folder path")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    inside = next((s.path for s in sources if _within(s.path.resolve(), resolved)), None)
    if inside is not None:
        raise PipelineError(f"output {out} holds the input {inside}; choose another --out")
    marker = next((m for m in _TRAINING_MARKERS if (out / m).exists()), None)
    if marker is not None:
        raise PipelineError(
            f"output {out} is a training output folder (it holds {marker}); choose another --out"
        )
    if INDEX_NAME not in names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise PipelineError(
            f"output {out} already exists and is not a dataset built by `pipeline build` (it "
            f"holds {shown}); choose another --out"
        )
    try:
        read_manifest(out)
    except PipelineError as exc:
        raise PipelineError(
            f"output {out} holds an index.json that does not validate, so it is not replaced "
            f"({str(exc).split(';')[0]}); remove the folder yourself or choose another --out"
        ) from None
    if not overwrite:
        raise PipelineError(
            f"output {out} already exists; pass --overwrite to replace it or choose another --out"
        )


def make_parent(out: Path) -> list[Path]:
    """Create the output's parent folders; return those created (to remove on failure)."""
    parent = out.parent if str(out.parent) else Path(".")
    missing = [p for p in (parent, *parent.parents) if not p.exists()][::-1]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(
            f"cannot create the output's parent folder {parent} ({exc.strerror}); "
            "choose another --out"
        ) from None
    if not os.access(parent, os.W_OK):
        raise PipelineError(f"output folder {parent} is not writable; choose another --out")
    return missing


def recover_interrupted(out: Path, tag: str = "lowmem") -> None:
    """Clean up after writers of `out` that were killed (the caller holds the lock, so none of
    them is alive): remove their temp folders `.NAME.TAG-tmp-PID`, and put back the folder a
    killed one had moved aside (`.NAME.TAG-old-PID`) but not yet replaced. Touches only these
    names; `tag` is "lowmem" for builds (see `aside`), "export" for exports."""
    if not out.parent.is_dir():
        return  # nothing was ever written beside `out`
    pattern = re.compile(rf"\.{re.escape(out.name)}\.{re.escape(tag)}-(tmp|old)-\d+")
    for leftover in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(leftover.name)
        if match is None:
            continue
        if match.group(1) == "old" and not out.exists():
            os.rename(leftover, out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def commit_out(tmp: Path, out: Path) -> None:
    """Put the finished build `tmp` (its files already fsynced) at `out`; a dataset there is
    moved aside until then, where `recover_interrupted` finds it after a crash."""
    swap_in_folder(tmp, out, aside(out, "old"))


def disk_full(exc: BaseException) -> bool:
    if not isinstance(exc, OSError):
        return False
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return any(s in str(exc) for s in ("No space left", "Disk quota exceeded", "File too large"))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
