"""Input readers: every format and compression gives the same documents, edge whitespace is kept
(or stripped by request) alike everywhere, documents without text are skipped and counted, and no
reader holds more than about a chunk of text, however long a document."""

from __future__ import annotations

import bz2
import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import PipelineError, sources
from pipeline import records as record_readers
from pipeline.sources import (
    Chunk,
    ReadOptions,
    Source,
    clean,
    read_records,
    read_source,
    resolve_inputs,
    safe_cut,
)

# Edge whitespace that must survive: U+00A0 indentation, U+3000 (ideographic space), tabs.
DOCS = [
    "Hello world.",
    "\u00a0\u00a0Indented with no-break spaces.",
    "\u3000全角の字下げ。\u3000",
    "two\nlines",
    "\ttabbed ",
]


def texts(source: Source, strip: bool = False, **options) -> list[str]:
    out = []
    for chunk in read_source(source, ReadOptions(**options)):
        out.extend(clean(chunk, strip).docs.to_pylist())
    return out


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def zst_write(path, data: bytes):
    with pa.output_stream(str(path), compression="zstd") as out:
        out.write(data)
    return path


@pytest.fixture
def all_formats(tmp_path):
    """The same DOCS in every input format and compression; name -> path."""
    txt = "\n\n".join(DOCS) + "\n"
    records = [{"text": d, "id": i} for i, d in enumerate(DOCS)]
    paths = {
        "a.txt": tmp_path / "a.txt",
        "a.jsonl": write_jsonl(tmp_path / "a.jsonl", records),
        "a.jsonl.gz": write_jsonl(tmp_path / "a.jsonl.gz", records, gzip.open),
        "a.jsonl.bz2": write_jsonl(tmp_path / "a.jsonl.bz2", records, bz2.open),
        "a.jsonl.zst": zst_write(tmp_path / "a.jsonl.zst", (tmp_path / "a.jsonl").read_bytes()),
        "a.txt.gz": tmp_path / "a.txt.gz",
        "a.txt.zst": zst_write(tmp_path / "a.txt.zst", txt.encode()),
        "array.json": tmp_path / "array.json",
        "array.json.gz": tmp_path / "array.json.gz",
        "a.parquet": tmp_path / "a.parquet",
    }
    paths["a.txt"].write_text(txt, encoding="utf-8")
    paths["a.txt.gz"].write_bytes(gzip.compress(txt.encode()))
    paths["array.json"].write_text(json.dumps(records, indent=2, ensure_ascii=False))
    paths["array.json.gz"].write_bytes(gzip.compress(paths["array.json"].read_bytes()))
    pq.write_table(pa.table({"text": DOCS}), paths["a.parquet"])
    return paths


def test_every_format_and_compression_reads_the_same_documents_keeping_edge_whitespace(all_formats):
    for name, path in all_formats.items():
        [source] = resolve_inputs([path])
        assert texts(source) == DOCS, name


def test_strip_trims_unicode_whitespace_alike_in_every_reader(all_formats):
    stripped = [d.strip() for d in DOCS]
    for name, path in all_formats.items():
        [source] = resolve_inputs([path])
        assert texts(source, strip=True) == stripped, name


def test_txt_split_lines_and_crlf(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("one\r\n\u00a0two \r\n\r\n  \r\nthree\r\n".encode())
    [source] = resolve_inputs([path])
    assert texts(source, split="lines") == ["one", "\u00a0two ", "three"]
    assert texts(source) == ["one\r\n\u00a0two ", "three"]


def test_records_without_text_are_skipped_and_counted(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"text": "kept"},
            {"text": ""},
            {"text": None},
            {"other": 1},
            {"text": " \u3000 "},
            {"text": "also kept"},
        ],
    )
    [source] = resolve_inputs([path])
    [chunk] = list(read_source(source, ReadOptions()))
    cleaned = clean(chunk, strip=False)
    assert cleaned.docs.to_pylist() == ["kept", "also kept"]
    assert (cleaned.skipped_empty, cleaned.skipped_null) == (2, 2)
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"text": "kept"}, {"text": ""}, {"text": None}, {"x": 1}]))
    [chunk] = list(read_source(resolve_inputs([array])[0], ReadOptions()))
    cleaned = clean(chunk, strip=False)
    assert cleaned.docs.to_pylist() == ["kept"]
    assert (cleaned.skipped_empty, cleaned.skipped_null) == (1, 2)


def test_blank_runs_between_txt_documents_are_separators_not_skipped_records(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n\n\none\n\n\n\n   \ntwo\n\n")
    [chunk] = list(read_source(resolve_inputs([path])[0], ReadOptions()))
    cleaned = clean(chunk, strip=False)
    assert cleaned.docs.to_pylist() == ["one", "two"]
    assert (cleaned.skipped_empty, cleaned.skipped_null) == (0, 0)


def test_alpaca_style_json_array_with_another_text_field(tmp_path):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(5)]
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(records, indent=4))
    [source] = resolve_inputs([path])
    assert texts(source, text_field="instruction") == [f"Say {i}." for i in range(5)]
    with pytest.raises(
        PipelineError,
        match=r"has no field 'text' in its first record "
        r"\(fields: instruction, input, output\); pass --text-field",
    ):
        texts(source)


def test_json_array_is_parsed_record_by_record_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64)
    docs = [f"document number {i} " * (i % 7 + 1) for i in range(200)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": d} for d in docs]))
    chunks = list(read_source(resolve_inputs([path])[0], ReadOptions()))
    assert len(chunks) > 20
    assert [t for c in chunks for t in c.docs.to_pylist()] == docs


def test_jsonl_record_longer_than_a_block_is_read_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 256)
    monkeypatch.setattr(record_readers, "_JSON_BLOCK_BYTES", 256)
    docs = ["short"] * 30 + ["x" * 5000] + ["after"] * 30
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    assert texts(resolve_inputs([path])[0]) == docs


def test_token_id_lists_in_jsonl_and_json_array(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"ids": [1, 2]}, {"ids": None}, {"ids": [3]}])
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"ids": [1, 2]}, {"ids": []}, {"ids": [3]}]))
    for path in (jsonl, array):
        [chunk] = list(read_source(resolve_inputs([path])[0], ReadOptions(text_field="ids")))
        assert clean(chunk, False).docs.to_pylist() == [[1, 2], [3]]


def test_parquet_shard_folder_and_glob_list_the_same_files_in_order(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": [f"doc {i}"]}), folder / f"train-{i:05d}-of-00003.parquet")
    (folder / "README.md").write_text("# a dataset card")
    by_folder = resolve_inputs([folder])
    assert [s.path.name for s in by_folder] == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    assert resolve_inputs([folder / "*.parquet"]) == by_folder
    assert [t for s in by_folder for t in texts(s)] == ["doc 0", "doc 1", "doc 2"]


def test_folder_of_several_splits_is_refused_naming_them(tmp_path):
    for split in ("train", "test"):
        pq.write_table(pa.table({"text": ["x"]}), tmp_path / f"{split}-00000-of-00001.parquet")
    with pytest.raises(
        PipelineError, match=r"several splits \(test, train\); pass one split with a glob"
    ):
        resolve_inputs([tmp_path])


def test_datasets_dict_folder_names_its_splits(tmp_path):
    import datasets

    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["a"]}),
            "validation": datasets.Dataset.from_dict({"text": ["b"]}),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        PipelineError,
        match=r"DatasetDict with splits train, validation; "
        r"pass one split's folder, e.g. .*dd/train",
    ):
        resolve_inputs([tmp_path / "dd"])
    [source] = resolve_inputs([tmp_path / "dd" / "train"])
    assert source.kind == "datasets" and texts(source) == ["a"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (
            lambda d: (d / "nothing").mkdir(),
            r"folder with no \.parquet files .*a glob such as DIR/\*\.jsonl",
        ),
        (
            lambda d: (
                (d / "nothing" / "sub").mkdir(parents=True)
                or pq.write_table(pa.table({"text": ["x"]}), d / "nothing" / "sub" / "a.parquet")
            ),
            r"its subfolders sub do: pass one",
        ),
        (
            lambda d: (d / "nothing").mkdir() or (d / "nothing" / "index.json").write_text("{}"),
            r"is a dataset built by `pipeline build`",
        ),
    ],
)
def test_folders_that_are_no_input_say_what_they_are(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(PipelineError, match=message):
        resolve_inputs([tmp_path / "nothing"])


def test_glob_that_matches_nothing(tmp_path):
    with pytest.raises(PipelineError, match=r"input pattern .*\*\.jsonl matches no files"):
        resolve_inputs([tmp_path / "*.jsonl"])


def test_damaged_compressed_input_is_one_line(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "x"}\n' * 1000)[:-40] + b"\x00" * 40)
    with pytest.raises(
        PipelineError, match=r"a\.jsonl\.gz is not a valid gzip file .*re-compress it"
    ):
        texts(resolve_inputs([path])[0])


def test_json_that_is_neither_lines_nor_array(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('"just a string"')
    with pytest.raises(PipelineError, match=r"neither JSON Lines nor a JSON array of records"):
        texts(resolve_inputs([path])[0])


def test_a_long_txt_document_is_emitted_in_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 300)
    monkeypatch.setattr(sources, "PIECE_CHARS", 1000)
    lines = [f"line {i} of a very long document" for i in range(2000)]
    path = tmp_path / "a.txt"
    path.write_text("first\n\n" + "\n".join(lines) + "\n\nlast\n")
    chunks = list(read_source(resolve_inputs([path])[0], ReadOptions()))
    # A piece is at most a piece of text plus one block read.
    assert max(len(t) for c in chunks for t in c.docs.to_pylist()) <= 1300
    # Reassemble: a piece marked as continuing joins the next chunk's first document.
    docs, open_doc = [], None
    for chunk in chunks:
        items = clean(chunk, False).docs.to_pylist()
        if open_doc is not None:
            items[0] = open_doc + items[0]
            open_doc = None
        if chunk.tail_continues:
            open_doc = items.pop()
        docs.extend(items)
    assert docs == ["first", "\n".join(lines), "last"]
    cut_chunks = [c for c in chunks if c.tail_continues]
    assert len(cut_chunks) > 50
    # Every cut falls after a line break.
    assert all(c.docs[-1].as_py().endswith("document\n") for c in cut_chunks)


def test_strip_of_a_long_document_trims_only_its_own_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 100)
    monkeypatch.setattr(sources, "PIECE_CHARS", 100)
    body = "\n".join(f" word{i} " for i in range(100))
    path = tmp_path / "a.txt"
    path.write_text("  " + body + "  \n")
    pieces = [clean(c, True) for c in read_source(resolve_inputs([path])[0], ReadOptions())]
    assert "".join(t for p in pieces for t in p.docs.to_pylist()) == ("  " + body + "  ").strip()


def test_safe_cut_prefers_line_breaks_then_spaces():
    assert safe_cut("abc\ndef ghi", 6) == 4
    assert safe_cut("abc\ndef ghi", 9) == 7  # the line break is not in the second half
    assert safe_cut("abcdef ghi jkl", 12) == 10
    assert safe_cut("x" * 20, 10) == 10
    assert safe_cut("ab\n\n\ncd", 6) == 5


def test_clean_keeps_continuing_pieces_even_when_blank():
    source = Source(path=None, kind="txt")  # type: ignore[arg-type]
    chunk = Chunk(pa.array(["  ", "a", "   "], type=pa.large_string()), source, True, True)
    cleaned = clean(chunk, strip=False)
    assert cleaned.docs.to_pylist() == ["  ", "a", "   "]
    assert pc.sum(pc.utf8_length(cleaned.docs)).as_py() == 6
    assert np.array_equal(
        np.array(clean(Chunk(pa.array(["", "b"], pa.large_string()), source), False).docs), ["b"]
    )


@pytest.mark.parametrize(
    "read",
    [
        lambda source: read_source(source, ReadOptions()),
        lambda source: read_records(source, ("prompt", "response")),
        lambda source: clean(Chunk(pa.array(["a"], pa.large_string()), source), False),
    ],
    ids=["read_source", "read_records", "clean"],
)
def test_an_unknown_input_kind_is_one_line_naming_the_known_kinds(tmp_path, read):
    (tmp_path / "a.xml").write_text("<doc>a</doc>")
    with pytest.raises(
        PipelineError,
        match=r"^unknown input kind 'xml'; the known kinds are txt, json, parquet, datasets$",
    ):
        read(Source(tmp_path / "a.xml", "xml"))
