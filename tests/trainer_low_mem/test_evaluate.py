"""Eval scores every sample exactly once across ranks and returns the per-token mean."""

from __future__ import annotations

import numpy as np
import torch

from pipeline import Loader, open_dataset
from trainer_low_mem.evaluate import evaluate
from trainer_low_mem.model import build_model

SEQ_LEN = 128


def _reference_mean(model, ds) -> tuple[float, int]:
    """Each document + EOS alone (the padding layout puts one per row when it fits)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            doc = torch.from_numpy(np.append(ds[i], ds.eos_id).astype("int64"))[None]
            out = model.eval()(doc, labels=doc)
            total += float(out.loss.double() * out.n_loss_tokens)
            count += int(out.n_loss_tokens)
    return total / count, count


def test_eval_over_one_and_three_ranks_equals_the_sample_by_sample_mean(make_dataset):
    ds = open_dataset(make_dataset(num_docs=40, median_len=30))
    assert int(ds.doc_lengths.max()) + 1 <= SEQ_LEN
    torch.manual_seed(0)
    model = build_model("tiny", document_masking=True)
    expected, expected_count = _reference_mean(model, ds)

    def loader(rank: int, world: int) -> Loader:
        return Loader(ds, batch_size=3, seq_len=SEQ_LEN, rank=rank, world_size=world, packing=False)

    single = evaluate(model, loader(0, 1), device=torch.device("cpu"), sum_over_ranks=lambda v: v)
    assert single.label_tokens == expected_count
    assert abs(single.loss - expected) < 1e-6

    partial_sums = []
    for rank in range(3):
        evaluate(
            model,
            loader(rank, 3),
            device=torch.device("cpu"),
            sum_over_ranks=lambda v: partial_sums.append(v) or v,
        )
    loss_total = sum(p[0] for p in partial_sums)
    count_total = sum(p[1] for p in partial_sums)
    assert count_total == expected_count
    assert abs(loss_total / count_total - expected) < 1e-6


def test_eval_leaves_the_model_in_training_mode_and_without_gradients(make_dataset):
    ds = open_dataset(make_dataset(num_docs=10, median_len=20))
    model = build_model("tiny")
    model.train()
    evaluate(
        model,
        Loader(ds, batch_size=2, seq_len=SEQ_LEN),
        device=torch.device("cpu"),
        sum_over_ranks=lambda v: v,
    )
    assert model.training
    assert all(p.grad is None for p in model.parameters())
