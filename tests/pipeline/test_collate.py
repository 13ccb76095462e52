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
    return ids.reshape(n_rows, seq_len), labels.reshape(n_rows, seq_len), pos.reshape(n_rows, seq_len)


@pytest.mark.parametrize("ultra_low_mem", [False, True])
@pytest.mark.parametrize("shard_tokens", [None, 997])
def test_packed_batches_equal_numpy_reference(tmp_path, ultra_low_mem, shard_tokens, synthetic_token_docs):
    import json

    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig

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
    seq_len, batch = 24, 5
    ids, labels, pos = reference_packed(docs, epoch_permutation(len(docs), 9, 0), ds.eos_id, ds.pad_id, seq_len)
    got = list(Loader(ds, batch, seq_len, seed=9))
    got_ids = np.concatenate([b["input_ids"].numpy() for b in got])[: len(ids)]
    got_labels = np.concatenate([b["labels"].numpy() for b in got])[: len(ids)]
    got_pos = np.concatenate([b["position_ids"].numpy() for b in got])[: len(ids)]
    assert np.array_equal(got_ids, ids)
    assert np.array_equal(got_labels, labels)
    assert np.array_equal(got_pos, pos)


def test_epoch_index_rows_match_document_lengths():
    starts = np.array([0, 5, 5, 17, 18], dtype=np.int64)  # lengths 5, 0, 12, 1
    packed = EpochIndex.build(starts, seed=0, epoch=0, seq_len=4, packing=True)
    assert packed.total_stream_tokens == 18 + 4 and packed.total_rows == 6
    padded = EpochIndex.build(starts, seed=0, epoch=0, seq_len=4, packing=False)
    assert padded.total_rows == 2 + 0 + 3 + 1 and padded.total_stream_tokens == 18


def test_permutation_is_a_function_of_seed_and_epoch():
    a = epoch_permutation(1000, seed=1, epoch=0)
    assert np.array_equal(np.sort(a), np.arange(1000))
    assert np.array_equal(a, epoch_permutation(1000, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_permutation(1000, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_permutation(1000, seed=2, epoch=0))
