"""Where a dataset's token values come from: memory-mapped views, or `pread` (ultra-low-mem).

`open_dataset` picks one reader once; every read goes through it, so nothing above the dataset
branches on the mode or sees a file descriptor, a chunk or a file offset.

- mmap: the Arrow files stay memory-mapped; reads are zero-copy numpy views of the token values.
- pread (ultra-low-mem): nothing stays mapped; each read `pread`s just the byte ranges it needs
  (inside the numba kernel, see collate.py), so resident memory does not grow with what was read,
  and every `page_cache_budget_bytes` read the files' pages are dropped from the page cache
  (posix_fadvise DONTNEED), so the kernel's cache of them stays bounded too. Dropping per batch
  instead would cost 25x in throughput: documents are ~10 to a 4 KiB page, and a page dropped
  after one document must come back from disk for each of its neighbours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from lowmem_core.errors import PipelineError
from pipeline import collate


@dataclass
class Chunk:
    """A contiguous run of token values in one file (one Arrow record batch)."""

    path: Path
    values_file_offset: int  # bytes from the start of the file to this chunk's first token
    first_doc: int  # global index of the chunk's first document
    first_token: int  # global index of the chunk's first token
    num_tokens: int
    values: np.ndarray | None  # zero-copy view of the chunk's tokens; None once mapped no longer


def open_reader(
    chunks: list[Chunk],
    token_dtype: np.dtype,
    maps: list,
    *,
    ultra_low_mem: bool,
    page_cache_budget_bytes: int,
):
    """The reader of `chunks`: mmap views (`maps` keeps the mappings alive), or pread."""
    if ultra_low_mem:
        return _PreadReader(chunks, token_dtype, page_cache_budget_bytes)
    return _MmapReader(chunks, token_dtype, maps)


def closed_reader(path: Path, ultra_low_mem: bool):
    """What a closed dataset reads through: every read is one PipelineError."""
    return _ClosedReader(path, ultra_low_mem)


class _Reader:
    """What both readers share: locating token ranges and segments in the chunks."""

    def __init__(self, chunks: list[Chunk], token_dtype: np.dtype):
        self._chunks = chunks
        self._dtype = token_dtype
        end = chunks[-1].first_token + chunks[-1].num_tokens if chunks else 0
        # (chunks + 1,) int64: chunk c holds global tokens [first[c], first[c + 1]).
        self._first = np.array([c.first_token for c in chunks] + [end], dtype=np.int64)

    def _pieces(self, start: int, end: int):
        """(chunk, lo, hi) for the global token range [start, end), split at chunk borders."""
        c = int(np.searchsorted(self._first, start, side="right")) - 1
        while start < end:
            hi = min(end, int(self._first[c + 1]))
            if hi > start:
                yield self._chunks[c], start, hi
            start = max(start, hi)
            c += 1

    def close(self) -> None:
        self._chunks = []


class _MmapReader(_Reader):
    def __init__(self, chunks: list[Chunk], token_dtype: np.dtype, maps: list):
        super().__init__(chunks, token_dtype)
        self._maps = maps  # the memory maps the chunks' views point into
        # The chunks' views as one numba list, so a batch is one kernel call however many chunks
        # it touches; all read-only, as the mapped ones are, so the list has one element type.
        self._views = numba.typed.List([_read_only(c.values) for c in chunks]) if chunks else None

    def tokens(self, start: int, end: int) -> np.ndarray:
        pieces = [
            chunk.values[lo - chunk.first_token : hi - chunk.first_token]
            for chunk, lo, hi in self._pieces(start, end)
        ]
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self._dtype)

    def read_segments(self, segs, count, seq_len, ids, labels, pos) -> None:
        if self._views is None:
            return
        collate.emit_from_chunks(
            self._views,
            self._first,
            segs.src,
            segs.n,
            segs.dst,
            segs.doc0,
            count,
            seq_len,
            ids,
            labels,
            pos,
        )

    def close(self) -> None:
        super().close()
        self._maps = []
        self._views = None


class _PreadReader(_Reader):
    def __init__(self, chunks: list[Chunk], token_dtype: np.dtype, page_cache_budget_bytes: int):
        super().__init__([dataclasses.replace(c, values=None) for c in chunks], token_dtype)
        self._budget = page_cache_budget_bytes
        self._bytes_since_drop = 0
        self._lock = threading.Lock()
        self._local = threading.local()  # per reader thread: a staging buffer laid out like ids
        self._fds: dict[Path, int] = {}
        # Closes the files when the reader is closed, collected, or at interpreter exit (before
        # module teardown, so never "Exception ignored in __del__").
        self._close_fds = weakref.finalize(self, _close_all, self._fds)
        for chunk in self._chunks:
            if chunk.path not in self._fds:
                fd = os.open(chunk.path, os.O_RDONLY)
                self._fds[chunk.path] = fd
                # Reads are scattered documents: readahead would fetch 128 KiB per 4 KiB page.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        # Per chunk, its file and where global token 0 would sit in it, for the pread kernel.
        itemsize = token_dtype.itemsize
        self._chunk_fd = np.array([self._fds[c.path] for c in self._chunks], dtype=np.int64)
        self._chunk_base = np.array(
            [c.values_file_offset - c.first_token * itemsize for c in self._chunks], dtype=np.int64
        )

    def tokens(self, start: int, end: int) -> np.ndarray:
        itemsize = self._dtype.itemsize
        data = bytearray()
        for chunk, lo, hi in self._pieces(start, end):
            offset = chunk.values_file_offset + (lo - chunk.first_token) * itemsize
            piece = os.pread(self._fds[chunk.path], (hi - lo) * itemsize, offset)
            if len(piece) != (hi - lo) * itemsize:
                raise _short_read(chunk)
            data += piece
        self._account(len(data))
        return np.frombuffer(data, dtype=self._dtype)  # owns its (writable) bytearray

    def read_segments(self, segs, count, seq_len, ids, labels, pos) -> None:
        staging = getattr(self._local, "staging", None)
        if staging is None or staging.shape[0] < ids.shape[0]:
            staging = self._local.staging = np.empty(ids.shape[0], dtype=self._dtype)
        nbytes = collate.pread_tokens(
            self._chunk_fd,
            self._chunk_base,
            self._first,
            self._dtype.itemsize,
            segs.src,
            segs.n,
            segs.dst,
            count,
            staging,
        )
        if nbytes < 0:
            raise _short_read(self._chunks[-nbytes - 1])
        self._account(nbytes)
        collate.emit_staged(staging, segs.n, segs.dst, segs.doc0, count, seq_len, ids, labels, pos)

    def _account(self, nbytes: int) -> None:
        """Count bytes read; past the budget, drop the files' cached pages."""
        with self._lock:
            self._bytes_since_drop += nbytes
            if self._bytes_since_drop < self._budget:
                return
            self._bytes_since_drop = 0
            for fd in self._fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        super().close()
        self._close_fds()


def _read_only(values: np.ndarray) -> np.ndarray:
    view = values.view()
    view.setflags(write=False)
    return view


def _close_all(fds: dict, close=os.close) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            close(fd)
    fds.clear()


def _short_read(chunk: Chunk) -> PipelineError:
    return PipelineError(
        f"short read from {chunk.path} (file changed or truncated while open); rebuild the dataset"
    )


class _ClosedReader:
    def __init__(self, path: Path, ultra_low_mem: bool):
        mode = ", ultra_low_mem=True" if ultra_low_mem else ""
        self._message = (
            f"dataset {path} is closed; reopen it with open_dataset({str(path)!r}{mode})"
        )

    def tokens(self, start: int, end: int) -> np.ndarray:
        raise PipelineError(self._message)

    def read_segments(self, segs, count, seq_len, ids, labels, pos) -> None:
        raise PipelineError(self._message)

    def close(self) -> None:
        pass
