"""The loader's contract on prompt/response datasets: over an epoch across ranks every response
token and one EOS per sample is labelled exactly once, prompt tokens never are; resume at any
global row is bit-equal with another world size or batch size; both read modes agree."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline import Loader, PipelineError, Prefetcher, open_dataset

SEQ_LEN = 32


def open_sft(path, prompts, ultra_low_mem=False):
    ds = open_dataset(path, ultra_low_mem=ultra_low_mem)
    ds.prompt_lengths = prompts
    return ds


def global_rows(ds, world_size, batch_size, packing, state=None, max_steps=None):
    """Step all ranks in lockstep; return ((R, L) ids, labels, positions) in global row order
    (rank r's rows follow rank r-1's within a step), the batches, and rank 0's final state."""
    loaders = [
        Loader(ds, batch_size, SEQ_LEN, rank=r, world_size=world_size, packing=packing)
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


@pytest.mark.parametrize("packing", [True, False])
def test_every_response_token_and_one_eos_per_sample_once_across_three_ranks(sft, packing):
    docs, prompts, path = sft
    ds = open_sft(path, prompts)
    assert ds.pad_id > 255  # documents hold ids 0..255: an id above is padding or EOS
    (ids, labels, _), batches, state = global_rows(ds, 3, 4, packing)
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


@pytest.mark.parametrize("packing", [True, False])
def test_resume_mid_epoch_with_other_world_size_and_batch_size_is_bit_equal(sft, packing):
    _, prompts, path = sft
    ds = open_sft(path, prompts)
    whole, _, _ = global_rows(ds, 3, 4, packing)
    first, _, state = global_rows(ds, 3, 4, packing, max_steps=5)
    assert state["consumed_rows"] == 60
    rest, _, end_state = global_rows(ds, 2, 3, packing, state=state)
    total_rows = state["total_rows"]
    for a, b, c in zip(whole, first, rest, strict=True):
        resumed = np.concatenate([b, c])
        assert np.array_equal(resumed[:total_rows], a[:total_rows])
    pad_rows = np.concatenate([first[1], rest[1]])[total_rows:]
    assert (pad_rows == -100).all()
    assert end_state["epoch"] == 1


@pytest.mark.parametrize("packing", [True, False])
def test_ultra_low_mem_gives_identical_sft_batches(sft, packing):
    _, prompts, path = sft
    mmap = [b.clone() for b in Loader(open_sft(path, prompts), 3, SEQ_LEN, packing=packing)]
    ultra_loader = Loader(open_sft(path, prompts, ultra_low_mem=True), 3, SEQ_LEN, packing=packing)
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
