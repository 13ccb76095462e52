"""Readers of record formats: JSON Lines, JSON arrays, Parquet files and `datasets` folders.

Each format has two readers, which its object in pipeline/sources.py calls: `<format>_texts`
yields one field of every record as `Chunk`s of texts or token-id lists (plain builds: the field
alone is parsed where the format allows); `<format>_records` yields whole records as
`RecordChunk`s (prompt/response builds). Both read about `chunk_bytes` at a time, in order.
Arrow readers take string bytes as written, so every text column read is checked to be UTF-8,
and a bad value is named by its line or row.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from lowmem_core.errors import PipelineError, require_extra
from pipeline.inputs import Chunk, RecordChunk, Source, first_byte, read_blocks

# JSON Lines parsed per Arrow call (then encoded in chunks). Parsing takes about 5x the block
# while it runs; 1 MB parses as fast as 4 MB did, in a fifth of the memory.
_JSON_BLOCK_BYTES = 1 << 20
_RECORDS_PER_CHUNK = 1 << 10  # records of a JSON array or table per chunk


def json_texts(source: Source, field: str, chunk_bytes: int) -> Iterator[Chunk]:
    """The `field` of every record of a JSON Lines file or JSON array of records, in order."""
    if _is_json_array(source, chunk_bytes):
        return _read_json_array(source, field, chunk_bytes)
    return _read_jsonl(source, field, chunk_bytes)


def _is_json_array(source: Source, chunk_bytes: int) -> bool:
    """Whether `source` is a JSON array of records rather than JSON Lines; fails if neither."""
    first = first_byte(source, chunk_bytes)
    if first not in (b"[", b"{"):
        raise PipelineError(
            f"{source.path} is neither JSON Lines nor a JSON array of records (it starts with "
            f"{first!r}); pass one record per line or a [...] of records"
        )
    return first == b"["


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


def _read_jsonl(source: Source, field: str, chunk_bytes: int) -> Iterator[Chunk]:
    """JSON Lines, parsed a block of whole lines at a time (a line longer than a block waits
    for its end), the text field alone after the first block has shown its type."""
    kind, parse, pending, line = None, None, [], 1  # line: the number of the block's first
    for block in read_blocks(source, _JSON_BLOCK_BYTES):
        end = block.rfind(b"\n") + 1
        if end == 0:
            pending.append(block)
            continue
        lines = b"".join([*pending, block[:end]])
        pending = [block[end:]]
        column, kind, parse = _parse_lines(source, field, lines, kind, parse, line)
        line += lines.count(b"\n")
        yield from _bounded(column, source, chunk_bytes)
    rest = b"".join(pending)
    if rest.strip():
        column, kind, parse = _parse_lines(source, field, rest, kind, parse, line)
        yield from _bounded(column, source, chunk_bytes)


def _parse_lines(source: Source, field: str, lines: bytes, kind, parse, first_line: int):
    """The `field` column of whole JSON `lines`, the first of which is line `first_line`."""
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
        raise _jsonl_error(source, exc, lines, first_line) from None
    column = column.combine_chunks()
    bad = _not_utf8(column)
    if bad is not None:
        raise _not_utf8_error(source, f"line {first_line + _line_of_row(lines, bad)}", field)
    return column, kind, parse


def _line_of_row(lines: bytes, row: int) -> int:
    """Lines before the `row`-th (from 0) non-blank line of `lines` (the JSON reader's rows
    skip blank lines)."""
    seen = -1
    for i, line in enumerate(lines.split(b"\n")):
        seen += bool(line.strip())
        if seen == row:
            return i
    return 0


def _not_utf8(column: pa.Array) -> int | None:
    """The index of the first value of a text column that is not UTF-8, else None."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return None
    try:
        column.validate(full=True)
    except pa.ArrowInvalid as exc:
        found = re.search(r"string index (\d+)", str(exc))
        if found is None:
            raise
        return int(found.group(1))
    return None


def _not_utf8_error(source: Source, at: str, field: str) -> PipelineError:
    return PipelineError(
        f"{source.path} {at}: {field!r} holds bytes that are not UTF-8 text; re-encode the "
        "file's text as UTF-8 or drop the record"
    )


def _bounded(column: pa.Array, source: Source, chunk_bytes: int) -> Iterator[Chunk]:
    """`column` in chunks of about `chunk_bytes` of text (or token ids)."""
    if pa.types.is_large_string(column.type):
        sizes = pc.binary_length(column)
    else:
        sizes = pc.multiply(pc.list_value_length(column), 8)
    ends = np.cumsum(pc.fill_null(sizes, 0).to_numpy(zero_copy_only=False))
    start = 0
    while start < len(column):
        before = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, before + chunk_bytes, side="right")))
        yield Chunk(column.slice(start, stop - start), source)
        start = stop


def _jsonl_error(source: Source, exc: Exception, lines: bytes, first_line: int) -> PipelineError:
    message = str(exc).splitlines()[0]
    if "changed from" in message:
        return PipelineError(
            f"{source.path}: a field holds one type in some records and another in others "
            f"({message}); give every record's text field the same type"
        )
    # The JSON reader numbers rows within the block it was given; name the file's line.
    row = re.search(r"\s*in row (\d+)$", message)
    if row is None:
        return PipelineError(
            f"{source.path} is not valid JSON Lines ({message}); fix or remove the bad line"
        )
    line = first_line + _line_of_row(lines, int(row.group(1)))
    fix = "fix or remove the bad line"
    if "surrogate" in message:  # a \\u escape of half a UTF-16 pair
        fix = "write the whole UTF-16 surrogate pair (such as \\ud83d\\ude00) or remove the line"
    return PipelineError(
        f"{source.path} is not valid JSON Lines: line {line} ({message[: row.start()]}); {fix}"
    )


def _read_json_array(source: Source, field: str, chunk_bytes: int) -> Iterator[Chunk]:
    """A JSON array of records, parsed one record at a time (memory: about one chunk)."""
    values: list = []
    size = 0
    kind = None
    first = 1  # the number of values[0] in the array, from 1
    for index, record in _array_elements(source, chunk_bytes):
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
        if size >= chunk_bytes:
            yield Chunk(_records_array(values, kind, source, field, first), source)
            values, size, first = [], 0, index + 2
    if values:
        yield Chunk(_records_array(values, kind, source, field, first), source)


def _array_elements(source: Source, chunk_bytes: int) -> Iterator[tuple[int, object]]:
    """(index, element) of a JSON array file, parsed one element at a time."""
    decoder = json.JSONDecoder()
    text, pos, index, done, read = "", 0, 0, False, 0
    blocks = read_blocks(source, chunk_bytes)
    utf8 = codecs.getincrementaldecoder("utf-8")("strict")

    def more() -> bool:
        nonlocal text, pos, done, read
        block = next(blocks, b"")
        try:
            text = text[pos:] + utf8.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            raise PipelineError(
                f"{source.path} is not UTF-8 (an invalid byte within 3 of byte "
                f"{read + exc.start:,}, in record {index + 1} or after it); convert it to UTF-8"
            ) from None
        pos, done, read = 0, not block, read + len(block)
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
        yield index, record
        index += 1
        sep = skip_space()
        if sep == "]":
            break
        if sep != ",":
            raise bad(text[pos : pos + 20])
        pos += 1


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


def _records_array(
    values: list, kind: str | None, source: Source, field: str, first: int
) -> pa.Array:
    """`values` (records number first, first + 1, ... of a JSON array) as one Arrow array."""
    if kind == "tokens":
        return pa.array(values, type=pa.large_list(pa.int64()))
    try:
        return pa.array(values, type=pa.large_string())
    except UnicodeEncodeError:  # a lone surrogate, which JSON's \u escapes can write
        i, char = next((i, c) for i, v in enumerate(values) for c in lone_surrogates(v))
        raise PipelineError(
            f"{source.path}: record {first + i} of the JSON array has {field!r} holding "
            f"{char.encode('unicode_escape').decode()}, half of a UTF-16 surrogate pair and not "
            "text; write the whole pair (such as \\ud83d\\ude00) or drop the record"
        ) from None


def lone_surrogates(text: str | None) -> str:
    """The code points of `text` that UTF-8 cannot encode (surrogates without their pair)."""
    if not text or text.isascii():
        return ""
    try:
        text.encode()
    except UnicodeEncodeError:
        return "".join(c for c in text if "\ud800" <= c <= "\udfff")
    return ""


def parquet_texts(source: Source, field: str, chunk_bytes: int) -> Iterator[Chunk]:
    """The `field` of every row of a Parquet file, in order."""
    pfile = _open_parquet(source)
    kind = _check_field(source.path, pfile.schema_arrow, field)
    meta = pfile.metadata
    column = pfile.schema_arrow.get_field_index(field)
    nbytes = sum(
        meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups)
    )
    rows = _rows_per_chunk(nbytes, meta.num_rows, chunk_bytes)
    yield from _checked_chunks(pfile.iter_batches(batch_size=rows, columns=[field]), kind, source)


def _checked_chunks(batches, kind: pa.DataType, source: Source) -> Iterator[Chunk]:
    """A chunk of each batch's one column, cast to `kind`, its text checked to be UTF-8."""
    first = 1
    for batch in batches:
        column = batch.column(0)
        bad = _not_utf8(column)
        if bad is not None:
            raise _not_utf8_error(source, f"row {first + bad}", batch.schema.names[0])
        first += batch.num_rows
        yield Chunk(column.cast(kind), source)


def _open_parquet(source: Source) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(source.path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PipelineError(
            f"{source.path} is not a readable Parquet file ({exc}); rewrite it or pass another "
            "input"
        ) from None


def _load_datasets(source: Source):
    datasets = require_extra("datasets", "hf", "reading a `datasets` save_to_disk folder")
    try:
        return datasets.load_from_disk(str(source.path))
    except Exception as exc:  # datasets raises several unrelated types for unreadable folders
        raise PipelineError(
            f"{source.path} is not a readable `datasets` save_to_disk folder ({exc}); re-save it"
        ) from None


def _rows_per_chunk(nbytes: int, num_rows: int, chunk_bytes: int) -> int:
    """Rows of about `chunk_bytes`, from a table's size."""
    return max(1, min(1 << 16, chunk_bytes * max(num_rows, 1) // max(nbytes, 1)))


def datasets_texts(source: Source, field: str, chunk_bytes: int) -> Iterator[Chunk]:
    """The `field` of every row of a `datasets` save_to_disk folder, in order."""
    ds = _load_datasets(source)
    table = ds.data.table.select([field]) if field in ds.column_names else ds.data.table
    kind = _check_field(source.path, table.schema, field)
    rows = _rows_per_chunk(table.nbytes, table.num_rows, chunk_bytes)
    yield from _checked_chunks(table.to_batches(max_chunksize=rows), kind, source)


# ----------------------------------------------------------------------------- whole records


def json_records(source: Source, chunk_bytes: int) -> Iterator[RecordChunk]:
    """The records of a JSON Lines file or JSON array, each kept whole."""
    if _is_json_array(source, chunk_bytes):
        return _array_records(source, chunk_bytes)
    return _jsonl_records(source, chunk_bytes)


def parquet_records(source: Source, fields: tuple[str, ...]) -> Iterator[RecordChunk]:
    """The rows of a Parquet file, with only those of `fields` that it has."""
    pfile = _open_parquet(source)
    columns = _record_columns(source, pfile.schema_arrow.names, fields)
    batches = pfile.iter_batches(batch_size=_RECORDS_PER_CHUNK, columns=columns)
    return _table_records(source, batches)


def datasets_records(source: Source, fields: tuple[str, ...]) -> Iterator[RecordChunk]:
    """The rows of a `datasets` save_to_disk folder, with only those of `fields` that it has."""
    data = _load_datasets(source).data.table
    columns = _record_columns(source, data.schema.names, fields)
    batches = data.select(columns).to_batches(max_chunksize=_RECORDS_PER_CHUNK)
    return _table_records(source, batches)


def _record_columns(source: Source, names: list[str], fields: tuple[str, ...]) -> list[str]:
    """The columns of `fields` among a table's `names`; fails when it has none of them."""
    columns = [f for f in fields if f in names]
    if not columns:
        raise PipelineError(
            f"{source.path} has none of the fields {', '.join(map(repr, fields))} (fields: "
            f"{', '.join(names)}); name them with --prompt-field/--response-field/--messages-field"
        )
    return columns


def _table_records(source: Source, batches) -> Iterator[RecordChunk]:
    first = 1
    for batch in batches:
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            bad = _not_utf8(column)
            if bad is not None:
                raise _not_utf8_error(source, f"record {first + bad}", name)
        records = batch.to_pylist()
        yield RecordChunk(records, source, first)
        first += len(records)


def _jsonl_records(source: Source, chunk_bytes: int) -> Iterator[RecordChunk]:
    carry, line_no, first, records, size = b"", 0, 1, [], 0
    blocks = read_blocks(source, chunk_bytes)
    while True:
        block = next(blocks, b"")
        lines = (carry + block).split(b"\n")
        carry = lines.pop() if block else b""
        for line in lines:
            line_no += 1
            if not line.strip():
                if records:  # numbers stay consecutive within a chunk
                    yield RecordChunk(records, source, first, "line")
                    records, size = [], 0
                continue
            try:
                record = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise PipelineError(
                    f"{source.path} line {line_no} is not valid JSON ({exc}); fix or remove it"
                ) from None
            if not records:
                first = line_no
            records.append(record)
            size += len(line)
            if size >= chunk_bytes:
                yield RecordChunk(records, source, first, "line")
                records, size = [], 0
        if not block:
            break
    if records:
        yield RecordChunk(records, source, first, "line")


def _array_records(source: Source, chunk_bytes: int) -> Iterator[RecordChunk]:
    records, first = [], 1
    for index, record in _array_elements(source, chunk_bytes):
        if not records:
            first = index + 1
        records.append(record)
        if len(records) == _RECORDS_PER_CHUNK:
            yield RecordChunk(records, source, first)
            records = []
    if records:
        yield RecordChunk(records, source, first)
