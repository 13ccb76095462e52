"""The build's shard writer: token runs -> uncompressed Arrow IPC shard files, memory bounded.

Tokens are appended to a raw file in the temporary folder; each shard is then written as an
Arrow file whose values come straight from a memory map of that raw file, in record batches of
at most BATCH_TOKENS tokens, so the writer's resident memory stays at a batch whatever the
corpus or document size. A prompt/response build also writes each document's prompt length
and whether its response was cut to fit (`RESPONSE_CUT_COLUMN`), and a chat build the labelled
token spans of its multi-turn documents (`LABEL_SPANS_COLUMN`, in shards that hold any).
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from lowmem_core.durable import file_sha256, fsync_path
from lowmem_core.format import (
    COLUMN,
    LABEL_SPANS_COLUMN,
    PROMPT_LENGTHS_COLUMN,
    RESPONSE_CUT_COLUMN,
)
from pipeline.tokenizer import Encoded


class ShardWriter:
    """Appends tokens to raw files in the temp folder; finishes each shard as an Arrow file.

    A document that arrives in pieces (a chunk's last document continues in the next chunk)
    stays open until its last piece, and shards switch only at document boundaries. With
    `prompt_lengths`, every document comes whole with its prompt length, stored in the shard's
    PROMPT_LENGTHS_COLUMN (uint32, one per document), whether its response was cut, in
    RESPONSE_CUT_COLUMN (uint8, 1 where cut), and its labelled spans, in LABEL_SPANS_COLUMN
    (list<uint32> of flat (start, length) pairs; empty for a one-span document), written only
    in shards where some document has spans.
    """

    def __init__(
        self, tmp_dir: Path, dtype: np.dtype, max_shard_tokens: int, prompt_lengths: bool = False
    ):
        self.tmp_dir, self.dtype, self.max_shard_tokens = tmp_dir, dtype, max_shard_tokens
        self.prompt_lengths = prompt_lengths
        self.shards: list[dict] = []
        self._open_tokens: int | None = None  # tokens so far of a document still arriving
        self._open_raw()

    def _open_raw(self) -> None:
        self._raw_tokens = (self.tmp_dir / f"tokens-{len(self.shards):05d}.raw").open("wb")
        self._raw_lengths = (self.tmp_dir / f"lengths-{len(self.shards):05d}.raw").open("wb")
        self._raw_prompts = self._raw_cut = self._raw_span_counts = self._raw_spans = None
        if self.prompt_lengths:
            n = len(self.shards)
            self._raw_prompts = (self.tmp_dir / f"prompts-{n:05d}.raw").open("wb")
            self._raw_cut = (self.tmp_dir / f"cut-{n:05d}.raw").open("wb")
            self._raw_span_counts = (self.tmp_dir / f"span-counts-{n:05d}.raw").open("wb")
            self._raw_spans = (self.tmp_dir / f"spans-{n:05d}.raw").open("wb")
        self._shard_spans = 0
        self._shard_tokens = 0
        self._shard_docs = 0

    def append(
        self,
        encoded: Encoded,
        tail_continues: bool,
        prompt_lengths: np.ndarray | None = None,
        response_cut: np.ndarray | None = None,
        spans: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Append documents; `prompt_lengths` (num_docs,) and `response_cut` (num_docs,) bool
        with a writer made for them, and `spans`: (span counts (num_docs,) int64, 0 for a
        one-span document; their (start, length) pairs (sum(counts), 2)), or None for none."""
        values, lengths = encoded.values, encoded.lengths
        if self.prompt_lengths:
            if spans is None:
                spans = (np.zeros(lengths.size, np.int64), np.zeros((0, 2), np.int64))
            self._append_documents(values, lengths, (prompt_lengths, response_cut, *spans))
            return
        if self._open_tokens is not None:  # lengths[0] continues the open document
            n = int(lengths[0])
            self._write(values[:n])
            self._open_tokens += n
            values, lengths = values[n:], lengths[1:]
            if tail_continues and lengths.size == 0:
                return
            self._end_open()
        if tail_continues:
            whole = int(lengths[:-1].sum())
            self._append_documents(values[:whole], lengths[:-1])
            if self._shard_docs and self._shard_tokens >= self.max_shard_tokens:
                self._next_shard()
            self._write(values[whole:])
            self._open_tokens = int(lengths[-1])
        else:
            self._append_documents(values, lengths)

    def _write(self, values: np.ndarray) -> None:
        self._raw_tokens.write(np.ascontiguousarray(values))
        self._shard_tokens += int(values.size)

    def _end_open(self) -> None:
        self._raw_lengths.write(np.int64(self._open_tokens).tobytes())
        self._shard_docs += 1
        self._open_tokens = None

    def _append_documents(
        self,
        values: np.ndarray,
        lengths: np.ndarray,
        sft: tuple[np.ndarray, ...] | None = None,
    ) -> None:
        """Append whole documents, starting a new shard at a document boundary when full."""
        while lengths.size:
            ends = np.cumsum(lengths)
            fit = int(
                np.searchsorted(ends, self.max_shard_tokens - self._shard_tokens, side="right")
            )
            if fit == 0 and self._shard_docs:
                self._next_shard()
                continue
            fit = max(fit, 1)  # a document longer than a shard gets a shard of its own
            n_tokens = int(ends[fit - 1])
            self._write(values[:n_tokens])
            self._raw_lengths.write(lengths[:fit].astype(np.int64, copy=False).tobytes())
            if sft is not None:
                prompts, cut, span_counts, spans = sft
                self._raw_prompts.write(prompts[:fit].astype(np.uint32).tobytes())
                self._raw_cut.write(cut[:fit].astype(np.uint8).tobytes())
                self._raw_span_counts.write(span_counts[:fit].astype(np.int64).tobytes())
                taken = int(span_counts[:fit].sum())
                self._raw_spans.write(spans[:taken].astype(np.uint32).tobytes())
                self._shard_spans += taken
                sft = (prompts[fit:], cut[fit:], span_counts[fit:], spans[taken:])
            self._shard_docs += fit
            values, lengths = values[n_tokens:], lengths[fit:]

    def _next_shard(self) -> None:
        self._finish_shard()
        self._open_raw()

    def close(self) -> list[dict]:
        if self._open_tokens is not None:
            self._end_open()
        if self._shard_docs or not self.shards:
            self._finish_shard()
        else:
            for fh in self._raw_files():
                fh.close()
                Path(fh.name).unlink()
        return self.shards

    def _raw_files(self) -> list:
        extra = []
        if self._raw_prompts is not None:
            extra = [self._raw_prompts, self._raw_cut, self._raw_span_counts, self._raw_spans]
        return [self._raw_tokens, self._raw_lengths, *extra]

    def _finish_shard(self) -> None:
        """Write the shard's Arrow file, one record batch per BATCH_TOKENS tokens (at document
        boundaries), from a map of the raw file whose pages are dropped batch by batch."""
        raw = self._raw_files()
        for fh in raw:
            fh.close()
        tokens_path, lengths_path, *sft_paths = (Path(fh.name) for fh in raw)
        value_type = pa.from_numpy_dtype(self.dtype)
        large = self._shard_tokens >= 1 << 31
        list_array = pa.LargeListArray if large else pa.ListArray
        fields = [pa.field(COLUMN, (pa.large_list if large else pa.list_)(value_type), False)]
        if self.prompt_lengths:
            fields.append(pa.field(PROMPT_LENGTHS_COLUMN, pa.uint32(), nullable=False))
            fields.append(pa.field(RESPONSE_CUT_COLUMN, pa.uint8(), nullable=False))
        if self._shard_spans:
            fields.append(pa.field(LABEL_SPANS_COLUMN, pa.list_(pa.uint32()), nullable=False))
        schema = pa.schema(fields)
        name = f"shard-{len(self.shards):05d}.arrow"
        path = self.tmp_dir / name
        num_docs = 0
        with (
            _TokenMap(tokens_path, self.dtype) as tokens,
            lengths_path.open("rb") as lengths_file,
            contextlib.ExitStack() as stack,
            pa.OSFile(str(path), "wb") as sink,
            ipc.new_file(sink, schema) as writer,
        ):
            sft_files = [stack.enter_context(p.open("rb")) for p in sft_paths]
            start = 0
            for lengths in _batch_lengths(lengths_file):
                offsets = np.zeros(lengths.size + 1, dtype=np.int64 if large else np.int32)
                np.cumsum(lengths, out=offsets[1:])
                end = start + int(offsets[-1])
                values = pa.py_buffer(tokens.values[start:end]) if end > start else None
                columns = [
                    list_array.from_arrays(
                        pa.array(offsets),
                        pa.Array.from_buffers(value_type, end - start, [None, values]),
                    )
                ]
                if sft_files:
                    prompts = np.fromfile(sft_files[0], dtype=np.uint32, count=lengths.size)
                    cut = np.fromfile(sft_files[1], dtype=np.uint8, count=lengths.size)
                    columns += [pa.array(prompts, pa.uint32()), pa.array(cut, pa.uint8())]
                    counts = np.fromfile(sft_files[2], dtype=np.int64, count=lengths.size)
                    if self._shard_spans:
                        columns.append(_span_lists(sft_files[3], counts))
                writer.write_batch(pa.record_batch(columns, schema=schema))
                del columns, values
                tokens.drop_until(end)
                start, num_docs = end, num_docs + lengths.size
            if num_docs == 0:
                empty = [pa.array([], f.type) for f in schema]
                writer.write_batch(pa.record_batch(empty, schema=schema))
        fsync_path(path)
        for raw_path in (tokens_path, lengths_path, *sft_paths):
            raw_path.unlink()
        self.shards.append(
            {
                "name": name,
                "num_documents": num_docs,
                "num_tokens": int(self._shard_tokens),
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        )


def _span_lists(spans_file, counts: np.ndarray) -> pa.ListArray:
    """The next `counts` documents' spans from the raw spans file as a list<uint32> array of
    flat (start, length) pairs."""
    offsets = np.zeros(counts.size + 1, dtype=np.int32)
    np.cumsum(2 * counts, out=offsets[1:])
    flat = np.fromfile(spans_file, dtype=np.uint32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.uint32()))


# Tokens per record batch of a shard: what the writer holds mapped at once (8 MB of uint16:
# finishing a shard then holds less than tokenising does).
BATCH_TOKENS = 1 << 22
_BATCH_DOCS = 1 << 18  # and at most this many documents
# Document lengths read at a time (512 KB): a batch of typical documents needs one or two, and
# the writer's arrays stay at the size of its batch rather than of _BATCH_DOCS.
_LENGTHS_WINDOW = 1 << 16


def _batch_lengths(lengths_file) -> Iterator[np.ndarray]:
    """The document lengths of each record batch: at most BATCH_TOKENS tokens and _BATCH_DOCS
    documents (a longer document gets a batch of its own)."""
    pending, exhausted = np.zeros(0, np.int64), False
    while not exhausted or pending.size:
        if not exhausted:
            more = np.fromfile(lengths_file, dtype=np.int64, count=_LENGTHS_WINDOW)
            exhausted = more.size < _LENGTHS_WINDOW
            pending = np.concatenate([pending, more])
        ends = np.cumsum(pending)
        while pending.size and (exhausted or ends[-1] > BATCH_TOKENS or pending.size > _BATCH_DOCS):
            k = int(np.searchsorted(ends, BATCH_TOKENS, side="right"))
            k = min(max(k, 1), _BATCH_DOCS)
            yield pending[:k]
            pending, ends = pending[k:], ends[k:] - ends[k - 1]


class _TokenMap:
    """A read-only map of a raw token file whose pages can be dropped from this process once
    written out (they stay in the page cache), so the writer's resident memory stays at a batch."""

    def __init__(self, path: Path, dtype: np.dtype):
        self._file = path.open("rb")
        size = path.stat().st_size
        self._map = mmap.mmap(self._file.fileno(), 0, prot=mmap.PROT_READ) if size else None
        self.values = np.frombuffer(self._map, dtype=dtype) if size else np.zeros(0, dtype)
        self._itemsize = np.dtype(dtype).itemsize

    def drop_until(self, end: int) -> None:
        length = end * self._itemsize // mmap.PAGESIZE * mmap.PAGESIZE
        if self._map is not None and length:
            self._map.madvise(mmap.MADV_DONTNEED, 0, length)

    def __enter__(self) -> _TokenMap:
        return self

    def __exit__(self, *exc) -> None:
        del self.values
        if self._map is not None:
            # An error may leave an Arrow view alive: the map then goes when the view does.
            with contextlib.suppress(BufferError):
                self._map.close()
        self._file.close()
