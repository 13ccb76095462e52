"""Attention arguments that keep packed samples apart in a Hugging Face model, for the trainer
and for users' own loops (README: "The data path in your own loop").

A packed row holds several samples back to back; the loader restarts `position_ids` at 0 at
each one. Given only those position ids, SDPA and eager attention let every token see every
earlier token of the row, other samples included (Qwen3's logits move by more than 1 there), so
they need a block-diagonal causal mask. Flash-attention kernels read the sample boundaries off
the position ids themselves (transformers turns them into cumulative sequence lengths when no
mask is given, for a batch of one row), so they need the batch as one row and nothing else.
"""

from __future__ import annotations

import torch

from trainer_low_mem.model import document_causal_mask


def sample_isolation(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attn_implementation: str,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Keyword arguments for an HF model's forward (`model(use_cache=False, **these)`) under
    which each packed sample of a batch attends only to itself.

    input_ids, position_ids: (B, L) int64, position 0 where each sample starts (a loader batch's
    "input_ids" and "position_ids").
    attn_implementation: the model's, as loaded (`from_pretrained(attn_implementation=...)`,
    `model.config._attn_implementation`). "sdpa" and "eager" (and any implementation not known
    to read boundaries off the position ids) get the ids, the position ids and an additive
    (B, 1, L, L) `attention_mask` in `dtype` (the model's compute dtype: 0 where allowed, the
    dtype's minimum elsewhere; B * L * L elements, 64 MiB in fp32 for one 4096-token row).
    Flash-attention implementations ("flash_attention_2", "flash_attention_3", kernels named
    "...flash...") get the batch flattened to one (1, B * L) row: transformers finds packed
    samples in the position ids only for a batch of one row (and then runs the variable-length
    kernel over them), so every row's restart at position 0 becomes a sample boundary there and
    no mask is built. The outputs are then (1, B * L, ...): `.view(B, L, ...)` gives the rows
    back, and the chunked loss flattens either shape alike. sdpa and eager are tested on the
    CPU, flash_attention_2 by `bench gpu`.
    """
    if "flash" in attn_implementation:
        return {"input_ids": input_ids.reshape(1, -1), "position_ids": position_ids.reshape(1, -1)}
    if not dtype.is_floating_point:
        dtype = torch.float32
    allowed = document_causal_mask(position_ids)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}
