"""The numba collate kernels against a plain numpy reference of the packed and padded layouts."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import Loader, open_dataset
from pipeline.sampler import EpochIndex, epoch_permutation


def reference_packed(docs, perm, eos_id, pad_id, seq_len):
    """(rows, L) ids, labels and position ids built the slow, obvious way."""
    stream, positions = [], []
    for d in perm:
        doc = list(docs[d]) + [eos_id]
        stream += doc
        positions += list(range(len(doc)))
    stream, positions = np.array(stream), np.array(positions)
    n_rows = -(-len(stream) // seq_len)
    ids = np.full(n_rows * seq_len, pad_id)
    labels = np.full(n_rows * seq_len, -100)
    pos = np.zeros(n_rows * seq_len, dtype=np.int64)
    ids[: len(stream)] = stream
    labels[: len(stream)] = stream
    # Positions restart at each row start as well as each document start.
    doc_start = np.arange(len(stream)) - positions
    row_start = (np.arange(len(stream)) // seq_len) * seq_len
    pos[: len(stream)] = np.arange(len(stream)) - np.maximum(doc_start, row_start)
    return (
        ids.reshape(n_rows, seq_len),
        labels.reshape(n_rows, seq_len),
        pos.reshape(n_rows, seq_len),
    )


@pytest.mark.parametrize("ultra_low_mem", [False, True])
@pytest.mark.parametrize(
    "shard_tokens, batch_tokens",
    [(None, None), (997, None), (None, 64)],
    ids=["one-chunk", "many-shards", "many-record-batches"],
)
def test_packed_batches_equal_numpy_reference(
    tmp_path, monkeypatch, ultra_low_mem, shard_tokens, batch_tokens, synthetic_token_docs
):
    import json

    from pipeline import shards
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig

    if batch_tokens:  # a shard of many record batches: every batch reads from several chunks
        monkeypatch.setattr(shards, "BATCH_TOKENS", batch_tokens)

    docs = synthetic_token_docs(150, seed=5, median_len=30, vocab_size=256)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"input_ids": d.tolist()}) + "\n" for d in docs))
    cfg = BuildConfig(inputs=[src], out=tmp_path / "ds", text_field="input_ids")
    if shard_tokens:
        cfg.max_shard_tokens = shard_tokens
    build_dataset(cfg, progress=False)
    ds = open_dataset(tmp_path / "ds", ultra_low_mem=ultra_low_mem)
    if shard_tokens:
        assert len(list((tmp_path / "ds").glob("*.arrow"))) > 3
    if batch_tokens:
        import pyarrow as pa

        (shard,) = (tmp_path / "ds").glob("*.arrow")
        assert pa.ipc.open_file(shard).num_record_batches > 20
    seq_len, batch = 24, 5
    ids, labels, pos = reference_packed(
        docs, epoch_permutation(len(docs), 9, 0), ds.eos_id, ds.pad_id, seq_len
    )
    got = list(Loader(ds, batch, seq_len, seed=9))
    got_ids = np.concatenate([b["input_ids"].numpy() for b in got])[: len(ids)]
    got_labels = np.concatenate([b["labels"].numpy() for b in got])[: len(ids)]
    got_pos = np.concatenate([b["position_ids"].numpy() for b in got])[: len(ids)]
    assert np.array_equal(got_ids, ids)
    assert np.array_equal(got_labels, labels)
    assert np.array_equal(got_pos, pos)


def reference_rows(docs, perm, eos_id, pad_id, seq_len, whole_samples, prompt_lengths=None):
    """(rows, L) ids, labels, positions of whole-sample packing (whole_samples) or padding rows.

    Each document is followed by EOS; its first prompt_lengths[d] tokens have label -100.
    Whole samples: a sample that does not fit in what is left of the row starts the next row.
    Padding: every sample starts a row and its last row ends after its EOS. A sample longer than
    a row continues on the next rows; positions restart at each sample and each row.
    """
    rows, row = [], []  # row: (id, label, position) triples

    def close():
        if row:
            rows.append(row + [(pad_id, -100, 0)] * (seq_len - len(row)))
            row.clear()

    for d in perm:
        tokens = list(docs[d]) + [eos_id]
        masked = 0 if prompt_lengths is None else prompt_lengths[d]
        if not whole_samples or len(tokens) > seq_len - len(row):
            close()
        run = 0
        for j, t in enumerate(tokens):
            if len(row) == seq_len:
                close()
                run = 0
            row.append((t, -100 if j < masked else t, run))
            run += 1
    close()
    table = np.array(rows)  # (rows, L, 3)
    return table[..., 0], table[..., 1], table[..., 2]


def random_prompt_lengths(docs, seed):
    """(num_docs,) prompt lengths in [0, len], with empty prompts and empty responses."""
    rng = np.random.default_rng(seed)
    lengths = np.array([len(d) for d in docs])
    prompts = rng.integers(0, lengths + 1)
    prompts[::7] = 0
    prompts[3::7] = lengths[3::7]
    return prompts.astype(np.int64)


@pytest.mark.parametrize("ultra_low_mem", [False, True])
@pytest.mark.parametrize(
    "packing, masked", [(True, True), (False, True), (False, False)], ids=["samples", "rows", "eos"]
)
def test_sft_and_padding_batches_equal_numpy_reference(
    make_dataset, synthetic_token_docs, ultra_low_mem, packing, masked
):
    docs = synthetic_token_docs(120, 0, 30, 256)
    ds = open_dataset(make_dataset(num_docs=120, seed=0, median_len=30), ultra_low_mem)
    prompts = random_prompt_lengths(docs, 1) if masked else None
    if masked:
        ds.prompt_lengths = prompts
    seq_len, batch = 32, 5
    assert max(len(d) for d in docs) + 1 > 2 * seq_len  # samples over two rows and more
    assert any(len(d) + 1 == seq_len for d in docs)  # a sample that exactly fills a row
    assert any(len(d) == seq_len for d in docs)  # padding: its EOS alone on a second row
    perm = epoch_permutation(len(docs), 9, 0)
    want = reference_rows(docs, perm, ds.eos_id, ds.pad_id, seq_len, packing, prompts)
    layout = "samples" if packing else None  # the reference places samples in order
    loader = Loader(ds, batch, seq_len, seed=9, packing=packing, layout=layout)
    got = list(loader)
    pad = {"input_ids": ds.pad_id, "labels": -100, "position_ids": 0}
    for name, expected in zip(pad, want, strict=True):
        rows = np.concatenate([b[name].numpy() for b in got])
        assert np.array_equal(rows[: len(expected)], expected), name
        assert len(rows) - len(expected) < batch and (rows[len(expected) :] == pad[name]).all()
    for b in got:
        labels = b["labels"]
        assert b.num_tokens == int((labels != -100).sum())
        assert b.num_loss_tokens == int((labels[:, 1:] != -100).sum())
    assert loader.split_samples == sum(len(d) + 1 > seq_len for d in docs)


def test_epoch_index_rows_match_document_lengths():
    starts = np.array([0, 5, 5, 17, 18], dtype=np.int64)  # lengths 5, 0, 12, 1
    packed = EpochIndex.build(starts, seed=0, epoch=0, seq_len=4, layout="stream")
    assert packed.stream_end == 18 + 4 and packed.total_rows == 6
    padded = EpochIndex.build(starts, seed=0, epoch=0, seq_len=4, layout="rows")
    # ceil((len + 1) / 4) rows per document: the EOS after each document takes a position.
    assert padded.total_rows == 2 + 1 + 4 + 1 and padded.split_samples == 2


def test_permutation_is_a_function_of_seed_and_epoch():
    a = epoch_permutation(1000, seed=1, epoch=0)
    assert np.array_equal(np.sort(a), np.arange(1000))
    assert np.array_equal(a, epoch_permutation(1000, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_permutation(1000, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_permutation(1000, seed=2, epoch=0))
