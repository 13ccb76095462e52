"""Attention arguments that keep packed samples apart in a Hugging Face model, for the trainer
and for users' own loops (README: "The data path in your own loop").

A packed row holds several samples back to back; the loader restarts `position_ids` at 0 at
each one. Given only those position ids, SDPA and eager attention let every token see every
earlier token of the row, other samples included (Qwen3's logits move by more than 1 there), so
they need a block-diagonal causal mask. Flash-attention kernels read the sample boundaries off
the position ids themselves (transformers turns them into cumulative sequence lengths when no
mask is given), so the position ids are all they need.
"""

from __future__ import annotations

import torch

from trainer_low_mem.model import document_causal_mask


def sample_isolation(
    position_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Keyword arguments for an HF model's forward (`model(input_ids=..., **these)`) under which
    each packed sample of a batch attends only to itself.

    position_ids: (B, L) int64, 0 where each sample starts (a loader batch's "position_ids").
    attn_implementation: the model's, as loaded (`from_pretrained(attn_implementation=...)`,
    `model.config._attn_implementation`): "sdpa" or "eager" get `position_ids` and an additive
    (B, 1, L, L) `attention_mask` in `dtype` (the model's compute dtype: 0 where allowed, the
    dtype's minimum elsewhere; B * L * L elements, so 64 MiB in fp32 for one 4096-token row);
    flash-attention implementations ("flash_attention_2", "flash_attention_3", kernels named
    "...flash...") get `position_ids` alone. Any other implementation gets the mask too, as
    the trainer gives it. sdpa and eager are tested on the CPU, flash_attention_2 by `bench gpu`.
    """
    if "flash" in attn_implementation:
        return {"position_ids": position_ids}
    if not dtype.is_floating_point:
        dtype = torch.float32
    allowed = document_causal_mask(position_ids)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return {"position_ids": position_ids, "attention_mask": mask}
