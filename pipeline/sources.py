"""Input readers of `pipeline build`: files, folders and globs -> chunks of documents, streamed.

Inputs: .txt/.md text (documents separated by blank lines, or one per line), JSON Lines, a JSON
array of records (Alpaca style), Parquet files or a folder of Parquet shards, and a `datasets`
save_to_disk folder; text and JSON may be compressed (.gz, .bz2, .zst), decompressed while read.
Every reader yields `Chunk`s of a bounded size in input order: an Arrow array of texts (or of
token-id lists), with nulls where a record has no text.

Documents are kept as written: no whitespace is stripped (`--strip` trims Unicode whitespace at
both ends). A document with no text (empty, whitespace only, null, or a record without the text
field) is skipped by every reader alike; skipped records are counted (blank runs between .txt
documents are separators, not records). A .txt document longer than one chunk is emitted in
pieces marked as continuing, so no reader holds more than about a chunk of text.
"""

from __future__ import annotations

import codecs
import glob
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from lowmem_core.errors import PipelineError, require_extra
from lowmem_core.format import INDEX_NAME

CHUNK_BYTES = 256 << 10  # text per chunk: amortises a tokenizer call; its encodings stay small
PIECE_CHARS = 512 << 10  # a longer document is read and tokenised in pieces of about this size
_TEXT_SUFFIXES = (".txt", ".text", ".md")
_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
# A blank-line separator: the line break ending a document, then one or more blank lines
# (whitespace only); the next document's leading whitespace is kept.
_BLANK_RUN = re.compile(r"\r?\n(?:[^\S\n]*\n)+")
_SPLIT_SHARD = re.compile(r"(.+?)-\d+-of-\d+\.parquet$")


@dataclass(frozen=True)
class Source:
    """One input file or `datasets` folder and how to read it."""

    path: Path
    kind: str  # "txt", "json" (JSON Lines or a JSON array), "parquet" or "datasets"
    compression: str | None = None  # "gzip", "bz2" or "zstd"

    @property
    def counts_skipped(self) -> bool:
        """Whether a document without text is a skipped record (not so for .txt separators)."""
        return self.kind != "txt"


@dataclass(frozen=True)
class Chunk:
    """Documents read from `source`, in order: texts (large_string) or token ids (list of ints)."""

    docs: pa.Array
    source: Source
    head_continues: bool = False  # docs[0] continues the previous chunk's last document
    tail_continues: bool = False  # docs[-1] continues in the next chunk


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    split: str = "blank_lines"  # .txt documents: "blank_lines" or "lines"


# ----------------------------------------------------------------------------- resolving inputs


def resolve_inputs(inputs: list[Path]) -> list[Source]:
    """The sources that `inputs` (files, folders, globs) name, in order; fails before any read."""
    if not inputs:
        raise PipelineError(
            "no inputs given; pass .txt/.jsonl/.json/.parquet files (optionally .gz/.bz2/.zst), "
            "globs, Parquet folders or `datasets` folders"
        )
    sources: list[Source] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists() and glob.has_magic(str(path)):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            if not matches:
                raise PipelineError(f"input pattern {path} matches no files; check the pattern")
        else:
            matches = [path]
        for match in matches:
            sources.extend(_folder_sources(match) if match.is_dir() else [_source(match)])
    return sources


def _source(path: Path) -> Source:
    if not path.exists():
        raise PipelineError(f"input {path} does not exist; check the path")
    if path.stat().st_size == 0:
        raise PipelineError(f"input {path} is empty; remove it from the inputs")
    suffixes = [s.lower() for s in path.suffixes]
    compression = _COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    suffix = (suffixes[-2] if len(suffixes) > 1 else "") if compression else path.suffix.lower()
    if suffix in _TEXT_SUFFIXES:
        return Source(path, "txt", compression)
    if suffix in _JSON_SUFFIXES:
        return Source(path, "json", compression)
    if suffix == ".parquet" and compression is None:
        return Source(path, "parquet")
    shown = "".join(path.suffixes[-2 if compression else -1 :]) or "(no suffix)"
    raise PipelineError(
        f"{path}: unknown input type {shown}; inputs are "
        ".txt, .jsonl, .json, .parquet (text and JSON may end in .gz, .bz2 or .zst), a Parquet "
        "folder or a `datasets` folder"
    )


def _folder_sources(path: Path) -> list[Source]:
    """A `datasets` save_to_disk folder, or a folder of Parquet shards (sorted by name)."""
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return [Source(path, "datasets")]
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (ValueError, KeyError, TypeError):
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise PipelineError(
            f"input {path} is a `datasets` DatasetDict with splits {', '.join(map(str, splits))}; "
            f"pass one split's folder, e.g. {path / str(splits[0] if splits else 'train')}"
        )
    if (path / INDEX_NAME).is_file():
        raise PipelineError(
            f"input {path} is a dataset built by `pipeline build` (already token ids); train on it "
            "with --data, or pass the original text files"
        )
    shards = sorted(p for p in path.iterdir() if p.suffix == ".parquet" and p.is_file())
    if not shards:
        nested = sorted({p.parent.relative_to(path) for p in path.rglob("*.parquet")})
        where = f"; its subfolders {', '.join(map(str, nested[:4]))} do: pass one" if nested else ""
        raise PipelineError(
            f"input {path} is a folder with no .parquet files and no `datasets` save_to_disk "
            f"files (state.json){where or '; pass its files or a glob such as DIR/*.jsonl'}"
        )
    splits = sorted({m.group(1) for p in shards if (m := _SPLIT_SHARD.match(p.name))})
    if len(splits) > 1:
        raise PipelineError(
            f"input {path} holds the shards of several splits ({', '.join(splits)}); pass one "
            f"split with a glob such as '{path / splits[0]}-*.parquet'"
        )
    return [_source(p) for p in shards]


# ----------------------------------------------------------------------------- reading


def read_source(source: Source, options: ReadOptions) -> Iterator[Chunk]:
    """The documents of `source` in chunks of about CHUNK_BYTES, in order."""
    if source.kind == "txt":
        return _read_txt(source, options.split)
    if source.kind == "json":
        return _read_json(source, options.text_field)
    if source.kind == "parquet":
        return _read_parquet(source, options.text_field)
    return _read_datasets_folder(source, options.text_field)


def _open(source: Source) -> pa.NativeFile:
    return pa.input_stream(str(source.path), compression=source.compression)


def _decode_error(source: Source, exc: Exception) -> PipelineError:
    what = {"gzip": "gzip", "bz2": "bzip2", "zstd": "zstd"}[source.compression or "gzip"]
    return PipelineError(
        f"{source.path} is not a valid {what} file ({str(exc).splitlines()[0]}); re-compress it "
        "or pass the uncompressed file"
    )


def _read_blocks(source: Source, size: int | None = None) -> Iterator[bytes]:
    with _open(source) as stream:
        while True:
            try:
                block = stream.read(size or CHUNK_BYTES)
            except OSError as exc:  # a damaged compressed stream
                raise _decode_error(source, exc) from None
            if not block:
                return
            yield block


def _read_txt(source: Source, split: str) -> Iterator[Chunk]:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    carry, consumed, open_doc = "", 0, False  # open_doc: the last chunk's last document goes on
    blocks = _read_blocks(source)
    while True:
        block = next(blocks, b"")
        try:
            new = decoder.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            raise PipelineError(
                f"{source.path} is not UTF-8 text (invalid byte at offset "
                f"{consumed + exc.start}); convert it to UTF-8 or pass a .jsonl/.parquet file"
            ) from None
        consumed += len(block)
        if "\x00" in new:
            raise PipelineError(
                f"{source.path} contains NUL bytes, so it is binary, not text; pass a text file"
            )
        text = carry + new
        if split == "lines":
            pieces = [p[:-1] if p.endswith("\r") else p for p in text.split("\n")]
        else:
            pieces = _BLANK_RUN.split(text)
        carry = pieces.pop() if block else ""
        if not block and pieces:
            pieces[-1] = pieces[-1].removesuffix("\n").removesuffix("\r")
        if not block and not open_doc and pieces == [""]:
            return
        # A document longer than a piece: emit most of what is read of it, cut where safe_cut
        # finds a break in its second half, so what is carried stays under a piece.
        tail = len(carry) > PIECE_CHARS
        if tail:
            cut = safe_cut(carry, len(carry))
            pieces.append(carry[:cut])
            carry = carry[cut:]
        if pieces:
            yield Chunk(pa.array(pieces, type=pa.large_string()), source, open_doc, tail)
            open_doc = tail
        if not block:
            return


def safe_cut(text: str, limit: int) -> int:
    """Where to cut `text` in the second half of its first `limit` characters, at a boundary
    that pre-tokenizers splitting at whitespace (byte-level BPE: GPT-2, Llama 3, Qwen) also
    split at, so each side gets the tokens it has in the whole text: after a line break that a
    non-space follows, else before a space between non-spaces, else where whitespace follows a
    non-space, else at `limit`."""
    floor = max(1, limit // 2)
    i = text.rfind("\n", floor, limit)
    while i != -1:
        if i + 1 < len(text) and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", floor, i)
    i = text.rfind(" ", floor, limit)
    while i != -1:
        if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", floor, i)
    for i in range(min(limit, len(text) - 1), floor - 1, -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return i
    return limit


def _first_byte(source: Source) -> bytes:
    for block in _read_blocks(source):
        stripped = block.lstrip()
        if stripped:
            return stripped[:1]
    return b""


def _read_json(source: Source, field: str) -> Iterator[Chunk]:
    first = _first_byte(source)
    if first == b"[":
        return _read_json_array(source, field)
    if first != b"{":
        raise PipelineError(
            f"{source.path} is neither JSON Lines nor a JSON array of records (it starts with "
            f"{first!r}); pass one record per line or a [...] of records"
        )
    return _read_jsonl(source, field)


def _check_field(path: Path, schema: pa.Schema, field: str) -> pa.DataType:
    if field not in schema.names:
        raise PipelineError(
            f"{path} has no field {field!r} (fields: {', '.join(schema.names) or 'none'}); "
            "pass --text-field NAME"
        )
    kind = schema.field(field).type
    is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
    is_tokens = (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(
        kind.value_type
    )
    if not (is_text or is_tokens):
        raise PipelineError(
            f"field {field!r} in {path} holds {kind}, expected text (string) or token ids (list "
            "of integers); pass --text-field naming the text column"
        )
    return pa.large_string() if is_text else kind


def _read_jsonl(source: Source, field: str) -> Iterator[Chunk]:
    """JSON Lines, parsed a block of whole lines at a time (a line longer than a block waits
    for its end), the text field alone after the first block has shown its type."""
    kind, parse, pending = None, None, []
    for block in _read_blocks(source, _JSON_BLOCK_BYTES):
        end = block.rfind(b"\n") + 1
        if end == 0:
            pending.append(block)
            continue
        lines = b"".join([*pending, block[:end]])
        pending = [block[end:]]
        column, kind, parse = _parse_lines(source, field, lines, kind, parse)
        yield from _bounded(column, source)
    rest = b"".join(pending)
    if rest.strip():
        column, kind, parse = _parse_lines(source, field, rest, kind, parse)
        yield from _bounded(column, source)


_JSON_BLOCK_BYTES = 4 << 20  # JSON Lines parsed per Arrow call (then encoded in chunks)


def _parse_lines(source: Source, field: str, lines: bytes, kind, parse):
    options = pajson.ReadOptions(block_size=len(lines) + 1, use_threads=False)
    try:
        if parse is None:
            table = pajson.read_json(pa.BufferReader(lines), read_options=options)
            kind = _check_field(source.path, table.schema, field)
            parse = pajson.ParseOptions(
                explicit_schema=pa.schema([(field, kind)]), unexpected_field_behavior="ignore"
            )
            column = table.column(field).cast(kind)
        else:
            column = pajson.read_json(
                pa.BufferReader(lines), read_options=options, parse_options=parse
            ).column(0)
    except pa.ArrowInvalid as exc:
        raise _jsonl_error(source, exc) from None
    return column.combine_chunks(), kind, parse


def _bounded(column: pa.Array, source: Source) -> Iterator[Chunk]:
    """`column` in chunks of about CHUNK_BYTES of text (or token ids)."""
    if pa.types.is_large_string(column.type):
        sizes = pc.binary_length(column)
    else:
        sizes = pc.multiply(pc.list_value_length(column), 8)
    ends = np.cumsum(pc.fill_null(sizes, 0).to_numpy(zero_copy_only=False))
    start = 0
    while start < len(column):
        before = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, before + CHUNK_BYTES, side="right")))
        yield Chunk(column.slice(start, stop - start), source)
        start = stop


def _jsonl_error(source: Source, exc: Exception) -> PipelineError:
    message = str(exc).splitlines()[0]
    if "changed from" in message:
        return PipelineError(
            f"{source.path}: a field holds one type in some records and another in others "
            f"({message}); give every record's text field the same type"
        )
    return PipelineError(
        f"{source.path} is not valid JSON Lines ({message}); fix or remove the bad line"
    )


def _read_json_array(source: Source, field: str) -> Iterator[Chunk]:
    """A JSON array of records, parsed one record at a time (memory: about one chunk)."""
    decoder = json.JSONDecoder()
    text, pos, index, done = "", 0, 0, False
    blocks = _read_blocks(source)
    values: list = []
    size = 0
    utf8 = codecs.getincrementaldecoder("utf-8")("strict")

    def more() -> bool:
        nonlocal text, pos, done
        block = next(blocks, b"")
        try:
            text = text[pos:] + utf8.decode(block, final=not block)
        except UnicodeDecodeError:
            raise PipelineError(f"{source.path} is not UTF-8; convert it to UTF-8") from None
        pos, done = 0, not block
        return bool(block)

    def skip_space() -> str:
        nonlocal pos
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos < len(text) or not more():
                return text[pos] if pos < len(text) else ""

    def bad(found: str) -> PipelineError:
        return PipelineError(
            f"{source.path} is not a valid JSON array of records (after record {index}: "
            f"found {found[:20]!r}); fix the file"
        )

    if skip_space() != "[":
        raise bad(text[pos : pos + 20])
    pos += 1
    kind = None
    while True:
        head = skip_space()
        if head == "]" and index == 0:
            break
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
                break
            except json.JSONDecodeError:
                if done or not more():
                    raise bad(text[pos : pos + 20]) from None
        pos = end
        if not isinstance(record, dict):
            raise PipelineError(
                f"{source.path}: element {index} of the JSON array is a "
                f"{type(record).__name__}, not a record with a {field!r} field; fix the file"
            )
        if index == 0 and field not in record:
            raise PipelineError(
                f"{source.path} has no field {field!r} in its first record (fields: "
                f"{', '.join(map(str, record)) or 'none'}); pass --text-field NAME"
            )
        value = record.get(field)
        kind = _record_kind(source, field, index, value, kind)
        values.append(value)
        size += len(value) if value is not None else 0
        index += 1
        if size >= CHUNK_BYTES:
            yield Chunk(_records_array(values, kind), source)
            values, size = [], 0
        sep = skip_space()
        if sep == "]":
            break
        if sep != ",":
            raise bad(text[pos : pos + 20])
        pos += 1
    if values:
        yield Chunk(_records_array(values, kind), source)


def _record_kind(source: Source, field: str, index: int, value, kind: str | None) -> str | None:
    if value is None:
        return kind
    found = "text" if isinstance(value, str) else None
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        found = "tokens"
    if found is None or (kind is not None and found != kind):
        raise PipelineError(
            f"{source.path}: record {index} has {field!r} = {type(value).__name__}, expected "
            f"{'text' if kind != 'tokens' else 'token ids'} like the records before it; pass "
            "--text-field naming the text field"
        )
    return found


def _records_array(values: list, kind: str | None) -> pa.Array:
    if kind == "tokens":
        return pa.array(values, type=pa.large_list(pa.int64()))
    return pa.array(values, type=pa.large_string())


def _read_parquet(source: Source, field: str) -> Iterator[Chunk]:
    try:
        pfile = pq.ParquetFile(source.path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PipelineError(
            f"{source.path} is not a readable Parquet file ({exc}); rewrite it or pass another "
            "input"
        ) from None
    kind = _check_field(source.path, pfile.schema_arrow, field)
    meta = pfile.metadata
    column = pfile.schema_arrow.get_field_index(field)
    nbytes = sum(
        meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups)
    )
    rows = _rows_per_chunk(nbytes, meta.num_rows)
    for batch in pfile.iter_batches(batch_size=rows, columns=[field]):
        yield Chunk(batch.column(0).cast(kind), source)


def _rows_per_chunk(nbytes: int, num_rows: int) -> int:
    """Rows of about CHUNK_BYTES, from a table's size."""
    return max(1, min(1 << 16, CHUNK_BYTES * max(num_rows, 1) // max(nbytes, 1)))


def _read_datasets_folder(source: Source, field: str) -> Iterator[Chunk]:
    datasets = require_extra("datasets", "hf", "reading a `datasets` save_to_disk folder")

    try:
        ds = datasets.load_from_disk(str(source.path))
    except Exception as exc:  # datasets raises several unrelated types for unreadable folders
        raise PipelineError(
            f"{source.path} is not a readable `datasets` save_to_disk folder ({exc}); re-save it"
        ) from None
    table = ds.data.table.select([field]) if field in ds.column_names else ds.data.table
    kind = _check_field(source.path, table.schema, field)
    rows = _rows_per_chunk(table.nbytes, table.num_rows)
    for batch in table.to_batches(max_chunksize=rows):
        yield Chunk(batch.column(0).cast(kind), source)


# ----------------------------------------------------------------------------- cleaning


@dataclass(frozen=True)
class Cleaned:
    """A chunk's documents that have text, and the counts of those skipped."""

    docs: pa.Array
    head_continues: bool
    tail_continues: bool
    skipped_empty: int  # "" or whitespace only (or an empty token list)
    skipped_null: int  # null, or the record lacks the field


def clean(chunk: Chunk, strip: bool) -> Cleaned:
    """Drop documents without text (counted for record inputs); with `strip`, trim each
    document's Unicode whitespace at both ends (a piece of a longer document only at the
    document's own ends). A piece of a continuing document is never dropped."""
    docs, n = chunk.docs, len(chunk.docs)
    head = np.zeros(n, dtype=bool)  # (n,) the piece continues the previous chunk's document
    tail = np.zeros(n, dtype=bool)  # (n,) the piece continues in the next chunk
    if n:
        head[0], tail[-1] = chunk.head_continues, chunk.tail_continues
    if pa.types.is_large_string(docs.type):
        if strip:
            docs = _strip(docs, head, tail)
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(docs)), 0)
    else:
        empty = pc.equal(pc.list_value_length(docs), 0)
    edge = pa.array(head | tail)
    null = pc.and_(pc.is_null(docs), pc.invert(edge))
    drop = pc.and_(pc.or_(pc.fill_null(empty, False), null), pc.invert(edge))
    skipped_null = pc.sum(null).as_py() or 0
    skipped_empty = (pc.sum(drop).as_py() or 0) - skipped_null
    count = chunk.source.counts_skipped
    return Cleaned(
        docs=pc.filter(docs, pc.invert(drop)),
        head_continues=chunk.head_continues,
        tail_continues=chunk.tail_continues,
        skipped_empty=skipped_empty if count else 0,
        skipped_null=skipped_null if count else 0,
    )


def _strip(docs: pa.Array, head: np.ndarray, tail: np.ndarray) -> pa.Array:
    both = pc.utf8_trim_whitespace(docs)
    if not (head.any() or tail.any()):
        return both
    # A piece that starts mid-document keeps its start; one that ends mid-document, its end.
    return pc.if_else(
        pa.array(head & tail),
        docs,
        pc.if_else(
            pa.array(head),
            pc.utf8_rtrim_whitespace(docs),
            pc.if_else(pa.array(tail), pc.utf8_ltrim_whitespace(docs), both),
        ),
    )
