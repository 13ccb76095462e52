"""Evaluation on a held-out dataset: every sample exactly once across ranks, one mean loss.

The eval loader is an ordinary `Loader` over the eval dataset for one epoch: rank k takes its
rows of every global step, the partial last step is padded (labels -100), so each sample is
scored once whatever the world size. The result is the summed loss over every label token of
the whole set divided by their count, reduced over ranks once at the end, so it equals the
per-token mean a single process computes sample by sample. An encoder-decoder's eval loader is
a `pipeline.pairs.PairLoader` (labels already aligned): the same holds pair by pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per label token over the whole eval set
    label_tokens: int  # label tokens scored, over all ranks

    def to_dict(self) -> dict:
        return {"eval_loss": self.loss, "eval_label_tokens": self.label_tokens}


def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    sum_over_ranks: Callable[[list[float]], list[float]],
) -> EvalResult:
    """Score `batches` (this rank's share of one eval epoch) and reduce over ranks.

    `sum_over_ranks([a, b])` returns the element-wise sums over every rank (a collective: each
    rank calls it once, after its own batches).
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                out = model(**inputs)
                loss_sum += out.loss.double() * out.n_loss_tokens
                count += out.n_loss_tokens
    finally:
        model.train(was_training)
    total_loss, total_count = sum_over_ranks([float(loss_sum.item()), float(count.item())])
    total_count = int(round(total_count))
    return EvalResult(loss=total_loss / max(total_count, 1), label_tokens=total_count)
