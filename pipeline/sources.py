"""Input readers of `pipeline build`: files, folders and globs -> chunks of documents, streamed.

Inputs: .txt/.md text (documents separated by blank lines, or one per line), JSON Lines, a JSON
array of records (Alpaca style), Parquet files or a folder of Parquet shards, and a `datasets`
save_to_disk folder; text and JSON may be compressed (.gz, .bz2, .zst), decompressed while read.
Each format is one `InputFormat` object in `FORMATS`, keyed by the `Source.kind` it gives its
inputs: it says which files or folders are of it and reads them, so nothing else tests a kind.
This module resolves inputs, reads .txt files and cleans chunks; the record formats are read in
pipeline/records.py. Every reader yields `Chunk`s of a bounded size in input order: an Arrow
array of texts (or of token-id lists), with nulls where a record has no text; `--sft` builds
read whole records instead (`read_records`).

Documents are kept as written: no whitespace is stripped (`--strip` trims Unicode whitespace at
both ends). A document with no text (empty, whitespace only, null, or a record without the text
field) is skipped by every reader alike; skipped records are counted (blank runs between .txt
documents are separators, not records). A .txt document longer than one chunk is emitted in
pieces marked as continuing, cut only where the build's tokenizer gives the whole document's
ids (`ReadOptions.cut`), so no reader holds more than about a chunk of text unless a stretch of a
document has no such place.
"""

from __future__ import annotations

import codecs
import glob
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lowmem_core.errors import PipelineError
from lowmem_core.format import INDEX_NAME
from pipeline import records
from pipeline.inputs import Chunk, ReadOptions, RecordChunk, Source, read_blocks
from pipeline.tokenizer import CUT_MARGIN

CHUNK_BYTES = 256 << 10  # text per chunk: amortises a tokenizer call; its encodings stay small
PIECE_CHARS = 512 << 10  # a longer document is read and tokenised in pieces of about this size
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
# A blank-line separator: the line break ending a document, then one or more blank lines
# (whitespace only); the next document's leading whitespace is kept.
_BLANK_RUN = re.compile(r"\r?\n(?:[^\S\n]*\n)+")
_SPLIT_SHARD = re.compile(r"(.+?)-\d+-of-\d+\.parquet$")


# ----------------------------------------------------------------------------- input formats


class InputFormat(ABC):
    """One input format: which files or folders are of it, and how it reads them."""

    kind: str  # the `Source.kind` of its inputs
    counts_skipped = True  # a document without text is a skipped record, and counted

    def reads_file(self, suffix: str, compression: str | None) -> bool:
        """Whether a file of `suffix` (the one before any compression suffix) is of this
        format."""
        return False

    def reads_folder(self, path: Path) -> bool:
        """Whether the folder `path` is one input of this format."""
        return False

    @abstractmethod
    def read_texts(self, source: Source, options: ReadOptions) -> Iterator[Chunk]:
        """The documents of `source` in chunks of about CHUNK_BYTES, in order."""

    @abstractmethod
    def read_records(self, source: Source, fields: tuple[str, ...]) -> Iterator[RecordChunk]:
        """The records of `source` in chunks of about CHUNK_BYTES, in order, with only `fields`
        where the format stores columns."""


class _Text(InputFormat):
    kind = "txt"
    counts_skipped = False  # blank runs between documents are separators, not records

    def reads_file(self, suffix: str, compression: str | None) -> bool:
        return suffix in (".txt", ".text", ".md")

    def read_texts(self, source: Source, options: ReadOptions) -> Iterator[Chunk]:
        return _read_txt(source, options)

    def read_records(self, source: Source, fields: tuple[str, ...]) -> Iterator[RecordChunk]:
        raise PipelineError(
            f"{source.path} is plain text, but --sft needs records with a prompt and a response; "
            "pass .jsonl, .json or .parquet records"
        )


class _Json(InputFormat):
    kind = "json"  # JSON Lines or a JSON array of records

    def reads_file(self, suffix: str, compression: str | None) -> bool:
        return suffix in (".jsonl", ".ndjson", ".json")

    def read_texts(self, source: Source, options: ReadOptions) -> Iterator[Chunk]:
        return records.json_texts(source, options.text_field, CHUNK_BYTES)

    def read_records(self, source: Source, fields: tuple[str, ...]) -> Iterator[RecordChunk]:
        return records.json_records(source, CHUNK_BYTES)


class _Parquet(InputFormat):
    kind = "parquet"

    def reads_file(self, suffix: str, compression: str | None) -> bool:
        return suffix == ".parquet" and compression is None  # Parquet compresses inside

    def read_texts(self, source: Source, options: ReadOptions) -> Iterator[Chunk]:
        return records.parquet_texts(source, options.text_field, CHUNK_BYTES)

    def read_records(self, source: Source, fields: tuple[str, ...]) -> Iterator[RecordChunk]:
        return records.parquet_records(source, fields)


class _Datasets(InputFormat):
    kind = "datasets"  # a `datasets` save_to_disk folder of one split

    def reads_folder(self, path: Path) -> bool:
        """Whether `path` is a save_to_disk folder of one split; fails for one of several splits
        (a DatasetDict), naming them."""
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return True
        if (path / "dataset_dict.json").is_file():
            try:
                splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            except (ValueError, KeyError, TypeError):
                splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise PipelineError(
                f"input {path} is a `datasets` DatasetDict with splits "
                f"{', '.join(map(str, splits))}; pass one split's folder, e.g. "
                f"{path / str(splits[0] if splits else 'train')}"
            )
        return False

    def read_texts(self, source: Source, options: ReadOptions) -> Iterator[Chunk]:
        return records.datasets_texts(source, options.text_field, CHUNK_BYTES)

    def read_records(self, source: Source, fields: tuple[str, ...]) -> Iterator[RecordChunk]:
        return records.datasets_records(source, fields)


# In the order a file's suffix or a folder is matched against them.
FORMATS: dict[str, InputFormat] = {f.kind: f for f in (_Text(), _Json(), _Parquet(), _Datasets())}


def input_format(kind: str) -> InputFormat:
    """The format whose inputs have `kind` (a `Source.kind`)."""
    try:
        return FORMATS[kind]
    except KeyError:
        raise PipelineError(
            f"unknown input kind {kind!r}; the known kinds are {', '.join(FORMATS)}"
        ) from None


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
    for fmt in FORMATS.values():
        if fmt.reads_file(suffix, compression):
            return Source(path, fmt.kind, compression)
    shown = "".join(path.suffixes[-2 if compression else -1 :]) or "(no suffix)"
    raise PipelineError(
        f"{path}: unknown input type {shown}; inputs are "
        ".txt, .jsonl, .json, .parquet (text and JSON may end in .gz, .bz2 or .zst), a Parquet "
        "folder or a `datasets` folder"
    )


def _folder_sources(path: Path) -> list[Source]:
    """A folder that a format reads as one input, or a folder of Parquet shards (sorted by
    name)."""
    for fmt in FORMATS.values():
        if fmt.reads_folder(path):
            return [Source(path, fmt.kind)]
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
    return input_format(source.kind).read_texts(source, options)


def read_records(source: Source, fields: tuple[str, ...]) -> Iterator[RecordChunk]:
    """The records of `source` (prompt/response builds) in chunks of about CHUNK_BYTES, with
    only `fields` where the format stores columns (Parquet, `datasets`)."""
    return input_format(source.kind).read_records(source, fields)


def _read_txt(source: Source, options: ReadOptions) -> Iterator[Chunk]:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    carry, consumed, open_doc = "", 0, False  # open_doc: the last chunk's last document goes on
    searched = 0  # the first characters of `carry` known to hold no place to cut
    blocks = read_blocks(source, CHUNK_BYTES, skip_bom=False)  # offsets below count its bytes
    first = True
    while True:
        block = next(blocks, b"")
        if first and block.startswith(codecs.BOM_UTF8):  # a byte order mark is not text
            block, consumed = block[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
        first = False
        # The decoder's input starts with the bytes of a character it holds from the last block.
        at = consumed - len(decoder.getstate()[0])
        try:
            new = decoder.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            raise PipelineError(
                f"{source.path} is not UTF-8 text (invalid byte at offset {at + exc.start}); "
                "convert it to UTF-8 or pass a .jsonl/.parquet file"
            ) from None
        consumed += len(block)
        if "\x00" in new:
            raise PipelineError(
                f"{source.path} contains NUL bytes, so it is binary, not text; pass a text file"
            )
        text = carry + new
        if options.split == "lines":
            pieces = [p[:-1] if p.endswith("\r") else p for p in text.split("\n")]
        else:
            pieces = _BLANK_RUN.split(text)
        carry = pieces.pop() if block else ""
        searched = 0 if pieces else searched  # the carry starts a document of its own
        if not block and pieces:
            pieces[-1] = pieces[-1].removesuffix("\n").removesuffix("\r")
        if not block and not open_doc and pieces == [""]:
            return
        # A document longer than a piece: emit most of what is read of it, cut in its second
        # half where the tokenizer allows, so what is carried stays under a piece; with no such
        # place yet, carry on reading.
        cut = _cut_read_text(carry, options.cut, searched) if len(carry) > PIECE_CHARS else None
        tail = cut is not None
        if tail:
            pieces.append(carry[:cut])
            carry, searched = carry[cut:], 0
        elif len(carry) > PIECE_CHARS:
            searched = len(carry) - CUT_MARGIN
        if pieces:
            yield Chunk(pa.array(pieces, type=pa.large_string()), source, open_doc, tail)
            open_doc = tail
        if not block:
            return


def _cut_read_text(carry: str, cut, searched: int) -> int | None:
    """Where to cut `carry`, the text read so far of a document longer than a piece: in its
    second half, past `searched`, where `cut` (a tokenizer's `safe_cut`) allows, judging no place
    whose right side is not read yet; or by `safe_cut` below when `cut` is None."""
    if cut is None:
        return safe_cut(carry, len(carry))
    return cut(carry, max(searched, len(carry) // 2), len(carry), partial=True)


def safe_cut(text: str, limit: int) -> int:
    """Where to cut `text` in the second half of its first `limit` characters when no tokenizer
    says (`ReadOptions.cut` is None): after a line break that a non-space follows, else before a
    space between non-spaces, else where whitespace follows a non-space, else at `limit`. Most
    pre-tokenizers split there too, but not all (a SentencePiece model puts "▁" before every
    text; a cut at `limit` may fall inside a word), so the build passes its tokenizer's."""
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
    count = input_format(chunk.source.kind).counts_skipped
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
