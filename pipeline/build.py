"""`pipeline build`: text/JSONL/Parquet/`datasets` inputs -> Arrow token shards + index.json.

Inputs are read in chunks of documents, tokenised a chunk at a time (vectorised: an Arrow cast
for bytes, `encode_batch` for tokenizer.json) by `num_proc` threads, and the tokens are appended
to a raw file in a temporary folder beside the output. Each shard is then written as an
uncompressed Arrow IPC file holding one record batch whose values come straight from a memory map
of that raw file, so the build's private memory stays at a few chunks whatever the corpus size.
The temporary folder is renamed to the output only when every file and `index.json` are complete
and fsynced: a failed or killed build never leaves a folder that opens as a dataset.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.config import BuildConfig
from lowmem_core.durable import file_sha256, fsync_path
from lowmem_core.errors import PipelineError
from lowmem_core.format import COLUMN, FORMAT, INDEX_NAME
from pipeline.tokenizer import Encoded, load_tokenizer, token_dtype_for
from pipeline.workers import ordered_map

_CHUNK_BYTES = 8 << 20  # text per tokenisation chunk: large enough to amortise calls, small in RAM
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass(frozen=True)
class BuildReport:
    out_dir: Path
    num_documents: int
    num_tokens: int
    num_shards: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)


# ----------------------------------------------------------------------------- input readers
# Each reader yields Arrow arrays: strings (text to tokenise) or lists of integers (token ids).


def _is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _read_txt(path: Path, one_doc_per_line: bool) -> Iterator[pa.Array]:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    carry = ""
    consumed_bytes = 0
    with path.open("rb") as fh:
        while True:
            block = fh.read(_CHUNK_BYTES)
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise PipelineError(
                    f"{path} is not UTF-8 text (invalid byte at offset {consumed_bytes + exc.start}); "
                    "convert it to UTF-8 or pass a .jsonl/.parquet file"
                ) from None
            consumed_bytes += len(block)
            if "\x00" in text:
                raise PipelineError(f"{path} contains NUL bytes, so it is binary, not text; pass a text file")
            pieces = text.split("\n") if one_doc_per_line else _BLANK_LINE.split(text)
            carry = "" if not block else pieces.pop()
            docs = [p.strip() for p in pieces]
            docs = [d for d in docs if d]
            if docs:
                yield pa.array(docs, type=pa.large_string())
            if not block:
                return


def _check_field(path: Path, schema: pa.Schema, text_field: str) -> None:
    if text_field not in schema.names:
        raise PipelineError(
            f"{path} has no field {text_field!r} (fields: {', '.join(schema.names) or 'none'}); "
            "pass --text-field NAME"
        )
    kind = schema.field(text_field).type
    is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    is_tokens = (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)
    if not (is_text or is_tokens):
        raise PipelineError(
            f"field {text_field!r} in {path} holds {kind}, expected text (string) or token ids (list of integers); "
            "pass --text-field naming the text column"
        )


def _read_jsonl(path: Path, text_field: str) -> Iterator[pa.Array]:
    try:
        reader = pajson.open_json(path, read_options=pajson.ReadOptions(block_size=_CHUNK_BYTES))
        _check_field(path, reader.schema, text_field)
        for batch in reader:
            yield batch.column(text_field)
    except pa.ArrowInvalid as exc:
        raise PipelineError(f"{path} is not valid JSON Lines ({str(exc).splitlines()[0]}); fix or remove the bad line") from None


def _read_parquet(path: Path, text_field: str) -> Iterator[pa.Array]:
    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PipelineError(f"{path} is not a readable Parquet file ({exc}); rewrite it or pass another input") from None
    _check_field(path, pfile.schema_arrow, text_field)
    for batch in pfile.iter_batches(batch_size=4096, columns=[text_field]):
        yield batch.column(0)


def _read_datasets_folder(path: Path, text_field: str) -> Iterator[pa.Array]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several unrelated types for unreadable folders
        raise PipelineError(f"{path} is not a readable `datasets` save_to_disk folder ({exc})") from None
    if not isinstance(ds, datasets.Dataset):
        raise PipelineError(f"{path} holds a DatasetDict; pass one split folder, e.g. {path}/train")
    table = ds.data.table
    _check_field(path, table.schema, text_field)
    for batch in table.select([text_field]).to_batches(max_chunksize=4096):
        yield batch.column(0)


def _input_arrays(path: Path, cfg: BuildConfig) -> Iterator[pa.Array]:
    if _is_datasets_folder(path):
        return _read_datasets_folder(path, cfg.text_field)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".md"):
        return _read_txt(path, cfg.one_doc_per_line)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path, cfg.text_field)
    if suffix == ".parquet":
        return _read_parquet(path, cfg.text_field)
    raise PipelineError(
        f"{path}: unknown input type {suffix or '(no suffix)'}; inputs are .txt, .jsonl, .parquet or a `datasets` folder"
    )


def _check_inputs(inputs: list[Path]) -> list[Path]:
    if not inputs:
        raise PipelineError("no inputs given; pass one or more .txt/.jsonl/.parquet files or `datasets` folders")
    paths = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise PipelineError(f"input {path} does not exist; check the path")
        if path.is_dir() and not _is_datasets_folder(path):
            raise PipelineError(f"input {path} is a folder but not a `datasets` save_to_disk folder (no state.json)")
        if path.is_file() and path.stat().st_size == 0:
            raise PipelineError(f"input {path} is empty; remove it from the inputs")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- writing


class _ShardWriter:
    """Appends tokens to raw files in the temp folder; finishes each shard as an Arrow file."""

    def __init__(self, tmp_dir: Path, dtype: np.dtype, max_shard_tokens: int):
        self.tmp_dir, self.dtype, self.max_shard_tokens = tmp_dir, dtype, max_shard_tokens
        self.shards: list[dict] = []
        self._open_raw()

    def _open_raw(self) -> None:
        self._raw_tokens = (self.tmp_dir / f"tokens-{len(self.shards):05d}.raw").open("wb")
        self._raw_lengths = (self.tmp_dir / f"lengths-{len(self.shards):05d}.raw").open("wb")
        self._shard_tokens = 0
        self._shard_docs = 0

    def append(self, encoded: Encoded) -> None:
        """Append documents, starting a new shard at a document boundary past max_shard_tokens."""
        values, lengths = encoded.values, encoded.lengths
        while lengths.size:
            ends = np.cumsum(lengths)
            fit = int(np.searchsorted(ends, self.max_shard_tokens - self._shard_tokens, side="right"))
            if fit == 0 and self._shard_docs:
                self._finish_shard()
                self._open_raw()
                continue
            fit = max(fit, 1)  # a document longer than a shard gets a shard of its own
            n_tokens = int(ends[fit - 1])
            self._raw_tokens.write(values[:n_tokens].astype(self.dtype, copy=False).tobytes())
            self._raw_lengths.write(lengths[:fit].astype(np.int64, copy=False).tobytes())
            self._shard_tokens += n_tokens
            self._shard_docs += fit
            values, lengths = values[n_tokens:], lengths[fit:]

    def close(self) -> list[dict]:
        if self._shard_docs or not self.shards:
            self._finish_shard()
        else:
            self._discard_raw()
        return self.shards

    def _discard_raw(self) -> None:
        for fh in (self._raw_tokens, self._raw_lengths):
            fh.close()
            Path(fh.name).unlink()

    def _finish_shard(self) -> None:
        self._raw_tokens.close()
        self._raw_lengths.close()
        tokens_path, lengths_path = Path(self._raw_tokens.name), Path(self._raw_lengths.name)
        lengths = np.fromfile(lengths_path, dtype=np.int64)
        offset_type = np.int32 if self._shard_tokens < (1 << 31) else np.int64
        offsets = np.zeros(lengths.size + 1, dtype=offset_type)
        np.cumsum(lengths, out=offsets[1:])
        if self._shard_tokens:
            values = pa.Array.from_buffers(
                pa.from_numpy_dtype(self.dtype), self._shard_tokens,
                [None, pa.py_buffer(np.memmap(tokens_path, dtype=self.dtype, mode="r"))],
            )
        else:
            values = pa.array([], type=pa.from_numpy_dtype(self.dtype))
        list_type = pa.list_ if offset_type is np.int32 else pa.large_list
        column = (pa.ListArray if offset_type is np.int32 else pa.LargeListArray).from_arrays(pa.array(offsets), values)
        schema = pa.schema([pa.field(COLUMN, list_type(pa.from_numpy_dtype(self.dtype)), nullable=False)])
        name = f"shard-{len(self.shards):05d}.arrow"
        path = self.tmp_dir / name
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, schema) as writer:
            writer.write_batch(pa.record_batch([column], schema=schema))
        del column, values
        fsync_path(path)
        tokens_path.unlink()
        lengths_path.unlink()
        self.shards.append({
            "name": name,
            "num_documents": int(lengths.size),
            "num_tokens": int(self._shard_tokens),
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
        })


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_interrupted(out: Path) -> None:
    """Clean up after builds of `out` that were killed: remove their temp folders, and put back a
    previous dataset that a killed --overwrite build had moved aside but not yet replaced."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return
    for leftover in parent.glob(f".{out.name}.*-*"):
        stem, _, pid = leftover.name.rpartition("-")  # ".NAME.tmp" / ".NAME.old", pid
        kind = stem.rpartition(".")[2]
        if not pid.isdigit() or _pid_alive(int(pid)) or kind not in ("tmp", "old"):
            continue
        if kind == "old" and not out.exists():
            os.rename(leftover, out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _prepare_out(out: Path, overwrite: bool) -> Path:
    _recover_interrupted(out)
    if out.exists() and not overwrite:
        if out.is_file() or any(out.iterdir()):
            raise PipelineError(f"output {out} already exists; pass --overwrite to replace it or choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"cannot create the output's parent folder {parent} ({exc.strerror}); choose another --out") from None
    if not os.access(parent, os.W_OK):
        raise PipelineError(f"output folder {parent} is not writable; choose another --out")
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _commit_out(tmp: Path, out: Path) -> None:
    fsync_path(tmp)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_path(out.parent if str(out.parent) else Path("."))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_dataset(cfg: BuildConfig, progress: bool = True) -> BuildReport:
    """Build the dataset that `cfg` describes; return counts and the build rate."""
    started = time.perf_counter()
    inputs = _check_inputs(cfg.inputs)
    tokenizer = load_tokenizer(cfg.tokenizer)
    dtype = token_dtype_for(tokenizer.vocab_size)
    out = Path(cfg.out)
    tmp = _prepare_out(out, cfg.overwrite)
    try:
        writer = _ShardWriter(tmp, dtype, cfg.max_shard_tokens)
        # A with-block closes the bar on errors too, so the error line starts a line of its own.
        with tqdm(unit=" docs", unit_scale=True, desc="build", disable=not progress) as bar:
            for path in inputs:
                arrays = _input_arrays(path, cfg)
                for encoded in ordered_map(lambda arr: _encode(arr, tokenizer, path), arrays, cfg.num_proc):
                    writer.append(encoded)
                    bar.update(int(encoded.lengths.size))
        shards = writer.close()
        num_docs = sum(s["num_documents"] for s in shards)
        num_tokens = sum(s["num_tokens"] for s in shards)
        if num_docs == 0 or num_tokens == 0:
            raise PipelineError(
                f"no documents with text found in {', '.join(map(str, inputs))}; check --text-field and the input files"
            )
        index = {
            "format": FORMAT,
            "num_documents": num_docs,
            "num_tokens": num_tokens,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "column": COLUMN,
            "tokenizer": {
                "kind": tokenizer.kind, "id": tokenizer.id,
                "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            },
            "files": shards,
            "sources": [str(p) for p in inputs],
        }
        index_path = tmp / INDEX_NAME
        index_path.write_text(json.dumps(index, indent=1))
        fsync_path(index_path)
        _commit_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = BuildReport(out, num_docs, num_tokens, len(shards), time.perf_counter() - started)
    return report


def _encode(arr: pa.Array, tokenizer, path: Path) -> Encoded:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    kind = arr.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        flat = arr.flatten()
        values = flat.to_numpy(zero_copy_only=False) if len(flat) else np.zeros(0, np.int64)
        if values.size and (values.min() < 0 or values.max() >= tokenizer.vocab_size):
            raise PipelineError(
                f"token ids in {path} range over [{values.min()}, {values.max()}] but the tokenizer's vocabulary has "
                f"{tokenizer.vocab_size} ids; pass the --tokenizer that produced them"
            )
        offsets = arr.offsets.to_numpy()
        return Encoded(values=values.astype(np.uint32), lengths=np.diff(offsets).astype(np.int64))
    return tokenizer.encode_arrow(arr.fill_null(""))
