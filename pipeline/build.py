"""`pipeline build`: text/JSONL/Parquet/`datasets` inputs -> Arrow token shards + index.json.

Inputs are read in chunks of documents (pipeline/sources.py), tokenised a chunk at a time
(vectorised: an Arrow cast for bytes, `encode_batch` for a Hugging Face tokenizer, both
releasing the GIL) by `num_proc` threads, and the tokens are appended to a raw file in a
temporary folder beside the output. Each shard is then written as an uncompressed Arrow IPC file
whose values come straight from a memory map of that raw file, so the build's memory stays at a
few chunks whatever the corpus or document size. The temporary folder replaces the output only
when every file and `index.json` are complete and fsynced, under a lock on the output, and only
if the output is missing, empty, or a dataset this project built (never a folder of other
files, a training output, or one holding an input or the current folder).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
from tqdm import tqdm

from lowmem_core.durable import file_sha256, fsync_path
from lowmem_core.errors import PipelineError
from lowmem_core.format import COLUMN, FORMAT, INDEX_NAME
from lowmem_core.locks import FolderLock
from pipeline import sources
from pipeline.config import BuildConfig
from pipeline.sources import (
    Chunk,
    ReadOptions,
    Source,
    clean,
    read_source,
    resolve_inputs,
    safe_cut,
)
from pipeline.tokenizer import Encoded, load_tokenizer, token_dtype_for, with_prefix
from pipeline.workers import ordered_map

log = logging.getLogger(__name__)

_TRAINING_MARKERS = ("train_latest_state", "model.safetensors")


@dataclass(frozen=True)
class BuildReport:
    out_dir: Path
    num_documents: int
    num_tokens: int
    num_shards: int
    seconds: float
    skipped: dict[str, tuple[int, int]] = field(default_factory=dict)  # input -> (empty, null)
    documents_in_pieces: int = 0  # documents longer than sources.PIECE_CHARS, in pieces

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)

    def notes(self, text_field: str) -> list[str]:
        """One line per thing the user should know about what was left out or cut."""
        lines = [
            f"skipped {empty + null} records of {path} without text ({empty} empty or "
            f"whitespace only, {null} null or without the field {text_field!r})"
            for path, (empty, null) in self.skipped.items()
        ]
        if self.documents_in_pieces:
            lines.append(
                f"tokenised {self.documents_in_pieces} documents longer than "
                f"{sources.PIECE_CHARS:,} characters in pieces cut at line breaks (memory stays "
                "bounded)"
            )
        return lines


# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class _EncodedChunk:
    encoded: Encoded  # values already in the dataset's dtype
    tail_continues: bool
    source: Source
    skipped_empty: int
    skipped_null: int
    documents_in_pieces: int


def _encode_chunk(chunk: Chunk, tokenizer, dtype: np.dtype, strip: bool) -> _EncodedChunk:
    cleaned = clean(chunk, strip)
    docs = cleaned.docs
    if isinstance(docs, pa.ChunkedArray):
        docs = docs.combine_chunks()
    in_pieces = 0
    if pa.types.is_large_string(docs.type):
        encoded, in_pieces = _encode_texts(docs, tokenizer, cleaned)
        where = np.ones(encoded.lengths.size, dtype=bool)
        where[:1] = not cleaned.head_continues  # a piece that continues a document has its BOS
        encoded = with_prefix(encoded, tokenizer.prefix, where)
        _check_ids(encoded.values, tokenizer, f"the tokenizer {tokenizer.id} produced")
    else:
        encoded = _token_lists(docs, tokenizer, chunk.source.path)
    values = encoded.values.astype(dtype, copy=False)
    return _EncodedChunk(
        Encoded(values, encoded.lengths),
        cleaned.tail_continues,
        chunk.source,
        cleaned.skipped_empty,
        cleaned.skipped_null,
        in_pieces,
    )


def _encode_texts(texts: pa.Array, tokenizer, cleaned) -> tuple[Encoded, int]:
    """Encode `texts`; one longer than a piece is encoded in pieces and its lengths summed."""
    limit = sources.PIECE_CHARS
    chars = pc.utf8_length(texts).to_numpy(zero_copy_only=False)
    long = np.flatnonzero(chars > limit)
    started_here = np.ones(chars.size, dtype=bool)
    started_here[:1] = not cleaned.head_continues
    cut = chars > limit
    cut[-1:] |= cleaned.tail_continues
    in_pieces = int((started_here & cut).sum())
    if long.size == 0:
        return tokenizer.encode_arrow(texts), in_pieces
    parts, prev = [], 0
    for i in long:
        if i > prev:
            parts.append(tokenizer.encode_arrow(texts.slice(prev, i - prev)))
        parts.append(_encode_long(texts[int(i)].as_py(), tokenizer))
        prev = int(i) + 1
    if prev < len(texts):
        parts.append(tokenizer.encode_arrow(texts.slice(prev)))
    return Encoded(
        np.concatenate([p.values for p in parts]), np.concatenate([p.lengths for p in parts])
    ), in_pieces


def _encode_long(text: str, tokenizer) -> Encoded:
    pieces, start, limit = [], 0, sources.PIECE_CHARS
    while start < len(text):
        window = text[start : start + limit + 1]
        end = start + (safe_cut(window, limit) if len(window) > limit else len(window))
        pieces.append(tokenizer.encode_arrow(pa.array([text[start:end]], pa.large_string())).values)
        start = end
    values = np.concatenate(pieces)
    return Encoded(values, np.array([values.size], dtype=np.int64))


def _token_lists(docs: pa.Array, tokenizer, path: Path) -> Encoded:
    flat = docs.flatten()
    if flat.null_count:
        raise PipelineError(f"token id lists in {path} hold nulls; give every id as an integer")
    values = flat.to_numpy(zero_copy_only=False) if len(flat) else np.zeros(0, np.int64)
    if values.size and (values.min() < 0 or values.max() >= tokenizer.vocab_size):
        raise PipelineError(
            f"token ids in {path} range over [{values.min()}, {values.max()}] but the tokenizer's "
            f"vocabulary has {tokenizer.vocab_size} ids; pass the --tokenizer that produced them"
        )
    offsets = docs.offsets.to_numpy()
    return Encoded(values=values, lengths=np.diff(offsets).astype(np.int64))


def _check_ids(values: np.ndarray, tokenizer, what: str) -> None:
    if values.size and int(values.max()) >= tokenizer.vocab_size:
        raise PipelineError(
            f"{what} token id {int(values.max())} but its vocabulary has {tokenizer.vocab_size} "
            "ids; fix the tokenizer's added tokens or pass another --tokenizer"
        )


# ----------------------------------------------------------------------------- writing


class _ShardWriter:
    """Appends tokens to raw files in the temp folder; finishes each shard as an Arrow file.

    A document that arrives in pieces (a chunk's last document continues in the next chunk)
    stays open until its last piece, and shards switch only at document boundaries.
    """

    def __init__(self, tmp_dir: Path, dtype: np.dtype, max_shard_tokens: int):
        self.tmp_dir, self.dtype, self.max_shard_tokens = tmp_dir, dtype, max_shard_tokens
        self.shards: list[dict] = []
        self._open_tokens: int | None = None  # tokens so far of a document still arriving
        self._open_raw()

    def _open_raw(self) -> None:
        self._raw_tokens = (self.tmp_dir / f"tokens-{len(self.shards):05d}.raw").open("wb")
        self._raw_lengths = (self.tmp_dir / f"lengths-{len(self.shards):05d}.raw").open("wb")
        self._shard_tokens = 0
        self._shard_docs = 0

    def append(self, encoded: Encoded, tail_continues: bool) -> None:
        values, lengths = encoded.values, encoded.lengths
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
        self._raw_tokens.write(values.tobytes())
        self._shard_tokens += int(values.size)

    def _end_open(self) -> None:
        self._raw_lengths.write(np.int64(self._open_tokens).tobytes())
        self._shard_docs += 1
        self._open_tokens = None

    def _append_documents(self, values: np.ndarray, lengths: np.ndarray) -> None:
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
            for fh in (self._raw_tokens, self._raw_lengths):
                fh.close()
                Path(fh.name).unlink()
        return self.shards

    def _finish_shard(self) -> None:
        """Write the shard's Arrow file, one record batch per BATCH_TOKENS tokens (at document
        boundaries), from a map of the raw file whose pages are dropped batch by batch."""
        self._raw_tokens.close()
        self._raw_lengths.close()
        tokens_path, lengths_path = Path(self._raw_tokens.name), Path(self._raw_lengths.name)
        value_type = pa.from_numpy_dtype(self.dtype)
        large = self._shard_tokens >= 1 << 31
        list_array = pa.LargeListArray if large else pa.ListArray
        schema = pa.schema(
            [pa.field(COLUMN, (pa.large_list if large else pa.list_)(value_type), nullable=False)]
        )
        name = f"shard-{len(self.shards):05d}.arrow"
        path = self.tmp_dir / name
        num_docs = 0
        with (
            _TokenMap(tokens_path, self.dtype) as tokens,
            lengths_path.open("rb") as lengths_file,
            pa.OSFile(str(path), "wb") as sink,
            ipc.new_file(sink, schema) as writer,
        ):
            start = 0
            for lengths in _batch_lengths(lengths_file):
                offsets = np.zeros(lengths.size + 1, dtype=np.int64 if large else np.int32)
                np.cumsum(lengths, out=offsets[1:])
                end = start + int(offsets[-1])
                values = pa.py_buffer(tokens.values[start:end]) if end > start else None
                column = list_array.from_arrays(
                    pa.array(offsets),
                    pa.Array.from_buffers(value_type, end - start, [None, values]),
                )
                writer.write_batch(pa.record_batch([column], schema=schema))
                del column, values
                tokens.drop_until(end)
                start, num_docs = end, num_docs + lengths.size
            if num_docs == 0:
                writer.write_batch(pa.record_batch([pa.array([], schema.field(0).type)], schema))
        fsync_path(path)
        tokens_path.unlink()
        lengths_path.unlink()
        self.shards.append(
            {
                "name": name,
                "num_documents": num_docs,
                "num_tokens": int(self._shard_tokens),
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        )


BATCH_TOKENS = 1 << 24  # tokens per record batch of a shard: what the writer holds mapped at once
_BATCH_DOCS = 1 << 20  # and at most this many documents (their lengths are read in windows)


def _batch_lengths(lengths_file) -> Iterator[np.ndarray]:
    """The document lengths of each record batch: at most BATCH_TOKENS tokens and _BATCH_DOCS
    documents (a longer document gets a batch of its own)."""
    pending, exhausted = np.zeros(0, np.int64), False
    while not exhausted or pending.size:
        if not exhausted:
            more = np.fromfile(lengths_file, dtype=np.int64, count=_BATCH_DOCS)
            exhausted = more.size < _BATCH_DOCS
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


# ----------------------------------------------------------------------------- the output folder


def _aside(out: Path, kind: str, pid: int | None = None) -> Path:
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
    from pipeline.manifest import read_manifest

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


def _make_parent(out: Path) -> list[Path]:
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


def _recover_interrupted(out: Path) -> None:
    """Clean up after builds of `out` that were killed (the caller holds the lock, so no build
    of `out` is alive): remove their temp folders, and put back a dataset that a killed
    --overwrite build had moved aside but not yet replaced. Touches only this build's names."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.lowmem-(tmp|old)-\d+")
    for leftover in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(leftover.name)
        if match is None:
            continue
        if match.group(1) == "old" and not out.exists():
            os.rename(leftover, out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _commit_out(tmp: Path, out: Path) -> None:
    fsync_path(tmp)
    old = None
    if out.exists():
        old = _aside(out, "old")
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _disk_full(exc: BaseException) -> bool:
    if not isinstance(exc, OSError):
        return False
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return any(s in str(exc) for s in ("No space left", "Disk quota exceeded", "File too large"))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# ----------------------------------------------------------------------------- the build


def build_dataset(cfg: BuildConfig, progress: bool = True) -> BuildReport:
    """Build the dataset that `cfg` describes; return counts and the build rate."""
    started = time.perf_counter()
    sources = resolve_inputs(cfg.inputs)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    out = Path(cfg.out)
    check_out(out, cfg.overwrite, sources)
    created = _make_parent(out)
    try:
        with FolderLock(_aside(out, "lock"), f"output {out}", remove_on_release=True):
            _recover_interrupted(out)
            check_out(out, cfg.overwrite, sources)  # again: another build may have finished
            tmp = _aside(out, "tmp")
            tmp.mkdir()
            try:
                report = _write(cfg, sources, tokenizer, tmp, progress)
                _commit_out(tmp, out)
            except BaseException as exc:
                written = _folder_bytes(tmp) if tmp.is_dir() else 0
                shutil.rmtree(tmp, ignore_errors=True)
                if _disk_full(exc):
                    raise PipelineError(
                        f"the disk holding {out.parent} filled up after {written / 2**20:.1f} MiB "
                        f"of the dataset ({exc.strerror or str(exc).splitlines()[0]}); nothing "
                        "was written: free space or choose another --out"
                    ) from None
                raise
    except BaseException:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    for line in report.notes(cfg.text_field):
        log.info(line)
    return BuildReport(
        out,
        report.num_documents,
        report.num_tokens,
        report.num_shards,
        time.perf_counter() - started,
        report.skipped,
        report.documents_in_pieces,
    )


@contextlib.contextmanager
def _one_core_per_thread() -> Iterator[None]:
    """Each of the --num-proc threads tokenises on one core: the `tokenizers` thread pool is off
    while the build runs (unless TOKENIZERS_PARALLELISM is set): faster than threads feeding
    one pool (5.0 s vs 5.7 s on 30 MB with 2 threads), and --num-proc is the cores used."""
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def _write(
    cfg: BuildConfig, sources: list[Source], tokenizer, tmp: Path, progress: bool
) -> BuildReport:
    dtype = token_dtype_for(tokenizer.vocab_size)
    options = ReadOptions(text_field=cfg.text_field, split=cfg.split)
    chunks = (chunk for source in sources for chunk in read_source(source, options))
    encode = partial(_encode_chunk, tokenizer=tokenizer, dtype=dtype, strip=cfg.strip)
    writer = _ShardWriter(tmp, dtype, cfg.max_shard_tokens)
    skipped: dict[str, list[int]] = {}
    in_pieces = 0
    # A with-block closes the bar on errors too, so the error line starts a line of its own.
    with (
        tqdm(unit=" docs", unit_scale=True, desc="build", disable=not progress) as bar,
        _one_core_per_thread(),
    ):
        for result in ordered_map(encode, chunks, cfg.num_proc):
            writer.append(result.encoded, result.tail_continues)
            if result.skipped_empty or result.skipped_null:
                counts = skipped.setdefault(str(result.source.path), [0, 0])
                counts[0] += result.skipped_empty
                counts[1] += result.skipped_null
            in_pieces += result.documents_in_pieces
            bar.update(int(result.encoded.lengths.size))
    shards = writer.close()
    num_docs = sum(s["num_documents"] for s in shards)
    num_tokens = sum(s["num_tokens"] for s in shards)
    if num_docs == 0 or num_tokens == 0:
        raise PipelineError(
            f"no documents with text found in {', '.join(str(s.path) for s in sources)}; "
            "check --text-field and the input files"
        )
    index = {
        "format": FORMAT,
        "num_documents": num_docs,
        "num_tokens": num_tokens,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "column": COLUMN,
        "tokenizer": {
            "kind": tokenizer.kind,
            "id": tokenizer.id,
            "source": tokenizer.source,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
            "documents_start_with_bos": bool(tokenizer.prefix),
        },
        "files": shards,
        "sources": [str(s.path) for s in sources],
        "build": {
            "split": cfg.split,
            "strip": cfg.strip,
            "skipped_records": sum(sum(c) for c in skipped.values()),
            "documents_in_pieces": in_pieces,
        },
    }
    index_path = tmp / INDEX_NAME
    index_path.write_text(json.dumps(index, indent=1))
    fsync_path(index_path)
    return BuildReport(
        tmp,
        num_docs,
        num_tokens,
        len(shards),
        0.0,
        {k: (v[0], v[1]) for k, v in skipped.items()},
        in_pieces,
    )
