"""Batch specs: the loaders a model's batches come from, and example batches of exactly the
shapes and dtypes those loaders make (what the planner traces and probes), for token rows and
encoder-decoder pairs; a resumed pair run keeps the row layout it was saved with."""

from __future__ import annotations

import pytest
import torch

from pipeline import open_dataset
from pipeline.batch_spec import PairRows, TokenRows
from pipeline.loader import Loader
from pipeline.pair_layout import PACK_WINDOW, pair_row_lens
from pipeline.pairs import PairLoader

START = 1000


@pytest.fixture
def pairs_dataset(sft):
    """The generated prompt/response dataset, opened."""
    _, prompts, path = sft
    ds = open_dataset(path)
    ds.prompt_lengths = prompts
    return ds


def _layout(batch: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in batch.items()}


@pytest.mark.parametrize("packing", [True, False])
def test_token_rows_make_the_loader_of_their_rows(make_dataset, packing):
    ds = open_dataset(make_dataset())
    spec = TokenRows(32, packing=packing)
    loader = spec.loader(ds, 3, rank=1, world_size=2, seed=5)
    assert isinstance(loader, Loader)
    assert (loader.seq_len, loader.packing, loader.seed) == (32, packing, 5)
    assert (loader.batch_size, loader.rank, loader.world_size) == (3, 1, 2)
    batch = next(iter(loader))
    assert _layout(spec.example(3, "cpu")) == _layout(batch)
    assert _layout(batch) == {k: ((3, 32), torch.int64, "cpu") for k in batch}
    assert not spec.labels_shifted


def test_a_token_rows_example_counts_positions_from_0_in_every_row():
    example = TokenRows(5).example(2, "cpu")
    assert example["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2
    assert example["input_ids"].eq(0).all() and example["labels"].eq(0).all()


def test_pair_rows_make_the_loader_of_their_layout(pairs_dataset):
    spec = PairRows(48, 32, START, pack_window=3)
    loader = spec.loader(pairs_dataset, 4, rank=0, world_size=2, seed=7)
    assert isinstance(loader, PairLoader)
    assert (loader.enc_len, loader.dec_len, loader.start_id) == (48, 32, START)
    assert (loader.pack_window, loader.seed, loader.world_size) == (3, 7, 2)
    batch = next(iter(loader))
    example = spec.example(4, "cpu")
    assert _layout(example) == _layout(batch)
    assert _layout(batch) == {
        "input_ids": ((4, 48), torch.int64, "cpu"),
        "position_ids": ((4, 48), torch.int64, "cpu"),
        "decoder_input_ids": ((4, 32), torch.int64, "cpu"),
        "decoder_position_ids": ((4, 32), torch.int64, "cpu"),
        "labels": ((4, 32), torch.int64, "cpu"),
    }
    assert example["decoder_position_ids"][0].tolist() == list(range(32))  # one pair a row
    assert spec.labels_shifted


def test_a_fresh_pair_layout_is_sized_from_the_data(pairs_dataset):
    spec = PairRows.for_dataset(pairs_dataset, 64, START)
    assert (spec.enc_len, spec.dec_len) == pair_row_lens(pairs_dataset, 64)
    assert (spec.start_id, spec.pack_window) == (START, PACK_WINDOW)


def test_without_a_dataset_both_rows_are_max_len():
    assert PairRows.for_dataset(None, 64, START) == PairRows(64, 64, START, PACK_WINDOW)


def test_a_resumed_run_keeps_the_layout_its_state_was_saved_with(pairs_dataset):
    saved = PairRows(40, 24, START, pack_window=1).loader(
        pairs_dataset, 2, rank=0, world_size=1, seed=0
    )
    state = saved.state_dict()
    assert pair_row_lens(pairs_dataset, 64) != (40, 24)
    assert PairRows.for_dataset(pairs_dataset, 64, START, state) == PairRows(40, 24, START, 1)
    # A state of the release before first-fit packing names no window: it packed next-fit.
    older = {k: v for k, v in state.items() if k != "pack_window"} | {"version": 1}
    assert PairRows.for_dataset(pairs_dataset, 64, START, older).pack_window == 1
    # A state without a pair layout (a decoder-only loader's) lays the data out afresh.
    fresh = PairRows.for_dataset(pairs_dataset, 64, START, {"epoch": 0, "consumed_rows": 0})
    assert fresh == PairRows.for_dataset(pairs_dataset, 64, START)


def test_each_spec_says_in_one_line_how_the_data_is_laid_out(make_dataset, pairs_dataset):
    plain = open_dataset(make_dataset())
    rows = TokenRows(32)
    assert rows.summary(rows.loader(plain, 2, rank=0, world_size=1, seed=0), plain) == (
        "data: plain text, loss on every token"
    )
    padded = TokenRows(32, packing=False)
    loader = padded.loader(pairs_dataset, 2, rank=0, world_size=1, seed=0)
    assert padded.summary(loader, pairs_dataset) == (
        f"data: {len(pairs_dataset):,} prompt/response samples, one sample per row, loss on the "
        f"responses; {loader.split_samples:,} longer than --max_seq_len 32 continue across rows"
    )
    pairs = PairRows(48, 32, START)
    loader = pairs.loader(pairs_dataset, 2, rank=0, world_size=1, seed=0)
    line = pairs.summary(loader, pairs_dataset)
    assert line.startswith(
        f"data: {len(pairs_dataset):,} prompt/response pairs packed by tokens into encoder rows "
        "of 48 and decoder rows of 32; padding "
    )
    index = loader.index
    n = len(pairs_dataset)
    assert index.cut_prompts + index.cut_responses > 0
    assert line.endswith(
        f"truncated to fit them (a pair cannot continue across rows): {index.cut_prompts:,} of "
        f"{n:,} prompts, {index.cut_responses:,} of {n:,} responses"
    )


def test_token_rows_of_a_resumed_run_keep_the_layout_its_state_was_saved_on(pairs_dataset):
    saving = Loader(pairs_dataset, 2, 32, seed=3, layout="samples")
    next(iter(saving))
    old_state = {**saving.state_dict(), "version": 2}  # what releases before best-fit wrote
    old_state.pop("layout")

    resumed = TokenRows.for_dataset(pairs_dataset, 32, True, old_state)
    fresh = TokenRows.for_dataset(pairs_dataset, 32, True, None)

    assert (resumed.layout, fresh.layout) == ("samples", None)
    # The rows the resumed run will see are the saved layout's, before its state is loaded:
    # the schedule is sized on them.
    rows = resumed.loader(pairs_dataset, 2, rank=0, world_size=1, seed=3)
    assert rows.state_dict()["total_rows"] == saving.state_dict()["total_rows"]
    best_fit = fresh.loader(pairs_dataset, 2, rank=0, world_size=1, seed=3)
    assert best_fit.layout == "bestfit"
    assert best_fit.state_dict()["total_rows"] < saving.state_dict()["total_rows"]
