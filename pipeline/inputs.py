"""What the build's input readers share: an input (`Source`), the chunks they yield, and block
reads of a file that may be compressed (.gz, .bz2, .zst, decompressed while read)."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from lowmem_core.errors import PipelineError


@dataclass(frozen=True)
class Source:
    """One input file or `datasets` folder and how to read it."""

    path: Path
    kind: str  # its format in pipeline/sources.py's FORMATS: "txt", "json", "parquet", ...
    compression: str | None = None  # "gzip", "bz2" or "zstd"


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
    # Where a .txt document longer than a piece may be cut: the tokenizer's `safe_cut`, so the
    # pieces' ids are the whole's; None: at line breaks or spaces (sources.safe_cut).
    cut: Callable[..., int | None] | None = None


@dataclass(frozen=True)
class RecordChunk:
    """Whole records of `source` (prompt/response builds), in order."""

    records: list
    source: Source
    first: int  # number of records[0] in the file, from 1: its line in JSON Lines, else its place
    unit: str = "record"  # what `first` counts: "line" (JSON Lines) or "record"


def read_blocks(source: Source, size: int, skip_bom: bool = True) -> Iterator[bytes]:
    """The bytes of `source`, decompressed, in blocks of `size` (the last may be shorter); a
    UTF-8 byte order mark that starts the file (Windows editors write one) is left out unless
    `skip_bom` is False."""
    with pa.input_stream(str(source.path), compression=source.compression) as stream:
        first = skip_bom
        while True:
            try:
                block = stream.read(size)
            except OSError as exc:  # a damaged compressed stream
                raise _decode_error(source, exc) from None
            bom = first and block.startswith(codecs.BOM_UTF8)
            first = False
            if bom:
                block = block[len(codecs.BOM_UTF8) :]
                if not block:  # a block of just the mark: read on
                    continue
            if not block:
                return
            yield block


def _decode_error(source: Source, exc: Exception) -> PipelineError:
    what = {"gzip": "gzip", "bz2": "bzip2", "zstd": "zstd"}[source.compression or "gzip"]
    return PipelineError(
        f"{source.path} is not a valid {what} file ({str(exc).splitlines()[0]}); re-compress it "
        "or pass the uncompressed file"
    )


def first_byte(source: Source, size: int) -> bytes:
    """The first non-whitespace byte of `source` (b"" when it holds only whitespace)."""
    for block in read_blocks(source, size):
        stripped = block.lstrip()
        if stripped:
            return stripped[:1]
    return b""
