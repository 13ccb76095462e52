"""Index files every process of a node maps instead of holding its own copy.

A dataset's document offsets (and prompt lengths, cut flags and labelled spans) and each
epoch's index (permutation, row layout and its scalars) grow with the corpus: held privately
they cost about 27 bytes per document in every rank. Here each is written once into a file and
mapped read-only by every rank, reader and process of the node, so they share its page-cache
pages.

Writing: whichever process needs a file first takes an flock beside it (it dies with its holder),
writes `NAME.tmp-*` through a shared mapping, fsyncs it and renames it into place; the others
wait on the lock and then map the finished file. A file is only ever read under its final name
and after its header matches the key, so a temporary left by a killed builder is never used (the
next builder on its host removes it). Building epoch e of a key removes that key's epochs before
e - 1.

Trust: a file's disk blocks are allocated before it is mapped, so a full disk fails the write
with a PipelineError instead of killing the process with SIGBUS; its header records a sha256 of
its key, scalars and arrays, and every open checks the size and that checksum (one pread pass:
about 80 ms for a 10M-document file). A file that fails (damaged, truncated, another index's
bytes, or written before checksums) is rebuilt under the lock, or refused in one line when the
folder refuses the write.

Where: `<dataset>/.index_cache/`; or `<given>/<fingerprint>/` for a folder given to
`open_dataset(index_cache=...)` or in $LOWMEM_INDEX_CACHE; or, when the dataset folder cannot
be written, `$XDG_CACHE_HOME/lowmem-pipeline/index/<fingerprint>/` (~/.cache by default), where
folders no dataset has opened for 30 days are removed.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import logging
import mmap
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from lowmem_core.durable import atomic_file, fd_sha256
from lowmem_core.errors import PipelineError
from lowmem_core.format import LABEL_SPANS_COLUMN, PROMPT_LENGTHS_COLUMN, RESPONSE_CUT_COLUMN
from lowmem_core.memory import format_bytes
from pipeline import sampler
from pipeline.output import disk_full
from pipeline.sampler import EpochIndex
from pipeline.storage import Chunk

ENV_VAR = "LOWMEM_INDEX_CACHE"
UNUSED_AFTER_S = 30 * 24 * 3600  # a user-cache index folder no open has marked for this long
FOLDER_NAME = ".index_cache"
_MAGIC = "lowmem-index/1"
_PAGE = 4096  # the header's size, and the alignment of every array in a file
_PIECE_ROWS = 1 << 16  # documents whose offsets are copied (and checked) at a time
_DIGEST = "sha256"  # the header's checksum: of the key, the scalars and every byte after it
_MISSING = "is missing"
_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)  # a folder that does not take the write

log = logging.getLogger(__name__)

# Names this host's temporaries. Nodes of a job may share the folder (a dataset on shared
# storage) where flock does not reach across hosts (NFS with local locks, Lustre without -o
# flock): each node then holds "the" lock at once. Writing stays safe (a temporary of its own
# renamed over the file, whose bytes are the same whichever node writes them); sweeping must
# spare the temporaries other hosts are still writing, so a builder removes only its host's.
_HOST_TAG = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) + "-"

Fields = list[tuple[str, np.dtype, int]]  # (name, dtype, count) of each array, in file order


def user_cache_root() -> Path:
    """This project's folder in the user's cache ($XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowmem-pipeline"


def cache_folder(dataset_dir: Path, fingerprint: str, given: Path | str | None = None) -> Path:
    """The writable folder that holds `fingerprint`'s index files (see the module docstring)."""
    given = given or os.environ.get(ENV_VAR) or None
    if given is not None:
        folder = Path(given) / fingerprint
        if not _writable(folder):
            raise PipelineError(
                f"index cache {folder} cannot be written; give a writable folder with "
                f"open_dataset(index_cache=...) or ${ENV_VAR}"
            )
        return folder
    user = user_cache_root()
    for folder in (Path(dataset_dir) / FOLDER_NAME, user / "index" / fingerprint):
        if _writable(folder):  # its probe also marks the folder used now (its mtime)
            if folder.parent == user / "index":
                _remove_unused(folder.parent, keep=folder)
            return folder
    raise PipelineError(
        f"neither {Path(dataset_dir) / FOLDER_NAME} nor {user / 'index'} can be written for the "
        f"shared index; set ${ENV_VAR} to a writable folder"
    )


def _remove_unused(root: Path, keep: Path) -> None:
    """Remove the index folders under `root` no dataset has opened for UNUSED_AFTER_S: the user
    cache outlives the datasets it indexed. A process still mapping a removed file keeps its
    pages; one that needs a file later builds it again (open_or_build recreates the folder)."""
    cutoff = time.time() - UNUSED_AFTER_S
    for folder in root.iterdir():
        try:
            unused = folder != keep and folder.is_dir() and folder.stat().st_mtime < cutoff
        except OSError:
            continue  # removed by another process meanwhile
        if unused:
            shutil.rmtree(folder, ignore_errors=True)


def _writable(folder: Path) -> bool:
    # A real write, not os.access: root passes os.access on a read-only file system.
    probe = folder / f".probe-{os.getpid()}-{threading.get_ident()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------- the two files


def doc_arrays(
    folder: Path,
    fingerprint: str,
    chunks: list[Chunk],
    batches: list[tuple[pa.RecordBatch, int]],
    column: str,
    sft: bool,
    fix: str,
) -> dict[str, np.ndarray]:
    """The dataset's read-only arrays: "doc_starts" (N+1,) int64 and, for sft,
    "prompt_lengths" (N,) int64 and "response_cut" (N,) uint8 (1: the build cut the response,
    so its EOS is no target; 0 for shards without RESPONSE_CUT_COLUMN); for sft datasets with
    LABEL_SPANS_COLUMN also "span_starts" (N+1,) int64, document i's labelled spans being rows
    [span_starts[i], span_starts[i+1]) of "spans" (S, 2) int64 (start, length) (none: the one
    span from its prompt length). `batches`: for each chunk, its record batch (token lists in
    `column`) over a map of the chunk's file, and that map's base address. Only the process
    that writes the index file reads (with pread: none of the file's pages stay mapped) and
    checks the offsets."""
    num_docs = sum(batch.num_rows for batch, _ in batches)
    # Spans before each chunk: the lists' values are flat (start, length) pairs.
    first_span = np.zeros(len(batches) + 1, dtype=np.int64)
    for i, (batch, _) in enumerate(batches):
        held = 0
        if sft and LABEL_SPANS_COLUMN in batch.schema.names:
            offsets = raw_offsets(_spans_column(chunks[i].path, batch, fix))
            held = (int(offsets[-1]) - int(offsets[0])) // 2
        first_span[i + 1] = first_span[i] + held
    with_spans = sft and any(LABEL_SPANS_COLUMN in b.schema.names for b, _ in batches)
    fields: Fields = [("doc_starts", np.dtype(np.int64), num_docs + 1)]
    if sft:
        fields.append(("prompt_lengths", np.dtype(np.int64), num_docs))
        fields.append(("response_cut", np.dtype(np.uint8), num_docs))
    if with_spans:
        fields.append(("span_starts", np.dtype(np.int64), num_docs + 1))
        fields.append(("spans", np.dtype(np.int64), 2 * int(first_span[-1])))
    key = {"kind": "docs", "fingerprint": fingerprint, "num_docs": num_docs, "sft": sft}
    if sft:
        key["response_cut"] = True  # files written before the flags lack them: rebuilt
    if with_spans:
        key["label_spans"] = int(first_span[-1])

    def fill(arrays: dict[str, np.ndarray]) -> dict:
        arrays["doc_starts"][0] = 0
        if with_spans:
            arrays["span_starts"][0] = 0
        for i, (chunk, (batch, base)) in enumerate(zip(chunks, batches, strict=True)):
            _fill_chunk(chunk, batch, base, column, arrays, fix, int(first_span[i]))
        return {}

    path = folder / f"docs-{fingerprint}.idx"
    arrays, _, _ = open_or_build(path, key, fields, fill)
    starts = arrays["doc_starts"]
    # The file must agree with the shards it was written from (a few reads, not a pass).
    if any(starts[chunk.first_doc] != chunk.first_token for chunk in chunks):
        raise PipelineError(
            f"index file {path} disagrees with the dataset's shards (replaced since it was "
            f"written); remove {path} and open the dataset again"
        )
    if "spans" in arrays:
        arrays = dict(arrays, spans=arrays["spans"].reshape(-1, 2))
    return arrays


def _fill_chunk(
    chunk: Chunk, batch, base: int, column: str, arrays: dict, fix: str, first_span: int
) -> None:
    """One chunk's starts (and prompt lengths, cut flags and spans), a piece of _PIECE_ROWS
    documents at a time; its spans start at row `first_span` of the dataset's."""
    starts, prompts = arrays["doc_starts"], arrays.get("prompt_lengths")
    cut, cut_column = arrays.get("response_cut"), None
    span_reader = None
    if "span_starts" in arrays:
        span_reader = _SpanReader(chunk, batch, base, arrays, fix, first_span)
    fd = os.open(chunk.path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offsets = _Column(batch.column(column), base, size, list_offsets=True)
        if prompts is not None:
            prompt_column = _prompt_column(chunk.path, batch, fix)
            lengths_column = _Column(prompt_column, base, size, list_offsets=False)
            if RESPONSE_CUT_COLUMN in batch.schema.names:
                cut_column = _Column(
                    _cut_column(chunk.path, batch, fix), base, size, list_offsets=False
                )
        shift = chunk.first_token - int(offsets.read(fd, 0, 1)[0])
        for lo in range(0, batch.num_rows, _PIECE_ROWS):
            hi = min(lo + _PIECE_ROWS, batch.num_rows)
            piece = starts[chunk.first_doc + lo : chunk.first_doc + hi + 1]
            piece[1:] = offsets.read(fd, lo + 1, hi - lo)
            piece[1:] += shift
            doc_lengths = np.diff(piece)
            if doc_lengths.min() < 0:
                raise PipelineError(f"{chunk.path} has decreasing list offsets (corrupt); {fix}")
            if prompts is not None:
                lengths = lengths_column.read(fd, lo, hi - lo).astype(np.int64)
                bad = np.flatnonzero((lengths < 0) | (lengths > doc_lengths))
                if bad.size:
                    i = int(bad[0])
                    raise PipelineError(
                        f"{chunk.path}: row {lo + i} has a prompt of {lengths[i]} tokens but a "
                        f"document of {doc_lengths[i]}; {fix}"
                    )
                prompts[chunk.first_doc + lo : chunk.first_doc + hi] = lengths
                if cut_column is not None:
                    cut[chunk.first_doc + lo : chunk.first_doc + hi] = cut_column.read(
                        fd, lo, hi - lo
                    )
            if span_reader is not None:
                span_reader.read(fd, lo, hi, doc_lengths, prompts)
        release_pages(starts)  # written: the page cache holds them, this process need not
    finally:
        os.close(fd)


class _Column:
    """An Arrow array's offsets (a list array) or values (a primitive one), read with pread
    where they sit in the mapped file (so no page stays mapped), else through the array."""

    def __init__(self, arr, base: int, file_size: int, list_offsets: bool):
        if list_offsets:
            self.dtype = np.dtype(np.int32 if pa.types.is_list(arr.type) else np.int64)
        else:
            self.dtype = np.dtype(arr.type.to_pandas_dtype())
        buf = arr.buffers()[1]
        self.view = np.frombuffer(buf, dtype=self.dtype)[arr.offset :]
        self.at = buf.address - base + arr.offset * self.dtype.itemsize
        self.in_file = 0 <= buf.address - base <= file_size - buf.size

    def read(self, fd: int, first: int, count: int) -> np.ndarray:
        if not self.in_file:
            return self.view[first : first + count].copy()
        nbytes = count * self.dtype.itemsize
        data = os.pread(fd, nbytes, self.at + first * self.dtype.itemsize)
        return np.frombuffer(data, dtype=self.dtype)


class _SpanReader:
    """One chunk's labelled spans into the dataset's span arrays, checked: each span inside its
    document, in order, not overlapping, and a document's prompt length the start of its last
    span (what a reader of prompt lengths alone trains)."""

    def __init__(self, chunk: Chunk, batch, base: int, arrays: dict, fix: str, first_span: int):
        self.chunk, self.fix = chunk, fix
        self.span_starts, self.spans = arrays["span_starts"], arrays["spans"].reshape(-1, 2)
        self.next_span = first_span
        self.lists = self.values = None
        if LABEL_SPANS_COLUMN in batch.schema.names:
            column = _spans_column(chunk.path, batch, fix)
            size = os.path.getsize(chunk.path)
            self.lists = _Column(column, base, size, list_offsets=True)
            self.values = _Column(column.values, base, size, list_offsets=False)

    def read(self, fd: int, lo: int, hi: int, doc_lengths: np.ndarray, prompts) -> None:
        d0 = self.chunk.first_doc
        if self.lists is None:
            self.span_starts[d0 + lo + 1 : d0 + hi + 1] = self.next_span
            return
        offsets = self.lists.read(fd, lo, hi - lo + 1).astype(np.int64)
        flat = self.values.read(fd, int(offsets[0]), int(offsets[-1] - offsets[0]))
        counts = np.diff(offsets) // 2
        spans = flat.astype(np.int64).reshape(-1, 2)
        self._check(counts, spans, doc_lengths, prompts[d0 + lo : d0 + hi], lo)
        ends = self.next_span + np.cumsum(counts)
        self.span_starts[d0 + lo + 1 : d0 + hi + 1] = ends
        self.spans[self.next_span : self.next_span + spans.shape[0]] = spans
        self.next_span += spans.shape[0]

    def _check(self, counts, spans, doc_lengths, prompts, lo: int) -> None:
        doc = np.repeat(np.arange(counts.size), counts)  # each span's document in the piece
        first = np.zeros(counts.size, dtype=np.int64)
        np.cumsum(counts[:-1], out=first[1:])
        starts, ends = spans[:, 0], spans.sum(axis=1)
        follows = np.ones(doc.size, dtype=bool)  # a span starts at or after the previous end
        same_doc = np.zeros(doc.size, dtype=bool)
        same_doc[1:] = doc[1:] == doc[:-1]
        follows[same_doc] = starts[same_doc] >= ends[np.flatnonzero(same_doc) - 1]
        bad_span = (spans[:, 1] < 1) | (ends > doc_lengths[doc]) | ~follows
        last_start = np.zeros(counts.size, dtype=np.int64)
        if doc.size:
            last_start = starts[np.maximum(first + counts - 1, 0)]
        bad = (counts > 0) & (prompts != last_start)
        bad[doc[bad_span]] = True
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise PipelineError(
                f"{self.chunk.path}: row {lo + i} has labelled spans that are out of order, "
                f"outside its {doc_lengths[i]} tokens, or not ending at its prompt length; "
                f"{self.fix}"
            )


def _spans_column(file_path: Path, batch, fix: str):
    """The batch's labelled-span column, checked to be lists of uint32 without nulls."""
    column = batch.column(LABEL_SPANS_COLUMN)
    if column.type != pa.list_(pa.uint32()) or column.null_count:
        raise PipelineError(
            f"column {LABEL_SPANS_COLUMN!r} in {file_path} is {column.type} with "
            f"{column.null_count} nulls, expected list<uint32>; {fix}"
        )
    return column


def raw_offsets(arr) -> np.ndarray:
    """(rows+1,) int32 or int64 offsets of an Arrow list array, as stored (a view)."""
    offset_dtype = np.int32 if pa.types.is_list(arr.type) else np.int64
    return np.frombuffer(arr.buffers()[1], dtype=offset_dtype)[
        arr.offset : arr.offset + len(arr) + 1
    ]


def _prompt_column(file_path: Path, batch, fix: str):
    """The batch's prompt-length column, checked to be integers without nulls."""
    names = batch.schema.names
    if PROMPT_LENGTHS_COLUMN not in names:
        raise PipelineError(
            f"{file_path} has no {PROMPT_LENGTHS_COLUMN!r} column (columns: {', '.join(names)}) "
            f"but its dataset is a prompt/response one; {fix}"
        )
    column = batch.column(PROMPT_LENGTHS_COLUMN)
    if not pa.types.is_integer(column.type) or column.null_count:
        raise PipelineError(
            f"column {PROMPT_LENGTHS_COLUMN!r} in {file_path} is {column.type} with "
            f"{column.null_count} nulls, expected integers; {fix}"
        )
    return column


def _cut_column(file_path: Path, batch, fix: str):
    """The batch's response-cut column, checked to be one byte per document without nulls."""
    column = batch.column(RESPONSE_CUT_COLUMN)
    if column.type != pa.uint8() or column.null_count:
        raise PipelineError(
            f"column {RESPONSE_CUT_COLUMN!r} in {file_path} is {column.type} with "
            f"{column.null_count} nulls, expected uint8; {fix}"
        )
    return column


def epoch_index(
    folder: Path,
    fingerprint: str,
    doc_starts: np.ndarray,
    seed: int,
    epoch: int,
    seq_len: int,
    layout: str,
) -> EpochIndex:
    """Epoch `epoch`'s index in `layout` (sampler.LAYOUTS) over read-only views of its shared
    file (built when missing)."""
    num_docs = doc_starts.size - 1
    stem = f"epoch-{fingerprint}-s{seed}-L{seq_len}-{layout}"
    key = {
        "kind": "epoch",
        "fingerprint": fingerprint,
        "num_docs": num_docs,
        "seed": seed,
        "epoch": epoch,
        "seq_len": seq_len,
        "layout": layout,
    }
    if layout == "bestfit":
        key["window"] = sampler.BEST_FIT_WINDOW
    fields: Fields = [
        ("perm", sampler.perm_dtype(num_docs), num_docs),
        ("cum", np.dtype(np.int64), num_docs + 1),
    ]

    def write(arrays: dict[str, np.ndarray]) -> dict:
        perm, cum = arrays["perm"], arrays["cum"]
        args = (doc_starts, seed, epoch, seq_len, layout)
        scalars = sampler.fill_epoch_index(perm, cum, *args, release=release_pages)
        # The build read every offset: hand those pages back so this rank keeps no more of
        # them resident than the ranks that only mapped the file.
        release_pages(doc_starts)
        return scalars

    arrays, scalars = epoch_file(folder, stem, epoch, key, fields, write)
    return EpochIndex(
        epoch,
        seed,
        seq_len,
        layout,
        arrays["perm"],
        arrays["cum"],
        int(scalars["total_rows"]),
        int(scalars["stream_end"]),
        int(scalars["split_samples"]),
    )


def epoch_file(
    folder: Path,
    stem: str,
    epoch: int,
    key: dict,
    fields: Fields,
    fill: Callable[[dict[str, np.ndarray]], dict],
) -> tuple[dict[str, np.ndarray], dict]:
    """(read-only arrays, scalars) of epoch `epoch`'s layout file `STEM-eEPOCH.idx` in `folder`
    (open_or_build); the one that builds it removes the same stem's epochs before epoch - 1,
    so a node keeps the current and the next epoch."""
    arrays, scalars, built = open_or_build(folder / f"{stem}-e{epoch}.idx", key, fields, fill)
    if built:
        _remove_epochs_before(folder, stem, epoch - 1)
    return arrays, scalars


def _remove_epochs_before(folder: Path, stem: str, oldest_kept: int) -> None:
    pattern = re.compile(re.escape(stem) + r"-e(\d+)\.idx")
    for path in folder.glob(f"{stem}-e*.idx"):
        found = pattern.fullmatch(path.name)
        if found and int(found[1]) < oldest_kept:
            path.unlink(missing_ok=True)  # ranks that still map it keep their pages


def release_pages(array: np.ndarray) -> None:
    """Drop this process's page-table entries of the shared mapping under `array` (the page
    cache keeps the pages; a later read maps them again). A private array is left alone."""
    base = array
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


def index_files_bytes(folder: Path) -> int:
    """Bytes of the finished index files in `folder` (what the node's page cache may hold)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.idx"))


# ----------------------------------------------------------------------------- one shared file


def open_or_build(
    path: Path, key: dict, fields: Fields, fill: Callable[[dict[str, np.ndarray]], dict]
) -> tuple[dict[str, np.ndarray], dict, bool]:
    """(read-only arrays, header scalars, whether this call built the file) of the file at
    `path` for `key`. When it is missing, holds another key or fails its checks, the first
    caller builds it under the lock: `fill(arrays)` writes the arrays through a shared mapping
    and returns the scalars. A disk without room for it, or a folder that refuses the write,
    raises a one-line PipelineError."""
    found, problem = _open(path, key, fields)
    if found is not None:
        return (*found, False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # removed as unused since it was opened
        with _build_lock(path):
            found, problem = _open(path, key, fields)  # built by the process we waited for
            if found is not None:
                return (*found, False)
            if problem != _MISSING:
                log.warning("index file %s %s; rebuilding it", path, problem)
            for leftover in path.parent.glob(f"{path.name}.tmp-{_HOST_TAG}*"):
                leftover.unlink(missing_ok=True)  # a killed builder's: no live one holds the lock
            _write(path, key, fields, fill)
    except OSError as exc:
        error = _write_error(path, _offsets(fields)[1], problem, exc)
        if error is None:
            raise
        raise error from exc
    found, _ = _open(path, key, fields, verify=False)  # its checksum was just read from it
    if found is None:
        raise PipelineError(
            f"{path} does not read back after it was written (another process replaced it?); "
            "remove the folder and run again"
        )
    return (*found, True)


def _write_error(path: Path, size: int, problem: str, exc: OSError) -> PipelineError | None:
    """The one line for a build of `path` (`size` bytes) that failed with `exc`: no room on the
    disk, or a folder that refuses the write; None for anything else."""
    if disk_full(exc):
        try:
            free = f"{format_bytes(shutil.disk_usage(path.parent).free)} free there"
        except OSError:
            free = "free space unknown"
        return PipelineError(
            f"no space for the index cache in {path.parent}: {path.name} needs {size} bytes "
            f"({format_bytes(size)}; {exc.strerror}, {free}); free space there or set "
            f"${ENV_VAR} to a folder with room"
        )
    if exc.errno in _REFUSED and Path(exc.filename or path).is_relative_to(path.parent):
        remove = "" if problem == _MISSING else "remove it, or "
        return PipelineError(
            f"index file {path} {problem} and cannot be written there ({exc.strerror}); "
            f"{remove}set ${ENV_VAR} to a writable folder"
        )
    return None


def _offsets(fields: Fields) -> tuple[list[int], int]:
    offsets, at = [], _PAGE
    for _, dtype, count in fields:
        offsets.append(at)
        at += -(-(count * dtype.itemsize) // _PAGE) * _PAGE
    return offsets, at


def _open(
    path: Path, key: dict, fields: Fields, verify: bool = True
) -> tuple[tuple[dict[str, np.ndarray], dict] | None, str]:
    """((arrays, scalars), "") when the file at `path` holds `key`'s index intact, else (None,
    what is wrong with it). `verify`: check its checksum too (a pread pass over the file)."""
    offsets, size = _offsets(fields)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None, _MISSING
    try:
        problem, header = _check(fd, key, size, verify)
        if problem:
            return None, problem
        mapping = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    arrays = {
        name: np.frombuffer(mapping, dtype=dtype, count=count, offset=offset)
        for (name, dtype, count), offset in zip(fields, offsets, strict=True)
    }
    return (arrays, header.get("scalars", {})), ""


def _check(fd: int, key: dict, size: int, verify: bool) -> tuple[str, dict]:
    """(what is wrong with the open index file `fd` for `key`, "" if nothing; its header)."""
    try:
        header = json.loads(os.pread(fd, _PAGE, 0).rstrip(b"\0"))
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("magic") != _MAGIC:
        return "has no readable header (damaged)", {}
    if header.get("key") != key:
        return "holds another index (copied over?)", header
    found = os.fstat(fd).st_size
    if found != size:
        return f"has {found} bytes, not {size} (truncated or damaged)", header
    if verify and _DIGEST not in header:
        return "has no checksum (written by an earlier version)", header
    if verify and header[_DIGEST] != _digest(fd, key, header.get("scalars", {})):
        return "fails its checksum (damaged)", header
    return "", header


def _digest(fd: int, key: dict, scalars: dict) -> str:
    """The checksum a header records: sha256 of the key, the scalars and every byte after the
    header."""
    return fd_sha256(fd, _PAGE, json.dumps([key, scalars], sort_keys=True).encode())


def _write(path: Path, key: dict, fields: Fields, fill) -> None:
    offsets, size = _offsets(fields)
    with atomic_file(path, tag=_HOST_TAG) as f:
        _reserve(f.fileno(), size)
        # Shared: the pages written are the file's page cache, and no private copy is made.
        mapping = mmap.mmap(f.fileno(), size)
        arrays = {
            name: np.frombuffer(mapping, dtype=dtype, count=count, offset=offset)
            for (name, dtype, count), offset in zip(fields, offsets, strict=True)
        }
        scalars = fill(arrays)
        del arrays
        digest = _digest(f.fileno(), key, scalars)  # pread sees the mapping's pages
        header = {"magic": _MAGIC, "key": key, "scalars": scalars, _DIGEST: digest}
        header = json.dumps(header).encode()
        if len(header) > _PAGE:
            raise PipelineError(f"{path}: header of {len(header)} bytes exceeds {_PAGE}")
        mapping[: len(header)] = header
        mapping.flush()
        try:
            mapping.close()
        except BufferError:
            # A numba kernel's first call (the one that compiles it) can leave reference cycles
            # that hold the calling frames, and with them `fill`'s views of this mapping.
            gc.collect()
            mapping.close()


def _reserve(fd: int, size: int) -> None:
    """Give the file `size` bytes with their disk blocks allocated, before it is mapped: a store
    into a mapped page with no block behind it (a full disk) is a SIGBUS, where this fails with
    ENOSPC. A file system without fallocate gets a sparse file, as before."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold `PATH.lock` exclusively, waiting for a builder that holds it; the file is removed
    on release (a waiter that locked the removed file tries again)."""
    lock_path = path.with_name(f"{path.name}.lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # fails on a full disk: released below
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
