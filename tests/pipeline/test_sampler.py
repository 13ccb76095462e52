"""The epoch index: whole-sample placement (`collate.sample_starts`) against a plain Python
reference, and the layout facts the loader relies on (rows, split samples, determinism), in
every layout; best-fit packing against its reference is in test_best_fit.py."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.collate import sample_starts
from pipeline.sampler import EpochIndex


def reference_sample_starts(lengths, seq_len):
    """Flat start of each sample (tokens + EOS), placed one after another: a sample that does not
    fit in what is left of the current row starts the next row; returns starts and the end."""
    starts, x = [], 0
    for n in lengths:
        used = x % seq_len
        if used and n + 1 > seq_len - used:
            x += seq_len - used
        starts.append(x)
        x += n + 1
    return np.array(starts + [x])


@pytest.mark.parametrize("seq_len", [2, 7, 64])
def test_sample_starts_equal_the_reference(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = rng.integers(0, 3 * seq_len, size=500).astype(np.int64)
    lengths[:5] = [0, seq_len - 1, seq_len, 0, 2 * seq_len]
    got = np.empty(lengths.size + 1, dtype=np.int64)
    sample_starts(lengths, seq_len, got)
    assert np.array_equal(got, reference_sample_starts(lengths, seq_len))


@pytest.mark.parametrize("layout", ["samples", "bestfit"])
def test_a_sample_that_fits_in_a_row_is_never_split(layout):
    starts = np.array([0, 5, 5, 17, 18, 21, 22], dtype=np.int64)  # lengths 5, 0, 12, 1, 3, 1
    index = EpochIndex.build(starts, seed=0, epoch=0, seq_len=6, layout=layout)
    lengths = np.diff(starts)[index.perm]
    first_row = index.cum[:-1] // 6
    last_row = (index.cum[:-1] + lengths) // 6  # the row of each sample's EOS
    fits = lengths + 1 <= 6
    assert np.array_equal(first_row[fits], last_row[fits])
    assert index.split_samples == 1 == np.count_nonzero(~fits)
    assert index.cum[np.flatnonzero(~fits)[0]] % 6 == 0  # a long sample starts a row
    assert index.total_rows == -(-index.stream_end // 6) and index.whole_samples
    if layout == "samples":
        assert index.stream_end == reference_sample_starts(lengths, 6)[-1]
    else:  # 22 tokens + 6 EOS: 12+EOS over rows 1-3, 5+EOS | 3+EOS, 1+EOS, 0+EOS, 1+EOS
        assert index.total_rows == 5 and index.stream_end == 5 * 6


@pytest.mark.parametrize("layout", ["samples", "bestfit"])
def test_whole_sample_index_is_a_function_of_seed_and_epoch_and_o_documents(layout):
    rng = np.random.default_rng(0)
    starts = np.concatenate([[0], np.cumsum(rng.integers(0, 90, size=1000))]).astype(np.int64)

    def build(seed, epoch):
        return EpochIndex.build(starts, seed, epoch, 32, layout)

    a = build(1, 0)
    assert np.array_equal(a.cum, build(1, 0).cum) and np.array_equal(a.perm, build(1, 0).perm)
    assert not np.array_equal(a.perm, build(1, 1).perm)
    assert np.array_equal(np.sort(a.perm), np.arange(1000))
    assert a.perm.shape == (1000,) and a.cum.shape == (1001,)
    lengths = np.diff(starts)
    assert a.split_samples == np.count_nonzero(lengths + 1 > 32)


def test_split_samples_in_the_other_layouts():
    starts = np.array([0, 5, 5, 17, 18], dtype=np.int64)  # lengths 5, 0, 12, 1
    padded = EpochIndex.build(starts, seed=0, epoch=0, seq_len=4, layout="rows")
    assert padded.split_samples == 2  # 5 + EOS and 12 + EOS exceed a row of 4
    stream = EpochIndex.build(starts, seed=0, epoch=0, seq_len=4, layout="stream")
    lengths = np.diff(starts)[stream.perm]
    crossing = stream.cum[:-1] // 4 != (stream.cum[:-1] + lengths) // 4
    assert stream.split_samples == np.count_nonzero(crossing) and not stream.whole_samples
