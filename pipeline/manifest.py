"""A dataset's index.json: its schema, checked at open, and its shards' checksums.

`read_manifest(DIR)` validates every field the readers rely on (types, ranges, special ids
inside the vocabulary, per-shard sums equal to the totals, shard names that stay inside DIR, the
dataset's kind: "text", or "sft" for prompt/response samples; an index without "kind", written
before SFT builds existed, is "text") and raises one PipelineError naming the key and the fix,
instead of a KeyError or IndexError in the middle of a run. `verify_checksums(DIR, manifest)`
hashes each shard once (and checks its largest token id against the vocabulary) and remembers
the result by (size, mtime) in a small JSON file, beside the dataset or, when the dataset folder
is read-only, in the user's cache; a later run re-hashes only shards that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from lowmem_core.durable import file_sha256, write_atomic
from lowmem_core.errors import PipelineError
from lowmem_core.format import COLUMN, FORMAT, INDEX_NAME, KIND_SFT, KIND_TEXT

REBUILD = "rebuild it with `python -m pipeline build INPUT... --out DIR --overwrite`"
VERIFIED_NAME = ".verified.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ShardEntry:
    name: str
    num_documents: int
    num_tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    num_documents: int
    num_tokens: int
    dtype: np.dtype
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    tokenizer: dict
    files: list[ShardEntry]
    kind: str  # KIND_TEXT, or KIND_SFT: shards also hold PROMPT_LENGTHS_COLUMN
    raw: dict = field(repr=False)  # the whole index, fields added by newer builds included


def _fail(where: Path, problem: str) -> PipelineError:
    return PipelineError(f"{where}: {problem}; {REBUILD}")


def _int(where: Path, d: dict, key: str, minimum: int, label: str | None = None) -> int:
    value = d.get(key)
    name = label or key
    if value is None:
        raise _fail(where, f"lacks {name}")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(where, f"{name} must be an integer >= {minimum}, found {value!r}")
    return value


def _token_id(where: Path, tok: dict, key: str, vocab: int, optional: bool) -> int | None:
    value = tok.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise _fail(where, f"tokenizer.{key} must be a token id in [0, {vocab}), found {value!r}")
    return value


def read_manifest(dataset_dir: Path | str) -> Manifest:
    """The validated index.json of `dataset_dir` (see the module docstring)."""
    where = Path(dataset_dir) / INDEX_NAME
    try:
        raw = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(where, f"is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise _fail(where, f"holds a {type(raw).__name__}, not an object")
    if raw.get("format") != FORMAT:
        raise _fail(where, f"is not a {FORMAT} index (format={raw.get('format')!r})")
    num_documents = _int(where, raw, "num_documents", 0)
    num_tokens = _int(where, raw, "num_tokens", 0)
    if raw.get("dtype") not in ("uint16", "uint32"):
        raise _fail(where, f"dtype must be uint16 or uint32, found {raw.get('dtype')!r}")
    dtype = np.dtype(raw["dtype"])
    vocab_size = _int(where, raw, "vocab_size", 1)
    if vocab_size > np.iinfo(dtype).max + 1:
        raise _fail(where, f"a vocabulary of {vocab_size} ids does not fit dtype {dtype}")
    tok = raw.get("tokenizer")
    if not isinstance(tok, dict):
        raise _fail(where, "lacks the tokenizer object")
    eos_id = _token_id(where, tok, "eos_id", vocab_size, optional=False)
    bos_id = _token_id(where, tok, "bos_id", vocab_size, optional=True)
    pad_id = _token_id(where, tok, "pad_id", vocab_size, optional=True)
    kind = raw.get("kind", KIND_TEXT)
    if kind not in (KIND_TEXT, KIND_SFT):
        raise _fail(where, f"kind must be {KIND_TEXT!r} or {KIND_SFT!r}, found {kind!r}")
    files = raw.get("files")
    if not isinstance(files, list) or not files:
        raise _fail(where, "lists no shard files")
    entries = [_shard_entry(where, i, f) for i, f in enumerate(files)]
    if sum(e.num_documents for e in entries) != num_documents:
        raise _fail(
            where,
            f"its shards hold {sum(e.num_documents for e in entries)} documents, "
            f"not the {num_documents} it states",
        )
    if sum(e.num_tokens for e in entries) != num_tokens:
        raise _fail(
            where,
            f"its shards hold {sum(e.num_tokens for e in entries)} tokens, "
            f"not the {num_tokens} it states",
        )
    return Manifest(
        num_documents,
        num_tokens,
        dtype,
        vocab_size,
        bos_id,
        eos_id,
        eos_id if pad_id is None else pad_id,
        tok,
        entries,
        kind,
        raw,
    )


def _shard_entry(where: Path, i: int, entry) -> ShardEntry:
    if not isinstance(entry, dict):
        raise _fail(where, f"files[{i}] is not an object")
    name = entry.get("name")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise _fail(
            where, f"files[{i}].name must be a file name inside the dataset, found {name!r}"
        )
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise _fail(where, f"files[{i}].sha256 must be 64 hex digits, found {sha!r}")
    return ShardEntry(
        name=name,
        num_documents=_int(where, entry, "num_documents", 0, f"files[{i}].num_documents"),
        num_tokens=_int(where, entry, "num_tokens", 0, f"files[{i}].num_tokens"),
        bytes=_int(where, entry, "bytes", 0, f"files[{i}].bytes"),
        sha256=sha,
    )


def _largest_token_id(path: Path) -> int:
    with pa.memory_map(str(path), "r") as mm:
        reader = ipc.open_file(mm)
        largest = -1
        for i in range(reader.num_record_batches):
            values = reader.get_batch(i).column(COLUMN).values
            if len(values):
                largest = max(largest, pc.max(values).as_py())
    return largest


def _cache_file(dataset_dir: Path) -> Path:
    if os.access(dataset_dir, os.W_OK):
        return dataset_dir / VERIFIED_NAME
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowmem-pipeline"
    key = hashlib.sha256(str(dataset_dir.resolve()).encode()).hexdigest()[:16]
    return base / f"verified-{key}.json"


def verify_checksums(dataset_dir: Path | str, manifest: Manifest) -> list[str]:
    """Hash the shards not verified since they last changed; returns the names hashed now.

    Raises PipelineError naming the first shard whose sha256 differs from index.json.
    """
    dataset_dir = Path(dataset_dir)
    cache = _cache_file(dataset_dir)
    try:
        known = json.loads(cache.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    hashed = []
    for entry in manifest.files:
        path = dataset_dir / entry.name
        try:
            st = path.stat()
        except FileNotFoundError:
            raise _fail(dataset_dir / INDEX_NAME, f"lists {entry.name} but it is missing") from None
        stamp = [st.st_size, st.st_mtime_ns, entry.sha256]
        if known.get(entry.name) == stamp:
            continue
        if st.st_size != entry.bytes:
            raise PipelineError(
                f"{path} has {st.st_size} bytes but {INDEX_NAME} says {entry.bytes} (truncated or "
                f"replaced); {REBUILD}"
            )
        if file_sha256(path) != entry.sha256:
            raise PipelineError(
                f"{path} fails its sha256 check (corrupt: a flipped bit or a partial copy); "
                f"{REBUILD}"
            )
        largest = _largest_token_id(path)
        if largest >= manifest.vocab_size:
            raise PipelineError(
                f"{path} holds token id {largest} but {INDEX_NAME} says vocab_size "
                f"{manifest.vocab_size}; {REBUILD}"
            )
        known[entry.name] = stamp
        hashed.append(entry.name)
    if hashed:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, json.dumps(known))
        except OSError:
            pass  # an unwritable cache only means hashing again next time
    return hashed
