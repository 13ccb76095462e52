"""Inputs that are not text: one error line naming the file, the record (line, row or place in
a JSON array) and the fix, for text and prompt/response builds alike; a UTF-8 byte order mark at
the start of a text or JSON file is not text and is left out."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import open_dataset, records, sources
from pipeline.__main__ import main

BOM = b"\xef\xbb\xbf"
NOT_UTF8 = b"caf\xe9"  # Latin-1, as a Windows export writes it


def build(capsys, *args) -> tuple[int, str]:
    """Exit code and the error line (or the last line printed)."""
    code = main(["build", *map(str, args)])
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).replace("\r", "\n").strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == (1 if code else 0), lines
    return code, errors[0] if errors else lines[-1]


def texts(out: Path) -> list[str]:
    ds = open_dataset(out)
    return [bytes(ds[i].astype("uint8")).decode() for i in range(len(ds))]


def write_parquet(path: Path, column: str, values: list[bytes]) -> Path:
    """A Parquet file whose string column holds `values` as bytes, unchecked (as other writers
    leave them)."""
    strings = pa.array(values, pa.binary()).view(pa.string())
    other = pa.array(["an answer"] * len(values))
    pq.write_table(pa.table({column: strings, "response": other}), path, row_group_size=2)
    return path


# ----------------------------------------------------------------------------- lone surrogates


@pytest.mark.parametrize("sft", [False, True], ids=["text", "sft"])
def test_a_lone_surrogate_in_a_json_array_names_its_record(tmp_path, capsys, sft):
    field = "prompt" if sft else "text"
    body = [{field: "fine", "response": "a"}, {field: "also fine", "response": "b"}]
    text = json.dumps(body)[:-1] + f', {{"{field}": "half \\ud800 pair", "response": "c"}}]'
    (tmp_path / "a.json").write_text(text)
    code, said = build(capsys, tmp_path / "a.json", "--out", tmp_path / "ds", *["--sft"] * sft)
    assert code == 2 and not (tmp_path / "ds").exists()
    assert "a.json" in said and "record 3" in said and "\\ud800" in said
    assert "write the whole pair (such as \\ud83d\\ude00) or drop the record" in said


def test_a_lone_surrogate_in_a_record_of_json_lines_names_its_line(tmp_path, capsys):
    lines = [json.dumps({"prompt": "q", "response": "a"})] * 2 + [
        '{"prompt": "q", "response": "\\udc00 alone"}'
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    code, said = build(capsys, tmp_path / "a.jsonl", "--out", tmp_path / "ds", "--sft")
    assert code == 2 and "a.jsonl line 3 has a response holding \\udc00" in said


def test_json_lines_errors_name_the_files_line_across_blocks_and_blank_lines(
    tmp_path, capsys, monkeypatch
):
    """The JSON reader numbers rows within a block and skips blank lines: the error names the
    line of the file."""
    monkeypatch.setattr(records, "_JSON_BLOCK_BYTES", 64)
    good = json.dumps({"text": "a fine line of text"})
    lines = [good, "", good, good, "  ", good, '{"text": "half \\ud800 pair"}', good]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    code, said = build(capsys, tmp_path / "a.jsonl", "--out", tmp_path / "ds")
    assert code == 2 and "a.jsonl is not valid JSON Lines: line 7" in said
    assert "write the whole UTF-16 surrogate pair" in said


# ----------------------------------------------------------------------------- not UTF-8


@pytest.mark.parametrize("sft", [False, True], ids=["text", "sft"])
def test_parquet_text_that_is_not_utf8_names_its_row(tmp_path, capsys, monkeypatch, sft):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 8)  # several batches: rows count across them
    field = "prompt" if sft else "text"
    path = write_parquet(tmp_path / "a.parquet", field, [b"one", b"two", b"three", NOT_UTF8])
    code, said = build(capsys, path, "--out", tmp_path / "ds", *["--sft"] * sft)
    assert code == 2 and not (tmp_path / "ds").exists()
    assert f"a.parquet {'record' if sft else 'row'} 4: '{field}' holds bytes that are not" in said
    assert "re-encode the file's text as UTF-8 or drop the record" in said


def test_json_lines_text_that_is_not_utf8_names_its_line(tmp_path, capsys):
    good = json.dumps({"text": "fine"}).encode()
    data = b"\n".join([good, good, b'{"text": "' + NOT_UTF8 + b'"}', good]) + b"\n"
    (tmp_path / "a.jsonl").write_bytes(data)
    code, said = build(capsys, tmp_path / "a.jsonl", "--out", tmp_path / "ds")
    assert code == 2 and "a.jsonl line 3: 'text' holds bytes that are not UTF-8" in said


# ----------------------------------------------------------------------------- byte order marks


@pytest.mark.parametrize(
    "name, data",
    [
        ("a.jsonl", b'{"text": "first"}\n{"text": "second"}\n'),
        ("a.json", b'[{"text": "first"}, {"text": "second"}]'),
        ("a.txt", b"first\n\nsecond\n"),
        ("a.jsonl.gz", gzip.compress(b'{"text": "first"}\n{"text": "second"}\n')),
        ("a.txt.gz", gzip.compress(b"first\n\nsecond\n")),
    ],
    ids=["jsonl", "json", "txt", "jsonl.gz", "txt.gz"],
)
def test_a_byte_order_mark_at_the_start_is_left_out(tmp_path, capsys, name, data):
    if name.endswith(".gz"):  # the mark is in the text, inside the compression
        data = gzip.compress(BOM + gzip.decompress(data))
    else:
        data = BOM + data
    (tmp_path / name).write_bytes(data)
    code, said = build(capsys, tmp_path / name, "--out", tmp_path / "ds")
    assert code == 0, said
    assert texts(tmp_path / "ds") == ["first", "second"]


def test_a_byte_order_mark_starts_sft_records_too(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_bytes(BOM + b'{"prompt": "q", "response": "a"}\n')
    code, said = build(capsys, tmp_path / "a.jsonl", "--out", tmp_path / "ds", "--sft")
    assert code == 0, said
    assert texts(tmp_path / "ds") == ["qa"]


@pytest.mark.parametrize("after", [b"", b" and more"], ids=["at-the-end", "inside"])
def test_the_offset_of_a_bad_byte_in_a_txt_file_is_the_files_own(tmp_path, capsys, after):
    """Counted from the file's first byte (its byte order mark too); a mark later on is text."""
    (tmp_path / "a.txt").write_bytes(BOM + b"first\n\n" + BOM + b"second\n\n" + NOT_UTF8 + after)
    code, said = build(capsys, tmp_path / "a.txt", "--out", tmp_path / "ds")
    assert code == 2 and "invalid byte at offset 24" in said  # the file's own offset
