"""Best-fit packing of whole samples (pipeline/sampler.py, layout `bestfit`): the numba kernels
against a plain numpy reference, and the placement facts (every sample once, whole in a row when
it fits, less padding than next-fit). The loader's contract on it (exactly once across ranks,
rows independent of world size, resume at any row, earlier states) is in test_loader_sft.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import Loader, open_dataset, sampler
from pipeline.sampler import EpochIndex, best_fit_key, epoch_permutation, unit_keys

MASK64 = (1 << 64) - 1
REPO = Path(__file__).resolve().parents[2]


def mix(x: int) -> int:
    """splitmix64's finaliser on a Python int (the kernel's `_mix`)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def reference_keys(key: int, window: int, count: int) -> np.ndarray:
    base = mix((key + window * 0x9E3779B97F4A7C15) & MASK64)
    return np.array([mix((base + u) & MASK64) for u in range(count)], dtype=np.uint64)


def reference_best_fit(lengths, perm, seq_len, key, window):
    """(documents in row order, their flat starts + the end, samples longer than a row):
    per window of `perm`, samples (tokens + EOS) longest first (ties in permutation order) into
    the open row with the least room that fits, among equal rooms the one that got its room
    last; a new unit (one row, or the rows of a sample longer than a row) when none fits. The
    window's units follow in the order of their keys, each unit's samples in placement order."""
    order_out, starts, x = [], [], 0
    for w, lo in enumerate(range(0, len(perm), window)):
        ids = perm[lo : lo + window]
        sizes = lengths[ids] + 1
        units = []  # [room, stamp, [sample index in ids]]
        stamp = 0
        for j in np.argsort(-sizes, kind="stable"):
            size, stamp = int(sizes[j]), stamp + 1
            fits = [u for u in units if u[0] >= size] if size < seq_len else []
            if fits:
                unit = min(fits, key=lambda u: (u[0], -u[1]))
                unit[0] -= size
            else:
                unit = [(seq_len - size % seq_len) % seq_len, 0, []]
                units.append(unit)
            unit[1] = stamp
            unit[2].append(j)
        keys = reference_keys(int(key), w, len(units))
        for u in np.argsort(keys, kind="stable"):
            at = x
            for j in units[u][2]:
                order_out.append(ids[j])
                starts.append(at)
                at += int(sizes[j])
            x += -(-(at - x) // seq_len) * seq_len
    split = int(np.count_nonzero(lengths + 1 > seq_len))
    return np.array(order_out), np.array(starts + [x]), split


def lognormal_starts(n: int, seed: int, cap: int) -> np.ndarray:
    """Document starts of n long-tailed lengths (most short, a few past several rows)."""
    lengths = np.minimum(np.random.default_rng(seed).lognormal(3.0, 1.0, n).astype(np.int64), cap)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def test_unit_keys_equal_the_reference():
    key = best_fit_key(5, 2)
    got = np.empty(300, dtype=np.uint64)
    unit_keys(key, 7, 300, got)
    assert np.array_equal(got, reference_keys(int(key), 7, 300))
    assert len(set(got.tolist())) == 300


@pytest.mark.parametrize("seq_len", [2, 7, 64])
def test_best_fit_index_equals_the_reference(monkeypatch, seq_len):
    monkeypatch.setattr(sampler, "BEST_FIT_WINDOW", 50)  # 1003 samples: 21 windows
    monkeypatch.setattr(sampler, "_LAYOUT_SLICE", 120)  # slices of two windows
    rng = np.random.default_rng(seq_len)
    lengths = rng.integers(0, 3 * seq_len, size=1003)
    lengths[:4] = [0, seq_len - 1, seq_len, 2 * seq_len]  # one short, exact, over, two rows over
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    index = EpochIndex.build(starts, 4, 1, seq_len, "bestfit")
    perm = epoch_permutation(1003, 4, 1)
    want_perm, want_cum, want_split = reference_best_fit(
        lengths, perm, seq_len, best_fit_key(4, 1), 50
    )
    assert np.array_equal(index.perm, want_perm) and np.array_equal(index.cum, want_cum)
    assert index.split_samples == want_split
    assert index.stream_end == want_cum[-1] and index.total_rows == want_cum[-1] // seq_len


@pytest.mark.parametrize("seq_len", [5, 32])
def test_every_sample_once_and_whole_in_a_row_when_it_fits(monkeypatch, seq_len):
    monkeypatch.setattr(sampler, "BEST_FIT_WINDOW", 64)
    starts = lognormal_starts(2000, seq_len, 4 * seq_len)
    index = EpochIndex.build(starts, 0, 0, seq_len, "bestfit")
    assert np.array_equal(np.sort(index.perm), np.arange(2000))
    sizes = np.diff(starts)[index.perm] + 1
    first, end = index.cum[:-1], index.cum[:-1] + sizes
    assert (first[1:] >= end[:-1]).all()  # in flat order, none overlapping
    fits = sizes <= seq_len
    assert np.array_equal(first[fits] // seq_len, (end[fits] - 1) // seq_len)
    assert (first[~fits] % seq_len == 0).all()  # a longer sample starts a row
    assert index.split_samples == np.count_nonzero(~fits)
    # Each window of 64 samples holds its own rows: they start a row and end with one.
    window_starts = index.cum[:-1][::64]
    assert (window_starts % seq_len == 0).all()


@pytest.mark.parametrize("seq_len", [64, 256])
def test_padding_is_less_than_next_fit_on_a_long_tailed_dataset(seq_len):
    starts = lognormal_starts(20_000, 3, 8 * seq_len)
    lengths = np.diff(starts)
    useful = int(starts[-1]) + lengths.size
    old = EpochIndex.build(starts, 0, 0, seq_len, "samples")
    new = EpochIndex.build(starts, 0, 0, seq_len, "bestfit")
    perm = epoch_permutation(lengths.size, 0, 0)
    _, want_cum, _ = reference_best_fit(
        lengths, perm, seq_len, best_fit_key(0, 0), sampler.BEST_FIT_WINDOW
    )
    x = 0  # next-fit in permutation order: a sample that does not fit starts the next row
    for size in lengths[perm] + 1:
        if x % seq_len and size > seq_len - x % seq_len:
            x += seq_len - x % seq_len
        x += size
    assert old.total_rows == -(-x // seq_len) and new.total_rows == want_cum[-1] // seq_len
    old_padding = old.total_rows * seq_len - useful
    new_padding = new.total_rows * seq_len - useful
    assert new_padding < old_padding / 10


def test_the_loader_lays_prompt_response_samples_out_best_fit(sft):
    _, prompts, path = sft
    ds = open_dataset(path)
    ds.prompt_lengths = prompts
    lengths = np.diff(ds.doc_starts)
    perm = epoch_permutation(len(ds), 0, 0)
    _, want_cum, _ = reference_best_fit(lengths, perm, 32, best_fit_key(0, 0), 8192)
    assert sampler.BEST_FIT_WINDOW == 8192
    rows = {
        layout: Loader(ds, 1, 32, layout=layout).state_dict()["total_rows"]
        for layout in (None, "samples")
    }
    assert rows[None] == want_cum[-1] // 32 < rows["samples"]


@pytest.mark.slow
def test_the_first_build_that_compiles_the_kernels_writes_the_shared_index(sft, tmp_path):
    # numba's compiling call leaves cycles that hold the caller's views of the file being
    # written: the write must still close its mapping (a cold numba cache, as after install).
    _, prompts, path = sft
    np.save(tmp_path / "prompts.npy", prompts)
    script = (
        "import sys, numpy as np\n"
        "from pipeline import Loader, open_dataset\n"
        "ds = open_dataset(sys.argv[1])\n"
        "ds.prompt_lengths = np.load(sys.argv[2])\n"
        "print(Loader(ds, 2, 32).state_dict()['total_rows'])\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    args = [sys.executable, "-c", script, str(path), str(tmp_path / "prompts.npy")]
    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    ds = open_dataset(path)
    ds.prompt_lengths = prompts
    assert int(done.stdout) == Loader(ds, 2, 32).state_dict()["total_rows"]
    assert list((path / ".index_cache").glob("epoch-*-bestfit-e0.idx"))
