"""Open a token dataset: documents of token ids read through one storage reader.

A dataset is a list of chunks (one per Arrow record batch: one per shard for our own builds),
each a contiguous run of token values in a file, plus one int64 array of global document start
offsets (8 bytes per document). The offsets are written once per node into an index file that
every process maps read-only (pipeline/index_cache.py), so ranks, threads and forked processes
share its pages instead of each holding a copy. How the token values are read (mmap views or
ultra-low-mem `pread`) is decided once at open, in pipeline/storage.py.

A prompt/response dataset (index.json "kind": "sft") also holds each document's prompt length
and whether the build cut its response to fit (one int64 and one byte per document), kept
beside the offsets in the same shared file, in either mode; a chat dataset whose documents
hold several assistant turns also their labelled token spans (`label_spans`).

Also opens a `datasets` save_to_disk folder that has a token-id list column, without a rebuild
(and as "sft" when a `prompt_lengths` integer column sits beside it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from lowmem_core.durable import file_sha256
from lowmem_core.errors import PipelineError
from lowmem_core.format import (
    COLUMN,
    INDEX_NAME,
    KIND_SFT,
    KIND_TEXT,
    PROMPT_LENGTHS_COLUMN,
)
from pipeline import cost, index_cache, storage
from pipeline.collate import Segments
from pipeline.manifest import read_manifest
from pipeline.storage import Chunk

_REBUILD = "rebuild it with `python -m pipeline build INPUT... --out DIR --overwrite`"


@dataclass(frozen=True)
class _Mapping:
    file: pa.MemoryMappedFile
    base_address: int  # where byte 0 of the file sits in memory


@dataclass(frozen=True)
class _Layout:
    chunks: list[Chunk]
    doc_starts: np.ndarray  # (num_docs + 1,) int64 global token offsets (shared, read-only)
    token_dtype: np.dtype
    meta: dict  # vocab_size, bos_id, eos_id, pad_id, tokenizer_id, fingerprint, source
    prompt_lengths: np.ndarray | None  # (num_docs,) int64, for a prompt/response dataset
    response_cut: np.ndarray | None  # (num_docs,) uint8, 1: response cut (its EOS no target)
    span_starts: np.ndarray | None  # (num_docs + 1,) int64 rows of `spans` per document
    spans: np.ndarray | None  # (S, 2) int64 (start, length) labelled spans
    index_folder: Path  # where the shared index files live (pipeline/index_cache.py)


class TokenDataset:
    """Documents of token ids: `ds[i]`, `len(ds)`, `doc_starts`, and `read_segments` for the
    loader. `ultra_low_mem` says which reader serves the reads (see pipeline/storage.py).
    `kind` is "text" or "sft"; an "sft" dataset's `prompt_lengths` (num_docs,) int64 gives the
    prompt tokens at the start of each document and its `response_cut` (num_docs,) uint8, 1
    where the build cut the response to fit, so the EOS after it is no target (None for
    "text"). `label_spans(i)` gives the token spans of document i that carry labels.
    `doc_starts`, `prompt_lengths`, `response_cut`, `span_starts` and `spans` are read-only
    views of a file shared by the node; `index_folder` holds it and the loader's epoch
    indexes. `span_starts` / `spans` are None unless some document has several spans: document
    i's are rows [span_starts[i], span_starts[i + 1]) of the (S, 2) int64 `spans`, and one
    with none has the one span from its prompt length to its end."""

    def __init__(
        self,
        path: Path,
        layout: _Layout,
        maps: list,
        ultra_low_mem: bool,
        page_cache_budget_bytes: int = 64 << 20,
        index_cache: Path | str | None = None,
    ):
        self.path = path
        self.index_cache = index_cache  # as given to open_dataset (None: the default place)
        self.index_folder: Path = layout.index_folder
        self.ultra_low_mem = ultra_low_mem
        self.page_cache_budget_bytes = page_cache_budget_bytes
        self._reader = storage.open_reader(
            layout.chunks,
            layout.token_dtype,
            maps,
            ultra_low_mem=ultra_low_mem,
            page_cache_budget_bytes=page_cache_budget_bytes,
        )
        meta = layout.meta
        self.vocab_size: int = meta["vocab_size"]
        self.bos_id: int | None = meta["bos_id"]
        self.eos_id: int = meta["eos_id"]
        self.pad_id: int = meta["pad_id"]
        self.tokenizer_id: str = meta["tokenizer_id"]
        self.fingerprint: str = meta["fingerprint"]
        self.token_dtype: np.dtype = layout.token_dtype
        self.doc_starts: np.ndarray = layout.doc_starts
        self.prompt_lengths: np.ndarray | None = layout.prompt_lengths
        self.response_cut: np.ndarray | None = layout.response_cut
        self.span_starts: np.ndarray | None = layout.span_starts
        self.spans: np.ndarray | None = layout.spans
        self.kind: str = KIND_TEXT if layout.prompt_lengths is None else KIND_SFT

    # -- sizes ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.doc_starts.size - 1)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_starts[-1])

    @property
    def token_bytes(self) -> int:
        return self.num_tokens * self.token_dtype.itemsize

    @property
    def shared_index_bytes(self) -> int:
        """Bytes of the node's shared index files for this dataset (pipeline/cost.py)."""
        num_spans = 0 if self.spans is None else int(self.spans.shape[0])
        return cost.shared_index_bytes(len(self), self.kind == KIND_SFT, num_spans)

    @property
    def doc_lengths(self) -> np.ndarray:
        """(num_docs,) int64 tokens per document (computed on each call; 8 bytes per document)."""
        return np.diff(self.doc_starts)

    def label_spans(self, i: int) -> np.ndarray:
        """(k, 2) int64 (start, length) token spans of document i that carry labels, in order
        (the loader labels them, and the EOS it appends after the document). A text dataset's
        document is one span; a prompt/response one the span after its prompt."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for a dataset of {n} documents")
        i %= n
        length = int(self.doc_starts[i + 1] - self.doc_starts[i])
        if self.span_starts is not None and self.span_starts[i + 1] > self.span_starts[i]:
            return np.array(self.spans[self.span_starts[i] : self.span_starts[i + 1]])
        start = 0 if self.prompt_lengths is None else int(self.prompt_lengths[i])
        if start == length:
            return np.zeros((0, 2), dtype=np.int64)
        return np.array([[start, length - start]], dtype=np.int64)

    # -- reads ------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> np.ndarray:
        """Document i's tokens: a read-only view in mmap mode, a fresh array in ultra-low-mem."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for a dataset of {n} documents")
        i %= n
        return self._reader.tokens(int(self.doc_starts[i]), int(self.doc_starts[i + 1]))

    def read_tokens(self, start: int, end: int) -> np.ndarray:
        """Global tokens [start, end) (documents back to back, no EOS between them)."""
        if not 0 <= start <= end <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {end}) out of range for {self.num_tokens} tokens")
        return self._reader.tokens(start, end)

    def read_segments(
        self,
        segs: Segments,
        count: int,
        seq_len: int,
        ids: np.ndarray,
        labels: np.ndarray,
        pos: np.ndarray,
    ) -> None:
        """Write the first `count` segments' tokens into the flat (B*L,) int64 `ids` and
        `labels`, and their position ids into `pos` (see pipeline/collate.py).

        Safe to call from several threads at once; the kernels release the GIL.
        """
        self._reader.read_segments(segs, count, seq_len, ids, labels, pos)

    def reopen(self, ultra_low_mem: bool) -> TokenDataset:
        """The same data in the other mode (the watchdog switches readers to ultra-low-mem)."""
        return open_dataset(
            self.path,
            ultra_low_mem=ultra_low_mem,
            page_cache_budget_bytes=self.page_cache_budget_bytes,
            index_cache=self.index_cache,
        )

    def close(self) -> None:
        """Release the files; a later read raises PipelineError. Closing twice is harmless."""
        self._reader.close()
        self._reader = storage.closed_reader(self.path, self.ultra_low_mem)

    def __enter__(self) -> TokenDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ultra_low_mem" if self.ultra_low_mem else "mmap"
        return (
            f"TokenDataset({str(self.path)!r}, {len(self)} documents, {self.num_tokens} tokens, "
            f"{self.token_dtype.name}, {mode})"
        )


# ----------------------------------------------------------------------------- opening


def open_dataset(
    path,
    ultra_low_mem: bool = False,
    verify: bool = False,
    page_cache_budget_bytes: int = 64 << 20,
    index_cache: Path | str | None = None,
) -> TokenDataset:
    """Open a dataset built by `pipeline build`, or a `datasets` folder with a token-id list column.

    verify=True also checks every shard's sha256 against index.json (reads the whole dataset once).
    page_cache_budget_bytes: in ultra-low-mem mode, bytes read between page-cache drops.
    index_cache: a writable folder for the shared index files when the dataset folder is not the
    place (default: $LOWMEM_INDEX_CACHE, else DIR/.index_cache, else the user's cache).
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(
            f"dataset {path} does not exist; build it with "
            f"`python -m pipeline build INPUT... --out {path}`"
        )
    if (path / INDEX_NAME).is_file():
        layout, maps = _open_built(path, verify, index_cache)
    elif (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        layout, maps = _open_datasets_folder(path, index_cache)
    else:
        raise PipelineError(
            f"{path} is not a dataset (no {INDEX_NAME}, and not a `datasets` save_to_disk folder); "
            f"build it with `python -m pipeline build INPUT... --out {path}`"
        )
    return TokenDataset(path, layout, maps, ultra_low_mem, page_cache_budget_bytes, index_cache)


def _open_built(path: Path, verify: bool, given_cache) -> tuple[_Layout, list]:
    # The schema is checked first (types, ranges, ids below the vocabulary, the kind).
    manifest = read_manifest(path)
    index, token_dtype = manifest.raw, manifest.dtype
    sft = manifest.kind == KIND_SFT
    chunks, batches, maps = [], [], []
    first_doc = first_token = 0
    for entry in index["files"]:
        file_path = path / entry["name"]
        if not file_path.is_file():
            raise PipelineError(
                f"{path / INDEX_NAME} lists {entry['name']} but it is missing; {_REBUILD}"
            )
        size = file_path.stat().st_size
        if size != entry["bytes"]:
            raise PipelineError(
                f"{file_path} has {size} bytes but {INDEX_NAME} says {entry['bytes']} (truncated "
                f"or replaced); {_REBUILD}"
            )
        if verify and file_sha256(file_path) != entry["sha256"]:
            raise PipelineError(f"{file_path} fails its sha256 check (corrupt); {_REBUILD}")
        mm, reader = _map_arrow(file_path, stream=False)
        file_batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        for batch in file_batches:
            chunk = _chunk_from_batch(
                file_path, mm, batch, COLUMN, token_dtype, first_doc, first_token
            )
            chunks.append(chunk)
            batches.append((batch, mm.base_address))
            first_doc += batch.num_rows
            first_token += chunk.num_tokens
        maps.append(mm)
    if first_doc != index["num_documents"] or first_token != index["num_tokens"]:
        raise PipelineError(
            f"{path} holds {first_doc} documents / {first_token} tokens but {INDEX_NAME} says "
            f"{index['num_documents']} / {index['num_tokens']}; {_REBUILD}"
        )
    tok = index["tokenizer"]
    fingerprint = hashlib.sha256(
        json.dumps(
            [tok.get("id"), index["num_tokens"], [f.get("sha256") for f in index["files"]]]
        ).encode()
    ).hexdigest()[:16]
    meta = {
        "vocab_size": int(index["vocab_size"]),
        "bos_id": tok.get("bos_id"),
        "eos_id": int(tok["eos_id"]),
        "pad_id": int(tok.get("pad_id", tok["eos_id"])),
        "tokenizer_id": str(tok.get("id")),
        "fingerprint": fingerprint,
    }
    folder = index_cache.cache_folder(path, fingerprint, given_cache)
    shared = index_cache.doc_arrays(folder, fingerprint, chunks, batches, COLUMN, sft, _REBUILD)
    return _layout(chunks, token_dtype, meta, shared, folder), maps


def _layout(chunks, token_dtype, meta: dict, shared: dict, folder: Path) -> _Layout:
    return _Layout(
        chunks,
        shared["doc_starts"],
        np.dtype(token_dtype),
        meta,
        shared.get("prompt_lengths"),
        shared.get("response_cut"),
        shared.get("span_starts"),
        shared.get("spans"),
        folder,
    )


def _open_datasets_folder(path: Path, given_cache) -> tuple[_Layout, list]:
    try:
        state = json.loads((path / "state.json").read_text())
        files = [path / f["filename"] for f in state["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PipelineError(
            f"{path / 'state.json'} is not a `datasets` state file ({exc}); re-save the dataset"
        ) from None
    chunks, batches, maps = [], [], []
    first_doc = first_token = 0
    column = token_dtype = None
    sft = False
    max_id = -1
    for file_path in files:
        if not file_path.is_file():
            raise PipelineError(
                f"{path / 'state.json'} lists {file_path.name} but it is missing; re-save the "
                "dataset"
            )
        mm, reader = _map_arrow(file_path, stream=True)
        for batch in reader:
            if column is None:
                column, token_dtype = _token_column(path, batch.schema)
                sft = PROMPT_LENGTHS_COLUMN in batch.schema.names
            chunk = _chunk_from_batch(
                file_path, mm, batch, column, token_dtype, first_doc, first_token
            )
            if chunk.num_tokens:
                max_id = max(max_id, int(chunk.values.max()))
                if chunk.values.min() < 0:
                    raise PipelineError(
                        f"column {column!r} in {file_path} holds negative token ids; fix the "
                        "dataset"
                    )
            chunks.append(chunk)
            batches.append((batch, mm.base_address))
            first_doc += batch.num_rows
            first_token += chunk.num_tokens
        maps.append(mm)
    if first_doc == 0:
        raise PipelineError(f"{path} holds no rows; nothing to train on")
    # A `datasets` folder carries no tokenizer specials: EOS (also used as PAD) is a new id past
    # the largest.
    eos_id = max_id + 1
    fingerprint = hashlib.sha256(
        json.dumps([state.get("_fingerprint"), column, first_token]).encode()
    ).hexdigest()[:16]
    meta = {
        "vocab_size": eos_id + 1,
        "bos_id": None,
        "eos_id": eos_id,
        "pad_id": eos_id,
        "tokenizer_id": f"datasets:{column}",
        "fingerprint": fingerprint,
    }
    folder = index_cache.cache_folder(path, fingerprint, given_cache)
    fix = f"fix or drop the dataset's {PROMPT_LENGTHS_COLUMN!r} column"
    shared = index_cache.doc_arrays(folder, fingerprint, chunks, batches, column, sft, fix)
    return _layout(chunks, token_dtype, meta, shared, folder), maps


def _token_column(path: Path, schema: pa.Schema) -> tuple[str, np.dtype]:
    def is_token_list(t: pa.DataType) -> bool:
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(
            t.value_type
        )

    names = ([COLUMN] if COLUMN in schema.names else []) + [n for n in schema.names if n != COLUMN]
    for name in names:
        if is_token_list(schema.field(name).type):
            return name, np.dtype(schema.field(name).type.value_type.to_pandas_dtype())
    raise PipelineError(
        f"{path} has no token-id column (a list of integers; columns: {', '.join(schema.names)}); "
        f"tokenise it with `python -m pipeline build {path} --out DIR`"
    )


def _map_arrow(file_path: Path, stream: bool):
    try:
        mm = pa.memory_map(str(file_path), "r")
        # The mapping's base address, to locate token buffers in the file (ultra-low-mem preads).
        base_address = mm.read_buffer(1).address
        mm.seek(0)
        reader = ipc.open_stream(mm) if stream else ipc.open_file(mm)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PipelineError(
            f"{file_path} is not a valid Arrow file ({str(exc).splitlines()[0]}); {_REBUILD}"
        ) from None
    return _Mapping(mm, base_address), reader


def _chunk_from_batch(file_path, mm, batch, column, token_dtype, first_doc, first_token) -> Chunk:
    if column not in batch.schema.names:
        raise PipelineError(
            f"{file_path} has no {column!r} column (columns: {', '.join(batch.schema.names)}); "
            f"{_REBUILD}"
        )
    arr = batch.column(column)
    kind = arr.type
    if (
        not (pa.types.is_list(kind) or pa.types.is_large_list(kind))
        or np.dtype(kind.value_type.to_pandas_dtype()) != token_dtype
    ):
        raise PipelineError(
            f"column {column!r} in {file_path} is {kind}, expected list<{token_dtype}>; {_REBUILD}"
        )
    raw_offsets = index_cache.raw_offsets(arr)
    child_offset = arr.values.offset
    num_tokens = int(raw_offsets[-1]) - int(raw_offsets[0])
    values_buf = arr.buffers()[3]
    itemsize = token_dtype.itemsize
    element0 = child_offset + int(raw_offsets[0])
    if values_buf is None or num_tokens == 0:
        values = np.zeros(0, dtype=token_dtype)
        file_offset = 0
    else:
        all_values = np.frombuffer(values_buf, dtype=token_dtype)
        values = all_values[element0 : element0 + num_tokens]
        # Where the tokens sit in the file: the buffer address relative to the start of the mapping.
        file_offset = values_buf.address - mm.base_address + element0 * itemsize
        if not 0 <= file_offset <= mm.file.size():
            raise PipelineError(
                f"{file_path}: token buffer is not inside the file (not a plain Arrow file); "
                f"{_REBUILD}"
            )
    if num_tokens < 0:
        raise PipelineError(f"{file_path} has decreasing list offsets (corrupt); {_REBUILD}")
    return Chunk(file_path, file_offset, first_doc, first_token, num_tokens, values)
