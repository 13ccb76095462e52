"""The language-model loss without [B, L, vocab] fp32 logits: labels shifted onto positions,
then cross-entropy against the output head one chunk of labelled positions at a time, gradients
computed while each chunk's logits exist. Positions without a label (prompt, padding) never reach
the head. Shared by the built-in decoder, the Hugging Face adapter and the encoder-decoder models;
the planner chooses the chunk (planner/loss_chunk.py counts the buffers the kernel below keeps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import DynamicOutputShapeException

from lowmem_core.format import IGNORE_INDEX


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with positions: targets[:, t] = labels[:, t + 1]; the last column is ignored.

    Shifting the labels (not the hidden states) keeps the hidden states contiguous, so they are
    flattened without a copy.
    """
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat((labels[:, 1:], pad), dim=1)


@dataclass(frozen=True)
class LogitMap:
    """What a model does to `hidden @ weight.T (+ bias)` before the softmax, position by position:
    logits = softcap * tanh(scale * z / softcap), or scale * z without a softcap (Gemma-2's final
    softcapping, Cohere's logit_scale, Granite's 1 / logits_scaling)."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None


IDENTITY = LogitMap()


def labelled_positions(targets: torch.Tensor) -> torch.Tensor:
    """Indices [n] of the flat positions whose target counts (one device sync for n).

    Every position on tensors without values (the planner's fake-tensor trace, where n is
    unknowable): the kernel masks the ignored ones, and the trace counts the most memory a batch
    of this shape can need.
    """
    try:
        return (targets != IGNORE_INDEX).nonzero().squeeze(1)
    except DynamicOutputShapeException:
        return torch.arange(targets.shape[0], device=targets.device)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `logit_map(hidden[rows] @ weight.T + bias)` against targets[rows],
    one chunk of `rows` at a time.

    The gradients are computed in the forward pass, chunk by chunk, while each chunk's logits
    exist; only d(loss)/d(hidden) [N, d] (zero at positions not in `rows`), d(loss)/d(weight)
    [V, d] and d(loss)/d(bias) [V] are kept for backward, which scales them by the incoming
    gradient. Each chunk's hidden rows are gathered on their own, so no [n, d] copy exists. A chunk
    of C rows holds one fp32 [C, V] buffer (logits, turned into softmax and gradient in place),
    a second one with a softcap (its tanh, for the gradient), and under autocast a 16-bit [C, V]
    copy beside the fp32 one (the matmul's output, then the gradient fed back to the matmuls).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, chunk_tokens, logit_map):  # noqa: D102
        needs = ctx.needs_input_grad
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads = {
            # zero at the positions `rows` leaves out
            "hidden": torch.zeros_like(hidden) if needs[0] else None,
            "weight": _fp32_zeros(weight) if needs[1] else None,
            "bias": _fp32_zeros(bias) if bias is not None and needs[2] else None,
        }
        for start in range(0, rows.shape[0], chunk_tokens):
            at = rows[start : start + chunk_tokens]
            h, t = hidden.index_select(0, at), targets.index_select(0, at)  # (C, d), (C,)
            loss_sum += _chunk(h, weight, bias, t, logit_map, at, grads)
        ctx.save_for_backward(grads["hidden"], grads["weight"], grads["bias"])
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss_sum):  # noqa: D102 (documented on the class)
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss_sum.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss_sum).to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_loss_sum).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _fp32_zeros(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(t.shape, dtype=torch.float32, device=t.device)


def _chunk(h, weight, bias, t, logit_map: LogitMap, at, grads) -> torch.Tensor:
    """One chunk's summed loss; its gradients added into `grads` (see the class docstring)."""
    counted = t != IGNORE_INDEX  # all true for gathered rows; the fake trace's rows may not be
    safe_t = torch.where(counted, t, 0)
    z = F.linear(h, weight, bias)  # (C, V) in the compute dtype (bf16 under autocast)
    compute_dtype = z.dtype
    logits = z.float()
    del z  # the 16-bit copy goes before the fp32 buffer is worked on
    if logit_map.scale != 1.0:
        logits.mul_(logit_map.scale)
    tanh = None
    if logit_map.softcap is not None:
        tanh = logits.div_(logit_map.softcap).tanh_()
        logits = tanh * logit_map.softcap
    target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)  # (C,)
    # log-sum-exp by hand, in place, so the logits buffer becomes the softmax and the gradient.
    row_max = logits.amax(dim=-1)
    exp_shifted = logits.sub_(row_max[:, None]).exp_()
    del logits
    sum_exp = exp_shifted.sum(dim=-1)
    loss_sum = ((row_max + sum_exp.log() - target_logit) * counted).sum()
    if all(g is None for g in grads.values()):
        return loss_sum
    # d(sum CE)/d(logits) = softmax - one_hot(target), zero on ignored rows; built in place.
    grad = exp_shifted.div_(sum_exp[:, None])
    del exp_shifted
    grad[torch.arange(t.shape[0], device=t.device), safe_t] -= 1.0
    grad.mul_(counted[:, None])
    if tanh is not None:  # d(cap tanh(x / cap))/dx = 1 - tanh^2, in the tanh buffer
        grad = tanh.square_().neg_().add_(1.0).mul_(grad)
        del tanh
    if logit_map.scale != 1.0:
        grad.mul_(logit_map.scale)
    # Back to the dtype of the forward matmul, as autograd would do; under autocast the
    # matmuls below cast `weight` and `h` the same way the forward one did.
    grad = grad.to(compute_dtype)
    if grads["hidden"] is not None:
        grads["hidden"].index_copy_(0, at, (grad @ weight).to(grads["hidden"].dtype))
    if grads["weight"] is not None:
        grads["weight"] += (grad.t() @ h).float()
    if grads["bias"] is not None:
        grads["bias"] += grad.float().sum(dim=0)
    return loss_sum


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    *,
    bias: torch.Tensor | None = None,
    logit_map: LogitMap = IDENTITY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, counted targets) of the LM head `weight` [V, d] (+ `bias` [V], then
    `logit_map`) over the labelled positions of hidden [..., d].

    targets [...] are already aligned with the hidden positions; IGNORE_INDEX positions never
    reach the head. The mean is over counted targets, and 0 when there are none (a rank whose
    share of a partial last step is all padding contributes nothing instead of NaN).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    n_loss_tokens = (targets != IGNORE_INDEX).sum()
    loss_sum = _ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, targets, labelled_positions(targets), chunk_tokens, logit_map
    )
    return loss_sum / n_loss_tokens.clamp(min=1), n_loss_tokens


def gathered_logits_cross_entropy(
    hidden: torch.Tensor, head, targets: torch.Tensor, logit_map: LogitMap = IDENTITY
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, counted targets) through any per-position `head` module: its fp32 logits exist
    for the labelled positions only ([n, V]). For heads the chunked kernel cannot take."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    n_loss_tokens = (targets != IGNORE_INDEX).sum()
    rows = labelled_positions(targets)
    hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
    logits = head(hidden).float()
    if logit_map.softcap is not None:
        logits = torch.tanh(logits * (logit_map.scale / logit_map.softcap)) * logit_map.softcap
    elif logit_map.scale != 1.0:
        logits = logits * logit_map.scale
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum / n_loss_tokens.clamp(min=1), n_loss_tokens
