"""Encoder-decoder pair packing: the kernels against a plain Python reference, every prompt and
response token exactly once across ranks, rows within their budgets, resume at any global row
with another world size, both read modes and the prefetcher agreeing."""

from __future__ import annotations

import threading
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from lowmem_core.errors import CheckpointError, PipelineError
from pipeline import Prefetcher, open_dataset, pair_layout
from pipeline.pair_layout import PACK_WINDOW, PairIndex, pair_row_lens, pair_rows
from pipeline.pairs import PAIR_KEYS, PairLoader
from pipeline.sampler import epoch_permutation

LE, LD, START = 48, 32, 1000


def open_sft(path, prompts, ultra_low_mem=False):
    ds = open_dataset(path, ultra_low_mem=ultra_low_mem)
    ds.prompt_lengths = prompts
    return ds


def first_fit(parts, le=LE, ld=LD, window=PACK_WINDOW):
    """Plain Python first-fit of (encoder, decoder) part sizes over `window` open rows, closing
    the fullest when none has room: each item's row, rows numbered as they open."""
    open_rows, row_of = [], []  # open_rows: [row, used_e, used_d]
    opened = 0
    for e, d in parts:
        fits = [r for r in open_rows if r[1] + e <= le and r[2] + d <= ld]
        if fits:
            slot = fits[0]
        else:
            slot = [opened, 0, 0]
            opened += 1
            if len(open_rows) < window:
                open_rows.append(slot)
            else:
                full = max(
                    range(window),
                    key=lambda j: (max(open_rows[j][1] / le, open_rows[j][2] / ld), -j),
                )
                open_rows[full] = slot
        slot[1] += e
        slot[2] += d
        row_of.append(slot[0])
    return row_of


def reference_rows(docs, prompts, perm, eos, pad, le=LE, ld=LD):
    """Plain Python: first-fit in permutation order, truncation as documented."""
    pairs = []
    for doc in perm:
        d, p = docs[doc].tolist(), int(prompts[doc])
        enc = d[:p][:le] or [eos]
        resp = d[p:][: ld - 1]
        pairs.append((enc, [START, *resp], [*resp, eos]))
    row_of = first_fit([(len(e), len(x)) for e, x, _ in pairs], le, ld)
    rows = [[] for _ in range(max(row_of) + 1)]
    for pair, row in zip(pairs, row_of, strict=True):
        rows[row].append(pair)
    out = {k: [] for k in PAIR_KEYS}
    for row in rows:
        enc = [t for e, _, _ in row for t in e]
        enc_pos = [i for e, _, _ in row for i in range(len(e))]
        dec = [t for _, x, _ in row for t in x]
        dec_pos = [i for _, x, _ in row for i in range(len(x))]
        lab = [t for _, _, y in row for t in y]
        for key, vals, width, fill in (
            ("input_ids", enc, le, pad),
            ("position_ids", enc_pos, le, -1),
            ("decoder_input_ids", dec, ld, pad),
            ("decoder_position_ids", dec_pos, ld, -1),
            ("labels", lab, ld, -100),
        ):
            out[key].append(vals + [fill] * (width - len(vals)))
    return {k: np.array(v, dtype=np.int64) for k, v in out.items()}


def global_rows(ds, world_size, batch_size, state=None, max_steps=None, prefetch=False):
    """Step all ranks in lockstep; return each key's rows in global row order, the batches and
    rank 0's final state."""
    loaders = [
        PairLoader(ds, batch_size, LE, LD, start_id=START, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    sources = [Prefetcher(x, depth=2, num_readers=2) if prefetch else x for x in loaders]
    batches = []
    for step, group in enumerate(zip(*sources, strict=True)):
        batches += [b.clone() for b in group]
        if step + 1 == max_steps:
            break
    rows = {k: np.concatenate([b[k].numpy() for b in batches]) for k in PAIR_KEYS}
    return rows, batches, loaders[0].state_dict()


@pytest.mark.parametrize("window", [1, 4, PACK_WINDOW])
def test_layout_kernel_matches_a_python_reference(window):
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 90, 500)
    prompts = rng.integers(0, lengths + 1)
    prompts[::7] = 0
    starts = np.concatenate([[0], np.cumsum(lengths)])
    order = rng.permutation(500).astype(np.uint32)  # as epoch_permutation gives it
    row_of, stats = np.empty(500, dtype=np.uint32), np.zeros(4, dtype=np.int64)
    rows = pair_rows(order, starts, prompts, LE, LD, window, row_of, stats)
    parts = [(max(min(prompts[i], LE), 1), min(lengths[i] - prompts[i], LD - 1) + 1) for i in order]
    assert row_of.tolist() == first_fit(parts, window=window)
    assert rows == row_of.max() + 1
    if window == 1:  # next-fit: each row is a run of consecutive pairs
        assert (np.diff(row_of.astype(np.int64)) >= 0).all()
    enc = np.maximum(np.minimum(prompts, LE), 1).sum()
    dec = (np.minimum(lengths - prompts, LD - 1) + 1).sum()
    cut = [(prompts > LE).sum(), (lengths - prompts > LD - 1).sum()]
    assert stats.tolist() == [enc, dec, *cut]


def test_first_fit_fills_rows_that_next_fit_leaves_half_empty(sft):
    _, prompts, path = sft
    ds = open_sft(path, prompts)
    next_fit = PairIndex.build(ds.doc_starts, prompts, 0, 0, LE, LD, window=1)
    first_fit_ = PairIndex.build(ds.doc_starts, prompts, 0, 0, LE, LD)
    assert (first_fit_.enc_tokens, first_fit_.dec_tokens) == (
        next_fit.enc_tokens,
        next_fit.dec_tokens,
    )
    assert first_fit_.total_rows < 0.9 * next_fit.total_rows
    assert np.array_equal(next_fit.pairs, epoch_permutation(len(prompts), 0, 0))
    assert sorted(first_fit_.pairs.tolist()) == list(range(len(prompts)))


def test_rows_equal_the_reference_and_every_token_is_there_once_across_three_ranks(sft):
    docs, prompts, path = sft
    ds = open_sft(path, prompts)
    rows, batches, state = global_rows(ds, 3, 4)
    index = PairIndex.build(ds.doc_starts, prompts, 0, 0, LE, LD)
    perm = epoch_permutation(len(prompts), 0, 0)
    expected = reference_rows(docs, prompts, perm, ds.eos_id, ds.pad_id)
    n = index.total_rows
    fill = {"position_ids": -1, "decoder_position_ids": -1, "labels": -100}
    for key in PAIR_KEYS:  # rows past the epoch's last (a partial step) are all padding
        assert np.array_equal(rows[key][:n], expected[key]), key
        assert (rows[key][n:] == fill.get(key, ds.pad_id)).all(), key
    assert (state["epoch"], state["consumed_rows"]) == (1, 0)
    # Every prompt token once in the encoder, every response token and one EOS per pair once in
    # the labels; truncated pairs keep their first LE prompt / LD - 1 response tokens.
    assert index.cut_prompts > 0 and index.cut_responses > 0
    enc, lab = Counter(), Counter()
    for d, p in zip(docs, prompts, strict=True):
        enc.update(d[:p][:LE].tolist() or [ds.eos_id])
        lab.update([*d[p:][: LD - 1].tolist(), ds.eos_id])
    assert Counter(rows["input_ids"][rows["position_ids"] >= 0].tolist()) == enc
    assert Counter(rows["labels"][rows["labels"] != -100].tolist()) == lab
    assert sum(b.num_tokens for b in batches) == index.dec_tokens == (rows["labels"] != -100).sum()
    assert index.enc_tokens == (rows["position_ids"] >= 0).sum()
    pad_e, pad_d = index.padding_pct()
    assert pad_e == 100 * (1 - index.enc_tokens / (n * LE))
    assert pad_d == 100 * (1 - index.dec_tokens / (n * LD))
    # Pair k of a row is segment k on both sides.
    assert ((rows["position_ids"] == 0).sum(1) == (rows["decoder_position_ids"] == 0).sum(1)).all()


def test_resume_at_any_row_with_another_world_size_and_batch_size(sft):
    _, prompts, path = sft
    ds = open_sft(path, prompts)
    full, _, _ = global_rows(ds, 1, 7)
    head, _, state = global_rows(ds, 3, 4, max_steps=2)
    assert state["consumed_rows"] == 24
    tail, _, _ = global_rows(ds, 2, 5, state=state)
    rows = full["labels"].shape[0]
    for key in PAIR_KEYS:
        joined = np.concatenate([head[key], tail[key]])
        n = min(rows, joined.shape[0])
        assert np.array_equal(joined[:n], full[key][:n]), key


def test_prefetcher_and_ultra_low_mem_give_the_same_batches(sft):
    _, prompts, path = sft
    plain, _, _ = global_rows(open_sft(path, prompts), 2, 3)
    fetched, _, _ = global_rows(open_sft(path, prompts, ultra_low_mem=True), 2, 3, prefetch=True)
    for key in PAIR_KEYS:
        assert np.array_equal(plain[key], fetched[key]), key


def test_order_is_a_function_of_seed_and_epoch(sft):
    _, prompts, path = sft
    ds = open_sft(path, prompts)
    a = PairIndex.build(ds.doc_starts, prompts, 5, 2, LE, LD)
    again = PairIndex.build(ds.doc_starts, prompts, 5, 2, LE, LD)
    assert np.array_equal(a.pairs, again.pairs)
    assert np.array_equal(a.row_starts, again.row_starts)
    assert not np.array_equal(a.pairs, PairIndex.build(ds.doc_starts, prompts, 5, 3, LE, LD).pairs)


def test_row_lengths_follow_the_data_and_cut_only_past_the_limit():
    # Pairs: prompts of 3, 10, 5 tokens; responses + start 18, 3, 96 (the decoder holds more).
    data = SimpleNamespace(
        doc_starts=np.array([0, 20, 32, 132]), prompt_lengths=np.array([3, 10, 5])
    )
    # 64: the third pair's 96 decoder tokens take a row of their own whatever the encoder
    # length, so the shortest that holds the longest prompt (10 -> 16) wins.
    assert pair_row_lens(data, 64) == (16, 64)
    # 512: all three pairs fit one decoder row; 24 holds all three prompts (18), 16 does not.
    assert pair_row_lens(data, 512) == (24, 512)
    assert pair_row_lens(data, 8) == (8, 8)  # the longest prompt (10) is cut at the limit
    data.prompt_lengths = np.array([20, 12, 100])  # no responses: the encoder holds more
    assert pair_row_lens(data, 64) == (64, 8)


def test_refusals_name_the_fix(sft, make_dataset):
    _, prompts, path = sft
    with pytest.raises(PipelineError, match="build it with `python -m pipeline build --sft`"):
        PairLoader(open_dataset(path), 2, LE, LD, start_id=START)
    loader = PairLoader(open_sft(path, prompts), 2, LE, LD, start_id=START)
    state = loader.state_dict()
    other = PairLoader(open_sft(path, prompts), 2, LE, LD + 8, start_id=START)
    with pytest.raises(CheckpointError, match=r"dec_len: state 32, loader 40"):
        other.load_state_dict(state)


def test_a_next_fit_state_of_the_previous_release_resumes_its_own_order(sft):
    _, prompts, path = sft
    ds = open_sft(path, prompts)
    old = PairLoader(ds, 3, LE, LD, start_id=START, pack_window=1)
    batches = iter(old)
    next(batches)
    state = {k: v for k, v in old.state_dict().items() if k != "pack_window"}
    state["version"] = 1
    expected = next(batches).clone()
    resumed = PairLoader(open_sft(path, prompts), 3, LE, LD, start_id=START)
    resumed.load_state_dict(state)
    assert resumed.pack_window == 1
    got = next(iter(resumed))
    for key in PAIR_KEYS:
        assert np.array_equal(got[key].numpy(), expected[key].numpy()), key
    with pytest.raises(CheckpointError, match="pack_window 0"):
        resumed.load_state_dict({**state, "version": 2, "pack_window": 0})


def test_the_layout_is_one_file_per_epoch_shared_by_ranks_and_prepared_ahead(sft, monkeypatch):
    _, prompts, path = sft
    ds = open_sft(path, prompts)
    built = []
    real = pair_layout.fill_pair_layout

    def spy(pairs, row_starts, starts, prompt_lengths, seed, epoch, *rest):
        built.append((epoch, threading.current_thread().name))
        return real(pairs, row_starts, starts, prompt_lengths, seed, epoch, *rest)

    monkeypatch.setattr(pair_layout, "fill_pair_layout", spy)
    ranks = [
        PairLoader(open_sft(path, prompts), 2, LE, LD, start_id=START, rank=r, world_size=2)
        for r in range(2)
    ]
    for group in zip(*ranks, strict=True):  # epoch 0; epoch 1 is prepared at 90% of it
        assert len(group) == 2
    ranks[0]._ahead[1].result()  # internals: wait for the background build
    assert built == [(0, "MainThread"), (1, "epoch-index-ahead")]  # once for both ranks
    index = ranks[1].index
    assert index.epoch == 1 and not index.pairs.flags.writeable  # mapped, read-only
    private = PairIndex.build(ds.doc_starts, prompts, 0, 1, LE, LD)
    assert np.array_equal(index.pairs, private.pairs)
    assert np.array_equal(index.row_starts, private.row_starts)
    assert index.total_rows == private.total_rows and index.enc_tokens == private.enc_tokens
    files = sorted(p.name for p in ds.index_folder.glob("pairs-*.idx"))
    assert [f.rsplit("-", 1)[1] for f in files] == ["e0.idx", "e1.idx"]
    assert all(f"-E{LE}-D{LD}-w{PACK_WINDOW}-" in f for f in files)
