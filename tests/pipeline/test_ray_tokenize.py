"""`pipeline tokenize-distributed`: inputs tokenised by Ray workers into Parquet shards, then
ingested by `pipeline build --text-field input_ids`, give the dataset a local build gives, token
for token and in order; a worker's bad input fails in one line; without Ray, one line names the
extra."""

from __future__ import annotations

import gzip
import json
import logging
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ConfigError, PipelineError, open_dataset, sources
from pipeline.__main__ import main
from pipeline.build import build_dataset
from pipeline.config import BuildConfig, TokenizeDistributedConfig
from pipeline.ray_tokenize import tokenize_distributed
from pipeline.sample_corpus import generate_documents


@pytest.fixture(scope="module")
def local_ray():
    """A two-CPU Ray started in this process, as `tokenize-distributed` starts one without
    --address (it then uses this one and leaves it running)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> str:
    """A tiny byte-level BPE trained on the sample corpus that puts BOS <s> before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(generate_documents(200, seed=3), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def corpus_inputs(tmp_path_factory) -> list:
    """The sample corpus spread over JSON Lines (one with records without text), gzipped JSON
    Lines, Parquet and .txt (one document long enough to be read and tokenised in pieces)."""
    folder = tmp_path_factory.mktemp("corpus")
    docs = generate_documents(240, seed=11)
    jsonl = folder / "a.jsonl"
    records = [{"text": d} for d in docs[:80]]
    records[5:5] = [{"text": "  "}, {"text": None}, {"id": 1}]
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    gz = folder / "b.jsonl.gz"
    gz.write_bytes(
        gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs[80:160]).encode())
    )
    parquet = folder / "c.parquet"
    pq.write_table(pa.table({"text": docs[160:220]}), parquet, row_group_size=16)
    long_doc = "\n".join(docs * 12)
    assert len(long_doc) > sources.PIECE_CHARS * 1.5
    txt = folder / "d.txt"
    txt.write_text("\n\n".join([*docs[220:230], long_doc, *docs[230:]]) + "\n", encoding="utf-8")
    return [jsonl, gz, parquet, txt]


def documents(path) -> list[np.ndarray]:
    ds = open_dataset(path)
    return [np.asarray(ds[i]) for i in range(len(ds))]


@pytest.mark.slow
def test_distributed_then_ingested_equals_a_local_build(
    local_ray, tokenizer_json, corpus_inputs, tmp_path
):
    local = build_dataset(
        BuildConfig(inputs=corpus_inputs, out=tmp_path / "local", tokenizer=tokenizer_json),
        progress=False,
    )
    shards = tmp_path / "shards"
    report = tokenize_distributed(
        TokenizeDistributedConfig(
            inputs=corpus_inputs, out=shards, tokenizer=tokenizer_json, num_workers=2
        ),
        progress=False,
    )
    assert (report.num_documents, report.num_tokens) == (local.num_documents, local.num_tokens)
    assert report.skipped == local.skipped and report.documents_in_pieces == 1
    names = sorted(p.name for p in shards.iterdir())
    assert names == [f"tokens-{i:06d}.parquet" for i in range(4)]
    keys = pa.concat_tables(pq.read_table(shards / n, columns=["source", "row"]) for n in names)
    order = np.lexsort((keys["row"].to_numpy(), keys["source"].to_numpy()))
    assert np.array_equal(order, np.arange(keys.num_rows))  # name order is key order

    ingested = tmp_path / "ingested"
    build_dataset(
        BuildConfig(
            inputs=[shards], out=ingested, tokenizer=tokenizer_json, text_field="input_ids"
        ),
        progress=False,
    )
    expected, got = documents(tmp_path / "local"), documents(ingested)
    assert len(got) == len(expected) == local.num_documents
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert all(doc[0] == 0 for doc in got)  # each document starts with BOS <s>, none ends in </s>
    for name in ("bos_id", "eos_id", "pad_id", "token_dtype", "fingerprint"):
        assert getattr(open_dataset(ingested), name) == getattr(
            open_dataset(tmp_path / "local"), name
        )


@pytest.mark.slow
def test_a_bad_input_in_a_worker_fails_in_one_line_and_writes_nothing(
    local_ray, corpus_inputs, tmp_path
):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n')
    out = tmp_path / "shards"
    with pytest.raises(PipelineError) as info:
        tokenize_distributed(
            TokenizeDistributedConfig(inputs=[corpus_inputs[0], bad], out=out), progress=False
        )
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and "--text-field" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_without_ray_one_line_names_the_extra(monkeypatch, capsys, corpus_inputs, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    out = tmp_path / "shards"
    code = main(["tokenize-distributed", str(corpus_inputs[0]), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err
    assert "pip install 'lowmem-pipeline[ray]'" in err and "tokenize-distributed" in err
    assert not out.exists()


def test_an_output_folder_with_files_is_refused_before_ray_starts(corpus_inputs, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(PipelineError, match="not an empty folder"):
        tokenize_distributed(TokenizeDistributedConfig(inputs=corpus_inputs, out=tmp_path))
    with pytest.raises(ConfigError, match="--num-workers must be >= 1"):
        TokenizeDistributedConfig(inputs=corpus_inputs, num_workers=0)


@pytest.mark.parametrize("address", ["garbage", "http://head:6379", "head:port", "ray://head"])
def test_an_address_that_is_no_cluster_address_is_refused_before_ray_starts(
    corpus_inputs, tmp_path, address
):
    out = tmp_path / "shards"
    cfg = TokenizeDistributedConfig(inputs=corpus_inputs, out=out, address=address)
    with pytest.raises(PipelineError, match="is not a Ray cluster address; give host:port"):
        tokenize_distributed(cfg, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "ray://head-node:10001", "auto", "local"])
def test_cluster_addresses_pass_the_check(address):
    from pipeline.ray_tokenize import check_address

    check_address(address)


@pytest.mark.slow
def test_leftovers_of_a_killed_run_are_removed(local_ray, corpus_inputs, tmp_path):
    out = tmp_path / "shards"
    leftover = tmp_path / ".shards.lowmem-tmp-4194301"  # a run killed with -9 left it
    leftover.mkdir()
    (leftover / "00000.parquet").write_bytes(b"half")
    tokenize_distributed(TokenizeDistributedConfig(inputs=corpus_inputs[:1], out=out), False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]
