"""The loader's contract: exactly-once rows per epoch across ranks, resumable at any global row
with another world size or batch size, deterministic in (seed, epoch), identical in both read
modes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline import CheckpointError, ConfigError, Loader, Prefetcher, open_dataset
from pipeline.sampler import epoch_permutation

NUM_DOCS, SEED, MEDIAN = 300, 7, 40


@pytest.fixture
def docs_and_dir(make_dataset, synthetic_token_docs):
    path = make_dataset(num_docs=NUM_DOCS, seed=SEED, median_len=MEDIAN)
    return synthetic_token_docs(NUM_DOCS, SEED, MEDIAN, 256), path


def useful_tokens(batches) -> Counter:
    counts = Counter()
    for b in batches:
        counts.update(b["input_ids"][b["labels"] != -100].tolist())
    return counts


def corpus_tokens(docs, eos_id) -> Counter:
    """The tokens of one epoch in either layout: every document's tokens and one EOS each."""
    counts = Counter(np.concatenate(docs).tolist())
    counts[eos_id] += len(docs)
    return counts


def run_ranks(
    ds, world_size, batch_size, seq_len, packing=True, states=None, max_steps=None, seed=0
):
    """Step all ranks in lockstep like a real job; return (batches of all ranks, final states)."""
    loaders = [
        Loader(ds, batch_size, seq_len, rank=r, world_size=world_size, packing=packing, seed=seed)
        for r in range(world_size)
    ]
    if states is not None:
        for loader in loaders:
            loader.load_state_dict(states)
    iters = [iter(loader) for loader in loaders]
    batches, steps = [], 0
    while max_steps is None or steps < max_steps:
        step = [next(it, None) for it in iters]
        if step[0] is None:
            assert all(b is None for b in step), "ranks disagree on the number of steps"
            break
        assert all(b["input_ids"].shape == (batch_size, seq_len) for b in step)
        batches.extend({k: v.clone() for k, v in b.items()} for b in step)
        steps += 1
    return batches, loaders[0].state_dict()


@pytest.mark.parametrize("packing", [True, False])
def test_every_token_once_per_epoch_across_three_ranks(docs_and_dir, packing):
    docs, path = docs_and_dir
    ds = open_dataset(path)
    batches, state = run_ranks(ds, world_size=3, batch_size=4, seq_len=32, packing=packing)
    assert useful_tokens(batches) == corpus_tokens(docs, ds.eos_id)
    assert state["epoch"] == 1 and state["consumed_rows"] == 0


@pytest.mark.parametrize("packing", [True, False])
def test_resume_with_other_world_size_and_batch_size_is_exactly_once(docs_and_dir, packing):
    docs, path = docs_and_dir
    ds = open_dataset(path)
    first, state = run_ranks(
        ds, world_size=3, batch_size=4, seq_len=32, packing=packing, max_steps=5
    )
    assert state["consumed_rows"] == 5 * 3 * 4
    rest, end_state = run_ranks(
        ds, world_size=2, batch_size=3, seq_len=32, packing=packing, states=state
    )
    assert useful_tokens(first + rest) == corpus_tokens(docs, ds.eos_id)
    assert end_state["epoch"] == 1


def test_rows_depend_only_on_seed_and_epoch(docs_and_dir):
    _, path = docs_and_dir
    ds = open_dataset(path)

    def global_rows(world_size, batch_size, seed):
        batches, _ = run_ranks(ds, world_size, batch_size, 16, seed=seed)
        per_step = []
        # Reassemble global row order: within a step, rank r's rows follow rank r-1's.
        for i in range(0, len(batches), world_size):
            per_step.append(
                np.concatenate([b["input_ids"].numpy() for b in batches[i : i + world_size]])
            )
        rows = np.concatenate(per_step)
        return rows[(rows != ds.pad_id).any(axis=1)]

    a = global_rows(1, 8, seed=0)
    assert np.array_equal(a, global_rows(3, 2, seed=0))
    assert np.array_equal(a, global_rows(2, 5, seed=0)[: len(a)])
    assert not np.array_equal(a, global_rows(1, 8, seed=1))


def test_next_pass_is_next_epoch_with_another_order(docs_and_dir):
    _, path = docs_and_dir
    loader = Loader(open_dataset(path), 4, 32, seed=3)
    first = [b["input_ids"].clone() for b in loader]
    assert loader.state_dict()["epoch"] == 1
    second = [b["input_ids"].clone() for b in loader]
    assert len(first) == len(second) == len(loader)
    assert not all(np.array_equal(x, y) for x, y in zip(first, second, strict=True))


def test_break_mid_epoch_then_next_pass_finishes_that_epoch(docs_and_dir):
    docs, path = docs_and_dir
    ds = open_dataset(path)
    loader = Loader(ds, 4, 32)
    seen = []
    for i, b in enumerate(loader):
        seen.append({k: v.clone() for k, v in b.items()})
        if i == 6:
            break
    assert loader.state_dict()["consumed_rows"] == 7 * 4
    seen += [{k: v.clone() for k, v in b.items()} for b in loader]
    assert useful_tokens(seen) == corpus_tokens(docs, ds.eos_id)
    assert loader.state_dict()["epoch"] == 1


def test_state_counts_only_batches_handed_out(docs_and_dir):
    _, path = docs_and_dir
    loader = Loader(open_dataset(path), 2, 16)
    it = iter(loader)
    next(it)
    next(it)
    assert loader.state_dict()["consumed_rows"] == 4
    it.close()


def test_partial_last_step_pads_missing_rows_on_every_rank(docs_and_dir):
    _, path = docs_and_dir
    ds = open_dataset(path)
    batches, _ = run_ranks(ds, world_size=3, batch_size=7, seq_len=64)
    total_rows = Loader(ds, 7, 64).state_dict()["total_rows"]
    last_step = batches[-3:]
    real_rows = sum(int((b["labels"] != -100).any(dim=1).sum()) for b in last_step)
    assert real_rows == total_rows % 21 or (total_rows % 21 == 0 and real_rows == 21)
    padded = [b for b in last_step if (b["labels"] == -100).all(dim=1).any()]
    for b in padded:
        empty = (b["labels"] == -100).all(dim=1)
        assert (b["input_ids"][empty] == ds.pad_id).all() and (b["position_ids"][empty] == 0).all()


def test_drop_last_skips_the_partial_step(docs_and_dir):
    _, path = docs_and_dir
    ds = open_dataset(path)
    loader = Loader(ds, 7, 64, world_size=3, drop_last=True)
    total_rows = loader.state_dict()["total_rows"]
    assert len(loader) == total_rows // 21
    batches = list(loader)
    assert len(batches) == total_rows // 21
    assert all((b["labels"] != -100).all() for b in batches)
    assert loader.state_dict()["epoch"] == 1


@pytest.mark.parametrize("packing", [True, False])
def test_ultra_low_mem_and_readers_give_identical_batches(make_dataset, packing):
    path = make_dataset(num_docs=200, seed=3, median_len=50)
    mmap = [
        {k: v.clone() for k, v in b.items()}
        for b in Loader(open_dataset(path), 3, 40, packing=packing)
    ]
    ultra_ds = open_dataset(path, ultra_low_mem=True)
    ultra_loader = Loader(ultra_ds, 3, 40, packing=packing)
    ultra = [b.clone() for b in Prefetcher(ultra_loader, depth=3, num_readers=3)]
    assert len(mmap) == len(ultra)
    for a, b in zip(mmap, ultra, strict=True):
        for key in a:
            assert np.array_equal(a[key], b[key]), key


def test_padding_rows_reproduce_documents_exactly(docs_and_dir):
    """Each document followed by its EOS, cut into rows of L: ceil((len+1)/L) rows each."""
    docs, path = docs_and_dir
    L = 32
    ds = open_dataset(path)
    loader = Loader(ds, 5, L, packing=False, seed=11)
    rows = []
    for b in loader:
        for ids, labels, pos in zip(b["input_ids"], b["labels"], b["position_ids"], strict=True):
            keep = labels != -100
            if keep.any():
                rows.append(ids[keep].numpy())
                assert np.array_equal(pos[keep].numpy(), np.arange(int(keep.sum())))
    expected = [
        np.append(docs[d], ds.eos_id)[j : j + L]
        for d in epoch_permutation(NUM_DOCS, 11, 0)
        for j in range(0, len(docs[d]) + 1, L)
    ]
    assert any(len(docs[d]) % L == 0 for d in range(NUM_DOCS))  # a row holding only an EOS
    assert len(rows) == len(expected)
    assert all(np.array_equal(r, e) for r, e in zip(rows, expected, strict=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"seq_len": 1}, "seq_len must be an integer >= 2"),
        ({"rank": 3, "world_size": 3}, "rank must be in [0, world_size=3)"),
        ({"world_size": 0}, "world_size must be an integer >= 1"),
    ],
)
def test_impossible_loader_settings_are_refused(sample_dataset_dir, kwargs, message):
    args = {"batch_size": 2, "seq_len": 16, **kwargs}
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        Loader(open_dataset(sample_dataset_dir), **args)


def test_state_from_another_data_order_is_refused(docs_and_dir, sample_dataset_dir):
    _, path = docs_and_dir
    state = Loader(open_dataset(path), 2, 16, seed=1).state_dict()
    with pytest.raises(CheckpointError, match="seed: state has 1, loader has 2"):
        Loader(open_dataset(path), 2, 16, seed=2).load_state_dict(state)
    with pytest.raises(CheckpointError, match="fingerprint"):
        Loader(open_dataset(sample_dataset_dir), 2, 16, seed=1).load_state_dict(state)


@pytest.mark.parametrize(
    "state, named", [(None, "got NoneType"), ([], "got list"), ({"version": 99}, "version 99")]
)
def test_loading_something_that_is_not_a_loader_state_is_one_checkpoint_error(
    sample_dataset_dir, state, named
):
    loader = Loader(open_dataset(sample_dataset_dir), batch_size=2, seq_len=64)
    with pytest.raises(CheckpointError, match=named):
        loader.load_state_dict(state)


def test_a_version_1_state_resumes_text_packing_but_not_padding(docs_and_dir):
    _, path = docs_and_dir
    ds = open_dataset(path)
    for packing, resumes in ((True, True), (False, False)):
        loader = Loader(ds, 2, 16, packing=packing)
        it = iter(loader)
        next(it)
        state = {**loader.state_dict(), "version": 1}  # as the previous release wrote it
        it.close()
        resumed = Loader(ds, 2, 16, packing=packing)
        if resumes:
            resumed.load_state_dict(state)
            assert resumed.state_dict()["consumed_rows"] == 2
        else:
            with pytest.raises(CheckpointError, match="version 1 is not 2"):
                resumed.load_state_dict(state)
