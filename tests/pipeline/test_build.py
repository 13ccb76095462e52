"""`pipeline build`: every input format gives the same tokens; bad input fails in one line and
writes nothing; the output appears only when complete, replaces only a dataset this project
built, and one build at a time holds it."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lowmem_core.locks import FolderLock
from pipeline import ConfigError, PipelineError, open_dataset, shards, sources
from pipeline import build as build_module
from pipeline.build import build_dataset
from pipeline.config import BuildConfig

DOCS = ["Hello world.", "Zweites Dokument — mit Umlauten: äöü.", "third\nwith a newline", "x"]
ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


def build(inputs, out, **kwargs):
    return build_dataset(BuildConfig(inputs=list(inputs), out=out, **kwargs), progress=False)


def doc_texts(path) -> list[str]:
    ds = open_dataset(path)
    return [bytes(ds[i].astype(np.uint8)).decode("utf-8") for i in range(len(ds))]


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def snapshot(root) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


def cli_build(*args, cwd=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "build", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=120,
        **kwargs,
    )


def test_txt_jsonl_parquet_and_datasets_folder_give_the_same_documents(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("\n\n".join(DOCS) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress((tmp_path / "a.jsonl").read_bytes()))
    (tmp_path / "a.json").write_text(json.dumps([{"text": d} for d in DOCS]))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "hf"))
    for name in ("a.txt", "a.jsonl", "a.jsonl.gz", "a.json", "a.parquet", "hf"):
        out = tmp_path / f"out-{name}"
        report = build([tmp_path / name], out)
        assert report.num_documents == 4
        assert report.num_tokens == sum(len(d.encode()) for d in DOCS)
        assert doc_texts(out) == DOCS, name


def write_input(kind: str, folder: Path, docs: list[str]) -> Path:
    """`docs` as one input of the registered format `kind`, in `folder`."""
    import datasets

    if kind == "txt":
        path = folder / "a.txt"
        path.write_text("\n\n".join(docs) + "\n")
    elif kind == "json":
        path = folder / "a.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    elif kind == "parquet":
        path = folder / "a.parquet"
        pq.write_table(pa.table({"text": docs}), path)
    elif kind == "datasets":
        path = folder / "hf"
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(path))
    else:
        raise AssertionError(f"no writer for the input format {kind!r}; add one here")
    return path


@pytest.mark.parametrize("kind", list(sources.FORMATS))
def test_every_registered_format_round_trips_through_a_build(tmp_path, kind):
    path = write_input(kind, tmp_path, DOCS)
    assert [s.kind for s in sources.resolve_inputs([path])] == [kind]
    report = build([path], tmp_path / "out")
    assert (report.num_documents, report.num_tokens) == (4, sum(len(d.encode()) for d in DOCS))
    assert doc_texts(tmp_path / "out") == DOCS


def test_split_lines_and_the_one_doc_per_line_alias(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n")
    build([tmp_path / "a.txt"], tmp_path / "out", split="lines")
    assert doc_texts(tmp_path / "out") == ["one", "two", "three"]
    build([tmp_path / "a.txt"], tmp_path / "alias", one_doc_per_line=True)
    assert doc_texts(tmp_path / "alias") == ["one", "two", "three"]
    build([tmp_path / "a.txt"], tmp_path / "blocks")
    assert doc_texts(tmp_path / "blocks") == ["one\ntwo", "three"]


def test_edge_whitespace_is_kept_unless_strip_is_asked(tmp_path):
    docs = ["\u00a0\u00a0indented", "\u3000全角\u3000", "plain "]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n")
    for name in ("a.jsonl", "a.txt"):
        build([tmp_path / name], tmp_path / f"keep-{name}")
        assert doc_texts(tmp_path / f"keep-{name}") == docs
        build([tmp_path / name], tmp_path / f"strip-{name}", strip=True)
        assert doc_texts(tmp_path / f"strip-{name}") == [d.strip() for d in docs]


def test_records_without_text_are_skipped_counted_and_reported(tmp_path):
    rows = [{"text": "a"}, {"text": ""}, {"text": None}, {"id": 4}, {"text": "b"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = build([tmp_path / "a.jsonl"], tmp_path / "out")
    assert doc_texts(tmp_path / "out") == ["a", "b"]
    assert report.skipped == {str(tmp_path / "a.jsonl"): (1, 2)}
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["build"]["skipped_records"] == 3
    result = cli_build(tmp_path / "a.jsonl", "--out", tmp_path / "cli")
    assert result.returncode == 0, result.stderr
    assert (
        f"skipped 3 records of {tmp_path / 'a.jsonl'} without text (1 empty or whitespace "
        "only, 2 null or without the field 'text')"
    ) in result.stdout


def test_many_files_and_globs_in_parallel_give_the_same_dataset_as_one_thread(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 2000)  # many chunks per file
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "\u00e9t\u00e9", "\u6f22\u5b57"]
    expected = []
    for i in range(6):
        docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(150)]
        expected += docs
        data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
        (tmp_path / f"part-{i}.jsonl.gz").write_bytes(gzip.compress(data))
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    seen = set()
    real = build_module.encode_chunk

    def spy(chunk, **kw):  # each thread tokenises on one core: the tokenizers pool is off
        seen.add(os.environ.get("TOKENIZERS_PARALLELISM"))
        return real(chunk, **kw)

    monkeypatch.setattr(build_module, "encode_chunk", spy)
    one = build([tmp_path / "part-*.jsonl.gz"], tmp_path / "one", num_proc=1)
    four = build(
        [tmp_path / "part-*.jsonl.gz"], tmp_path / "four", num_proc=4, max_shard_tokens=5000
    )
    assert one.num_documents == four.num_documents == 900
    assert doc_texts(tmp_path / "one") == doc_texts(tmp_path / "four") == expected
    assert four.num_shards > 1
    assert seen == {"false"} and "TOKENIZERS_PARALLELISM" not in os.environ


def test_a_huge_document_is_one_document_built_in_bounded_pieces(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(sources, "PIECE_CHARS", 1000)
    huge = "\n".join(f"line {i}: caf\u00e9 \u6f22\u5b57" for i in range(3000))
    record = "y " * 3000
    (tmp_path / "a.txt").write_text(f"before\n\n{huge}\n\nafter\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": record}) + "\n" + json.dumps({"text": "z"})
    )
    encoded = []
    real = build_module.encode_chunk

    def spy(chunk, **kw):
        encoded.append(sum(len(t.encode()) for t in chunk.docs.to_pylist() if t))
        return real(chunk, **kw)

    monkeypatch.setattr(build_module, "encode_chunk", spy)
    with caplog.at_level("INFO", logger="pipeline.build"):
        report = build(
            [tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out", max_shard_tokens=4000
        )
    assert doc_texts(tmp_path / "out") == ["before", huge, "after", record, "z"]
    assert report.documents_in_pieces == 2
    assert "tokenised 2 documents longer than" in caplog.text
    assert max(encoded[:-1]) <= 3 * 2 * 1000  # a chunk of .txt: two chunks of text at most


def test_shards_are_written_in_bounded_record_batches(tmp_path, monkeypatch):
    import pyarrow.ipc as ipc

    monkeypatch.setattr(shards, "BATCH_TOKENS", 100)
    monkeypatch.setattr(shards, "_BATCH_DOCS", 7)
    docs = [f"doc {i} " * (i % 9 + 1) for i in range(200)] + ["x" * 500]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    build([tmp_path / "a.jsonl"], tmp_path / "out", max_shard_tokens=3000)
    assert doc_texts(tmp_path / "out") == docs
    assert open_dataset(tmp_path / "out", verify=True).num_tokens == sum(map(len, docs))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert len(index["files"]) > 1
    for entry in index["files"]:
        with pa.memory_map(str(tmp_path / "out" / entry["name"])) as mm:
            reader = ipc.open_file(mm)
            rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
            assert sum(rows) == entry["num_documents"] and max(rows) <= 7 and len(rows) > 1


def test_index_records_counts_dtype_tokenizer_and_checksums(sample_dataset_dir):
    index = json.loads((sample_dataset_dir / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 259
    assert index["tokenizer"] == {
        "kind": "byte",
        "id": "byte-v1",
        "source": None,
        "bos_id": 256,
        "eos_id": 257,
        "pad_id": 258,
        "documents_start_with_bos": False,
    }
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


def test_an_id_past_the_vocabulary_count_widens_the_dtype_instead_of_wrapping(tmp_path):
    """A sparse vocabulary: 1001 entries (get_vocab_size) but one of them has id 70000."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {
        "</s>": 0,
        "<pad>": 1,
        "[UNK]": 2,
        **{f"w{i}": i + 3 for i in range(997)},
        "big": 70_000,
    }
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == 1001
    (tmp_path / "a.txt").write_text("w1 big w2\n")
    build([tmp_path / "a.txt"], tmp_path / "out", tokenizer=str(tmp_path / "tok.json"))
    ds = open_dataset(tmp_path / "out")
    assert ds.token_dtype == np.uint32 and ds.vocab_size == 70_001
    assert ds[0].tolist() == [4, 70_000, 5]


def test_an_id_beyond_the_vocabulary_is_one_error_and_nothing_is_written(tmp_path, monkeypatch):
    _word_tokenizer(tmp_path / "tok.json", 1000)
    (tmp_path / "a.txt").write_text("w1 w900\n")
    real = build_module.load_tokenizer

    def shrunk(*args):
        tok = real(*args)
        tok.vocab_size = 500
        return tok

    monkeypatch.setattr(build_module, "load_tokenizer", shrunk)
    with pytest.raises(
        PipelineError, match=r"produced token id 903 but its vocabulary has 500 ids"
    ):
        build([tmp_path / "a.txt"], tmp_path / "out", tokenizer=str(tmp_path / "tok.json"))
    assert listing(tmp_path) == ["a.txt", "tok.json"]


def test_failed_build_leaves_no_dataset_and_no_temp_folder(tmp_path):
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(PipelineError, match="not valid JSON Lines"):
        build([tmp_path / "good.jsonl", tmp_path / "bad.jsonl"], tmp_path / "new" / "out")
    assert listing(tmp_path) == ["bad.jsonl", "good.jsonl"]


def test_overwrite_replaces_a_dataset_only_after_the_new_build_is_complete(tmp_path):
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
    assert listing(tmp_path) == ["a.txt", "b.txt", "bad.txt", "out"]


def _user_folder(d):
    (d / "out").mkdir()
    (d / "out" / "notes.md").write_text("my notes")


def _input_inside(d):
    (d / "out").mkdir()
    (d / "out" / "index.json").write_text("{}")
    (d / "out" / "good.txt").write_text("text")


def _training_output(d):
    build([d / "good.txt"], d / "out")
    (d / "out" / "train_latest_state").mkdir()


def _weights_beside_a_dataset(d):
    build([d / "good.txt"], d / "out")
    (d / "out" / "model.safetensors").write_bytes(b"weights")


def _damaged_index(d):
    build([d / "good.txt"], d / "out")
    (d / "out" / "index.json").write_text('{"format": "lowmem-tokens/1"}')


@pytest.mark.parametrize(
    "setup, inputs, message",
    [
        (
            _user_folder,
            ["good.txt"],
            r"output .*out already exists and is not a dataset built by `pipeline build` "
            r"\(it holds notes\.md\); choose another --out",
        ),
        (
            _input_inside,
            ["out/good.txt"],
            r"output .*out holds the input .*out/good\.txt; choose another --out",
        ),
        (
            _training_output,
            ["good.txt"],
            r"output .*out is a training output folder \(it holds train_latest_state\); "
            r"choose another --out",
        ),
        (
            _weights_beside_a_dataset,
            ["good.txt"],
            r"training output folder \(it holds model\.safetensors\)",
        ),
        (
            _damaged_index,
            ["good.txt"],
            r"holds an index\.json that does not validate, so it is not replaced",
        ),
        (
            lambda d: (d / "out").write_text("a file"),
            ["good.txt"],
            r"output .*out is a file; give --out a folder",
        ),
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_overwrite_never_replaces_what_is_not_a_dataset_of_ours(
    tmp_path, setup, inputs, message, overwrite
):
    (tmp_path / "good.txt").write_text("text")
    setup(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(PipelineError, match=message) as info:
        build([tmp_path / i for i in inputs], tmp_path / "out", overwrite=overwrite)
    assert "--overwrite" not in str(info.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("out", [".", ".."])
def test_out_that_is_the_current_folder_or_holds_it_is_refused(tmp_path, monkeypatch, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "good.txt").write_text("text")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(
            PipelineError,
            match=rf"--out {out} is the current folder or holds it; give a new folder",
        ):
            build([work / "good.txt"], out, overwrite=overwrite)
    assert snapshot(tmp_path) == before


def test_a_second_build_to_the_same_out_fails_at_once_in_one_line(tmp_path):
    (tmp_path / "good.txt").write_text("text")
    with FolderLock(tmp_path / ".out.lowmem-lock", "held by the test", remove_on_release=True):
        result = cli_build(tmp_path / "good.txt", "--out", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: output {tmp_path / 'out'} is in use by another process "
            f"(pid {os.getpid()}); wait"
        )
    )
    assert listing(tmp_path) == ["good.txt"]
    build([tmp_path / "good.txt"], tmp_path / "out")  # the lock is free again: the build runs
    assert listing(tmp_path) == ["good.txt", "out"]


def test_a_build_killed_with_sigkill_leaves_no_lock_and_its_leftovers_are_cleaned(tmp_path):
    (tmp_path / "good.txt").write_text("text")
    # A build mid-way: it holds the lock and has written part of its temp folder.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import os, sys, time
        from lowmem_core.locks import FolderLock
        FolderLock({str(tmp_path / ".out.lowmem-lock")!r}, "x", remove_on_release=True).acquire()
        tmp = {str(tmp_path)!r} + f"/.out.lowmem-tmp-{{os.getpid()}}"
        os.mkdir(tmp)
        open(tmp + "/tokens-00000.raw", "wb").write(b"half")
        print("ready", flush=True)
        time.sleep(60)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert holder.stdout.readline().strip() == "ready"
    with pytest.raises(ConfigError, match="is in use by another process"):
        build([tmp_path / "good.txt"], tmp_path / "out")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    build([tmp_path / "good.txt"], tmp_path / "out")
    assert listing(tmp_path) == ["good.txt", "out"]


def test_leftovers_of_killed_builds_are_cleaned_and_a_moved_aside_dataset_restored(tmp_path):
    (tmp_path / "a.txt").write_text("kept")
    build([tmp_path / "a.txt"], tmp_path / "out")
    build([tmp_path / "a.txt"], tmp_path / "out.v2")
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    # A killed --overwrite build: the old dataset moved aside, the new one never renamed in.
    os.rename(tmp_path / "out", tmp_path / f".out.lowmem-old-{dead_pid}")
    (tmp_path / f".out.lowmem-tmp-{dead_pid}").mkdir()
    (tmp_path / f".out.lowmem-tmp-{dead_pid}" / "shard-00000.arrow").write_bytes(b"half")
    # Another dataset's leftovers, and user folders whose names look alike, are not ours.
    os.rename(tmp_path / "out.v2", tmp_path / f".out.v2.lowmem-old-{dead_pid}")
    (tmp_path / f".out.v2.old-{dead_pid}").mkdir()
    (tmp_path / ".out.lowmem-tmp-backup").mkdir()
    (tmp_path / "b.txt").write_text("new")
    with pytest.raises(PipelineError, match="already exists"):
        build([tmp_path / "b.txt"], tmp_path / "out")
    assert doc_texts(tmp_path / "out") == ["kept"]
    assert listing(tmp_path) == sorted(
        [
            "a.txt",
            "b.txt",
            "out",
            f".out.v2.lowmem-old-{dead_pid}",
            f".out.v2.old-{dead_pid}",
            ".out.lowmem-tmp-backup",
        ]
    )


def test_a_disk_that_fills_up_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "big.txt").write_text("\n\n".join(f"document {i} " * 50 for i in range(2000)))

    def limit_file_size():  # a file may not grow past 200 kB: writes fail as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = cli_build(
        tmp_path / "big.txt", "--out", tmp_path / "data" / "out", preexec_fn=limit_file_size
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the disk holding {tmp_path / 'data'} filled up after ")
    assert last.endswith("nothing was written: free space or choose another --out")
    assert listing(tmp_path) == ["big.txt"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: [d / "missing.txt"], "does not exist"),
        (lambda d: [_write(d / "empty.txt", b"")], "is empty"),
        (lambda d: [_write(d / "blank.txt", b"\n\n  \n")], "no documents with text"),
        (lambda d: [_write(d / "bin.txt", bytes(range(256)) * 4)], "is not UTF-8 text|NUL bytes"),
        (lambda d: [_write(d / "a.jsonl", b'{"body": "x"}\n')], "has no field 'text'"),
        (lambda d: [_write(d / "a.jsonl", b'{"text": 5}\n')], "holds int64, expected text"),
        (
            lambda d: [_write(d / "a.jsonl", b'{"text": "a"}\n{"text": 5}\n')],
            "holds one type in some records",
        ),
        (lambda d: [_write(d / "a.jsonl", b'{"ids": [1, null]}\n')], "hold nulls"),
        (lambda d: [_write(d / "a.csv", b"text\nx\n")], "unknown input type .csv"),
        (lambda d: [_write(d / "a.parquet.gz", b"x")], "unknown input type .parquet.gz"),
        (lambda d: [_write(d / "a.parquet", b"not parquet")], "not a readable Parquet file"),
        (lambda d: [], "no inputs given"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, setup, message):
    inputs = setup(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    field = {"text_field": "ids"} if "hold nulls" in message else {}
    with pytest.raises(PipelineError, match=message):
        build(inputs, tmp_path / "out", **field)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_cli_prints_one_line_and_exits_non_zero(tmp_path):
    result = cli_build(tmp_path / "nope.txt", "--out", tmp_path / "o")
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"error: input {tmp_path / 'nope.txt'} does not exist; check the path"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_20_mb_single_document_builds_in_bounded_memory(tmp_path):
    """One 20 MB document through a byte-level BPE tokenizer: its private memory stays far below
    the 2 GB that encoding it whole takes (measured before pieces: 1996 MiB), and its tokens
    equal those of the whole document (pieces are cut at line breaks)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from pipeline.sample_corpus import generate_documents

    docs = generate_documents(400, seed=3)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        docs, trainers.BpeTrainer(vocab_size=2000, special_tokens=["</s>"], show_progress=False)
    )
    tok.save(str(tmp_path / "tok.json"))
    text = "\n".join(docs)
    with (tmp_path / "one.txt").open("w") as fh:
        for _ in range(20_000_000 // len(text)):
            fh.write(text.replace("\n\n", "\n") + "\n")
    script = textwrap.dedent(f"""
        from pipeline.build import build_dataset
        from pipeline.config import BuildConfig
        r = build_dataset(BuildConfig(inputs=[{str(tmp_path / "one.txt")!r}],
                          out={str(tmp_path / "out")!r}, tokenizer={str(tmp_path / "tok.json")!r},
                          num_proc=2), progress=False)
        print(r.num_documents, r.num_tokens, r.documents_in_pieces)
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV
    )
    peak_kib = 0  # sampled from outside: the child's GIL cannot delay the readings
    while child.poll() is None:
        with contextlib.suppress(OSError):  # gone between poll() and the read
            status = Path(f"/proc/{child.pid}/status").read_text()
            if "RssAnon:" in status:  # absent once the child is a zombie
                peak_kib = max(peak_kib, int(status.split("RssAnon:")[1].split()[0]))
        time.sleep(0.005)
    docs_built, tokens, pieces = map(int, child.stdout.read().split())
    whole = len(tok.encode((tmp_path / "one.txt").read_text().removesuffix("\n")).ids)
    assert (docs_built, tokens, pieces) == (1, whole, 1)
    assert peak_kib < 600 * 1024, f"peak anonymous memory {peak_kib >> 10} MiB"
