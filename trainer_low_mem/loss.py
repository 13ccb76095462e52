"""The language-model loss without [B, L, vocab] fp32 logits: labels shifted onto positions,
then cross-entropy against the output embedding one chunk of rows at a time, gradients computed
while each chunk's logits exist. Shared by the built-in decoder, the Hugging Face adapter and the
encoder-decoder models."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowmem_core.format import IGNORE_INDEX


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with positions: targets[:, t] = labels[:, t + 1]; the last column is ignored.

    Shifting the labels (not the hidden states) keeps the hidden states contiguous, so they are
    flattened without a copy.
    """
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat((labels[:, 1:], pad), dim=1)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against targets, one chunk of rows at a time.

    The gradients are computed in the forward pass, chunk by chunk, while each chunk's logits
    exist; only d(loss)/d(hidden) [N, d] and d(loss)/d(weight) [V, d] are kept for backward, which
    scales them by the incoming gradient. Peak extra memory is one chunk's logits instead of all
    N x V of them, and no logits are recomputed in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):  # noqa: D102 (documented on the class)
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if need_weight_grad
            else None
        )
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens]  # (C, d)
            t = targets[start : start + chunk_tokens]  # (C,)
            logits = F.linear(h, weight)  # (C, V) in the compute dtype (bf16 under autocast)
            compute_dtype = logits.dtype
            counted = t != IGNORE_INDEX
            safe_t = torch.where(counted, t, 0)
            logits = logits.float()
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)  # (C,)
            # log-sum-exp by hand, in place, so one (C, V) fp32 buffer is all this chunk allocates.
            row_max = logits.amax(dim=-1)
            exp_shifted = logits.sub_(row_max[:, None]).exp_()
            sum_exp = exp_shifted.sum(dim=-1)
            log_norm = row_max + sum_exp.log()
            loss_sum += ((log_norm - target_logit) * counted).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum CE)/d(logits) = softmax - one_hot(target), zero on ignored rows; built in place.
            grad_logits = exp_shifted.div_(sum_exp[:, None])
            rows = torch.arange(t.shape[0], device=t.device)
            grad_logits[rows, safe_t] -= 1.0
            grad_logits.mul_(counted[:, None])
            # Back to the dtype of the forward matmul, as autograd would do; under autocast the
            # matmuls below cast `weight` and `h` the same way the forward one did.
            grad_logits = grad_logits.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_tokens] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss_sum):  # noqa: D102 (documented on the class)
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss_sum.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss_sum).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, counted targets) of the LM head `weight` [V, d] over hidden [..., d].

    targets [...] are already aligned with the hidden positions; IGNORE_INDEX rows are not
    counted. The mean is over counted targets, and 0 when there are none (a rank whose share of a
    partial last step is all padding contributes nothing instead of NaN).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    n_loss_tokens = (targets != IGNORE_INDEX).sum()
    loss_sum = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)
    return loss_sum / n_loss_tokens.clamp(min=1), n_loss_tokens
