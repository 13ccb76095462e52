"""The loader's contract on prompt/response datasets: over an epoch across ranks every response
token and one EOS per sample is labelled exactly once, prompt tokens never are; resume at any
global row is bit-equal with another world size or batch size; both read modes agree. In every
layout: best-fit packing (the default), the earlier next-fit one (`samples`), padding rows."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline import CheckpointError, ConfigError, Loader, PipelineError, Prefetcher, open_dataset

SEQ_LEN = 32
# (packing, layout): best-fit (the default for these datasets), next-fit, one sample per row.
LAYOUTS = [(True, None), (True, "samples"), (False, None)]
LAYOUT_IDS = ["bestfit", "samples", "rows"]


def open_sft(path, prompts, ultra_low_mem=False):
    ds = open_dataset(path, ultra_low_mem=ultra_low_mem)
    ds.prompt_lengths = prompts
    return ds


def global_rows(ds, world_size, batch_size, packing, state=None, max_steps=None, layout=None):
    """Step all ranks in lockstep; return ((R, L) ids, labels, positions) in global row order
    (rank r's rows follow rank r-1's within a step), the batches, and rank 0's final state."""
    loaders = [
        Loader(
            ds, batch_size, SEQ_LEN, rank=r, world_size=world_size, packing=packing, layout=layout
        )
        for r in range(world_size)
    ]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    batches = []
    for step, group in enumerate(zip(*loaders, strict=True)):
        batches += [b.clone() for b in group]
        if step + 1 == max_steps:
            break
    rows = tuple(
        np.concatenate([b[k].numpy() for b in batches]).reshape(-1, SEQ_LEN)
        for k in ("input_ids", "labels", "position_ids")
    )
    return rows, batches, loaders[0].state_dict()


@pytest.mark.parametrize("packing, layout", LAYOUTS, ids=LAYOUT_IDS)
def test_every_response_token_and_one_eos_per_sample_once_across_three_ranks(sft, packing, layout):
    docs, prompts, path = sft
    ds = open_sft(path, prompts)
    assert ds.pad_id > 255  # documents hold ids 0..255: an id above is padding or EOS
    (ids, labels, _), batches, state = global_rows(ds, 3, 4, packing, layout=layout)
    pairs = list(zip(docs, prompts, strict=True))
    responses = Counter(np.concatenate([d[p:] for d, p in pairs]).tolist())
    responses[ds.eos_id] += len(docs)
    assert Counter(labels[labels != -100].tolist()) == responses
    assert np.array_equal(ids[labels != -100], labels[labels != -100])
    prompt_tokens = Counter(np.concatenate([d[:p] for d, p in pairs]).tolist())
    assert Counter(ids[(labels == -100) & (ids != ds.pad_id)].tolist()) == prompt_tokens
    assert sum(b.num_tokens for b in batches) == sum(responses.values())
    assert all(b.num_loss_tokens == int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert state["epoch"] == 1 and state["consumed_rows"] == 0


@pytest.mark.parametrize("packing, layout", LAYOUTS, ids=LAYOUT_IDS)
def test_resume_mid_epoch_with_other_world_size_and_batch_size_is_bit_equal(sft, packing, layout):
    _, prompts, path = sft
    ds = open_sft(path, prompts)
    whole, _, _ = global_rows(ds, 3, 4, packing, layout=layout)
    first, _, state = global_rows(ds, 3, 4, packing, max_steps=5, layout=layout)
    assert state["consumed_rows"] == 60
    rest, _, end_state = global_rows(ds, 2, 3, packing, state=state)  # the layout: state's
    total_rows = state["total_rows"]
    for a, b, c in zip(whole, first, rest, strict=True):
        resumed = np.concatenate([b, c])
        assert np.array_equal(resumed[:total_rows], a[:total_rows])
    pad_rows = np.concatenate([first[1], rest[1]])[total_rows:]
    assert (pad_rows == -100).all()
    assert end_state["epoch"] == 1


@pytest.mark.parametrize("packing, layout", LAYOUTS, ids=LAYOUT_IDS)
def test_ultra_low_mem_gives_identical_sft_batches(sft, packing, layout):
    _, prompts, path = sft
    shape = {"packing": packing, "layout": layout}
    mmap = [b.clone() for b in Loader(open_sft(path, prompts), 3, SEQ_LEN, **shape)]
    ultra_loader = Loader(open_sft(path, prompts, ultra_low_mem=True), 3, SEQ_LEN, **shape)
    ultra = [b.clone() for b in Prefetcher(ultra_loader, depth=3, num_readers=3)]
    assert len(mmap) == len(ultra)
    for a, b in zip(mmap, ultra, strict=True):
        assert (a.num_tokens, a.num_loss_tokens) == (b.num_tokens, b.num_loss_tokens)
        for key in a:
            assert np.array_equal(a[key], b[key]), key


def test_prompt_lengths_of_the_wrong_shape_are_refused(sft):
    _, prompts, path = sft
    with pytest.raises(PipelineError, match="prompt lengths of shape \\(299,\\) for 300 documents"):
        Loader(open_sft(path, prompts[:-1]), 2, SEQ_LEN)


@pytest.mark.parametrize("packing", [True, False])
def test_a_built_sft_dataset_labels_only_responses_and_their_eos(tmp_path, packing):
    import json

    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig

    records = [
        {"prompt": f"question {i}? " * (i % 4), "response": f"answer {i}."} for i in range(40)
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    build_dataset(BuildConfig(inputs=[src], out=tmp_path / "ds", sft=True), progress=False)
    ds = open_dataset(tmp_path / "ds")
    assert ds.kind == "sft"
    responses = Counter()
    for i in range(len(ds)):
        responses.update(ds[i][int(ds.prompt_lengths[i]) :].tolist() + [ds.eos_id])
    labelled = Counter()
    for b in Loader(ds, 4, 24, packing=packing):
        labelled.update(b["labels"][b["labels"] != -100].tolist())
    assert labelled == responses


def epoch_rows(ds, layout=None) -> int:
    """Rows of epoch 0 in the loader's layout (the default: best-fit)."""
    return Loader(ds, 1, SEQ_LEN, layout=layout).state_dict()["total_rows"]


def test_best_fit_rows_do_not_depend_on_world_size_or_batch_size(sft):
    _, prompts, path = sft
    ds = open_sft(path, prompts)
    total_rows = epoch_rows(ds)
    one, _, _ = global_rows(ds, 1, 1, True)
    assert len(one[0]) == total_rows
    for world_size, batch_size in ((3, 4), (2, 5)):
        many, _, _ = global_rows(ds, world_size, batch_size, True)
        for a, b in zip(one, many, strict=True):
            assert np.array_equal(b[:total_rows], a)
        assert (many[1][total_rows:] == -100).all()


@pytest.mark.parametrize("consumed_steps", [1, 4, 9])
def test_best_fit_resumes_at_any_row(sft, consumed_steps):
    _, prompts, path = sft
    ds = open_sft(path, prompts)
    whole, _, _ = global_rows(ds, 2, 3, True)
    first, _, state = global_rows(ds, 2, 3, True, max_steps=consumed_steps)
    assert state["consumed_rows"] == 6 * consumed_steps and state["layout"] == "bestfit"
    rest, _, _ = global_rows(ds, 3, 1, True, state=state)
    total_rows = state["total_rows"]
    for a, b, c in zip(whole, first, rest, strict=True):
        assert np.array_equal(np.concatenate([b, c])[:total_rows], a[:total_rows])


@pytest.mark.parametrize("version", [2, 3])
def test_a_state_saved_on_the_samples_layout_resumes_on_it(sft, version):
    _, prompts, path = sft
    ds = open_sft(path, prompts)
    whole, _, _ = global_rows(ds, 2, 2, True, layout="samples")
    first, _, state = global_rows(ds, 2, 2, True, max_steps=3, layout="samples")
    assert state["layout"] == "samples" and state["total_rows"] == epoch_rows(ds, "samples")
    if version == 2:  # as the release before best-fit wrote it
        state = {k: v for k, v in state.items() if k != "layout"} | {"version": 2}
    loader = Loader(ds, 4, SEQ_LEN)
    assert loader.layout == "bestfit"
    loader.load_state_dict(state)
    assert loader.layout == "samples" and loader.state_dict()["layout"] == "samples"
    rest = np.concatenate([b["input_ids"].numpy() for b in loader])
    total_rows = state["total_rows"]
    assert np.array_equal(np.concatenate([first[0], rest])[:total_rows], whole[0][:total_rows])
    names = {p.name.split("-")[-2] for p in ds.index_folder.glob("epoch-*.idx")}
    assert names == {"samples"}  # the best-fit index was never built


def test_a_layout_that_does_not_match_packing_is_refused(sft):
    _, prompts, path = sft
    ds = open_sft(path, prompts)
    with pytest.raises(ConfigError, match="layout 'rows' is not one of"):
        Loader(ds, 2, SEQ_LEN, layout="rows")
    state = Loader(ds, 2, SEQ_LEN).state_dict() | {"layout": "rows"}
    with pytest.raises(CheckpointError, match="loader state layout 'rows' is not one of"):
        Loader(ds, 2, SEQ_LEN).load_state_dict(state)
