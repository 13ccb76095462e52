"""`pipeline build`: every input format gives the same tokens; bad input fails in one line and
writes nothing; the output appears only when complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import PipelineError, open_dataset
from pipeline.build import build_dataset
from pipeline.config import BuildConfig

DOCS = ["Hello world.", "Zweites Dokument — mit Umlauten: äöü.", "third\nwith a newline", "x"]


def build(inputs, out, **kwargs):
    return build_dataset(BuildConfig(inputs=list(inputs), out=out, **kwargs), progress=False)


def doc_texts(path) -> list[str]:
    ds = open_dataset(path)
    return [bytes(ds[i].astype(np.uint8)).decode("utf-8") for i in range(len(ds))]


def test_txt_jsonl_parquet_and_datasets_folder_give_the_same_documents(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("\n\n".join(DOCS) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "hf"))
    for name in ("a.txt", "a.jsonl", "a.parquet", "hf"):
        out = tmp_path / f"out-{name}"
        report = build([tmp_path / name], out)
        assert report.num_documents == 4
        assert report.num_tokens == sum(len(d.encode()) for d in DOCS)
        assert doc_texts(out) == DOCS, name


def test_one_doc_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n")
    build([tmp_path / "a.txt"], tmp_path / "out", one_doc_per_line=True)
    assert doc_texts(tmp_path / "out") == ["one", "two", "three"]


def test_index_records_counts_dtype_tokenizer_and_checksums(sample_dataset_dir):
    index = json.loads((sample_dataset_dir / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 259
    assert index["tokenizer"] == {"kind": "byte", "id": "byte-v1", "bos_id": 256, "eos_id": 257, "pad_id": 258}
    assert index["num_documents"] == 6000
    assert all(len(f["sha256"]) == 64 for f in index["files"])
    assert open_dataset(sample_dataset_dir, verify=True).num_tokens == index["num_tokens"]


def _word_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"</s>": 0, "<pad>": 1, "[UNK]": 2}
    vocab.update({f"w{i}": i + 3 for i in range(vocab_size - 3)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.mark.parametrize("vocab_size, dtype", [(1000, "uint16"), (70_000, "uint32")])
def test_tokenizer_json_and_dtype_choice(tmp_path, vocab_size, dtype):
    _word_tokenizer(tmp_path / "tok.json", vocab_size)
    (tmp_path / "a.txt").write_text(f"w1 w2 w{vocab_size - 4}\n\nw5 zzz\n")
    build([tmp_path / "a.txt"], tmp_path / "out", tokenizer=str(tmp_path / "tok.json"))
    ds = open_dataset(tmp_path / "out")
    assert ds.token_dtype == np.dtype(dtype) and ds.eos_id == 0 and ds.pad_id == 1
    assert ds[0].tolist() == [4, 5, vocab_size - 1] and ds[1].tolist() == [8, 2]


def test_failed_build_leaves_no_dataset_and_no_temp_folder(tmp_path):
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(PipelineError, match="not valid JSON Lines"):
        build([tmp_path / "good.jsonl", tmp_path / "bad.jsonl"], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl"]


def test_overwrite_replaces_only_after_the_new_build_is_complete(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    build([tmp_path / "a.txt"], tmp_path / "out")
    with pytest.raises(PipelineError, match="already exists; pass --overwrite"):
        build([tmp_path / "b.txt"], tmp_path / "out")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PipelineError):
        build([tmp_path / "bad.txt"], tmp_path / "out", overwrite=True)
    assert doc_texts(tmp_path / "out") == ["first"]
    build([tmp_path / "b.txt"], tmp_path / "out", overwrite=True)
    assert doc_texts(tmp_path / "out") == ["second"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: [d / "missing.txt"], "does not exist"),
        (lambda d: [_write(d / "empty.txt", b"")], "is empty"),
        (lambda d: [_write(d / "blank.txt", b"\n\n  \n")], "no documents with text"),
        (lambda d: [_write(d / "bin.txt", bytes(range(256)) * 4)], "is not UTF-8 text|NUL bytes"),
        (lambda d: [_write(d / "a.jsonl", b'{"body": "x"}\n')], "has no field 'text'"),
        (lambda d: [_write(d / "a.jsonl", b'{"text": 5}\n')], "holds int64, expected text"),
        (lambda d: [_write(d / "a.csv", b"text\nx\n")], "unknown input type .csv"),
        (lambda d: [_write(d / "a.parquet", b"not parquet")], "not a readable Parquet file"),
        (lambda d: [], "no inputs given"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, setup, message):
    inputs = setup(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(PipelineError, match=message):
        build(inputs, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_cli_prints_one_line_and_exits_non_zero(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "build", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: input {tmp_path / 'nope.txt'} does not exist; check the path"
    assert "Traceback" not in result.stderr


def test_leftovers_of_killed_builds_are_cleaned_and_a_moved_aside_dataset_restored(tmp_path):
    (tmp_path / "a.txt").write_text("kept")
    build([tmp_path / "a.txt"], tmp_path / "out")
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    # A killed --overwrite build: the old dataset moved aside, the new one never renamed in.
    os.rename(tmp_path / "out", tmp_path / f".out.old-{dead_pid}")
    (tmp_path / f".out.tmp-{dead_pid}").mkdir()
    (tmp_path / f".out.tmp-{dead_pid}" / "shard-00000.arrow").write_bytes(b"half")
    (tmp_path / "b.txt").write_text("new")
    with pytest.raises(PipelineError, match="already exists"):
        build([tmp_path / "b.txt"], tmp_path / "out")
    assert doc_texts(tmp_path / "out") == ["kept"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "out"]
