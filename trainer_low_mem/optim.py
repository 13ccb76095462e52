"""Optimizer and learning-rate schedule of a run, and the DeepSpeed config fields the plan fills.

AdamW on matrices with weight decay and on 1-D gains without: torch's, or bitsandbytes'
AdamW8bit (blockwise 8-bit moments) when the plan chose `adamw_8bit`; DeepSpeedCPUAdam instead
when ZeRO offloads the optimizer to the CPU. The schedule is stepped by the loop once per optimizer
step (not given to accelerate, which would step it once per process).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lowmem_core.errors import ConfigError, require_extra
from lowmem_core.hub_kernels import require_extra_offline
from trainer_low_mem.config import OptimConfig
from trainer_low_mem.planner.optimizer_states import MIN_8BIT_SIZE


def warmup_cosine(
    warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> Callable[[int], float]:
    """LR factor of optimizer step s: linear warmup to 1, then cosine down to min_lr_ratio."""
    warmup = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Matrices decay; norm gains and other 1-D parameters do not. An empty group is left out
    (LoRA trains matrices only): DeepSpeed drops empty groups, and a schedule built over more
    groups than its optimizer has fails at the first step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: torch.nn.Module, o: OptimConfig, *, cpu_offload: bool, optimizer: str = "adamw"
):
    """AdamW over `param_groups`; DeepSpeed's CPU Adam when ZeRO offloads the optimizer.

    `optimizer` is the plan's choice, "adamw" or "adamw_8bit" (the planner refuses 8-bit states
    under DeepSpeed, so `cpu_offload` never meets it). Both take the same groups, betas, eps and
    decoupled weight decay, and the schedule drives their `lr` alike.
    """
    groups = param_groups(model, o.weight_decay)
    betas = (o.adam_beta1, o.adam_beta2)
    if cpu_offload:
        adam = require_extra("deepspeed.ops.adam", "deepspeed", "ZeRO CPU optimizer offload")
        return adam.DeepSpeedCPUAdam(groups, lr=o.lr, betas=betas, adamw_mode=True)
    if optimizer == "adamw_8bit":
        bnb = require_extra_offline("bitsandbytes.optim", "qlora", "--optimizer adamw_8bit")
        return bnb.AdamW8bit(groups, lr=o.lr, betas=betas, min_8bit_size=MIN_8BIT_SIZE)
    if optimizer != "adamw":
        raise ConfigError(f"unknown optimizer {optimizer!r}; use adamw or adamw_8bit")
    return torch.optim.AdamW(groups, lr=o.lr, betas=betas)


def build_scheduler(
    optimizer, o: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then cosine over the run's optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(o.warmup_steps, total_steps, o.min_lr_ratio)
    )


def optimizer_chain(optimizer) -> list[str]:
    """Class names from the outer wrapper to the optimizer doing the update (for the start line)."""
    names = []
    while optimizer is not None and len(names) < 4:
        names.append(type(optimizer).__name__)
        optimizer = getattr(optimizer, "optimizer", None)
    return names


def fill_deepspeed_config(
    accelerator, micro: int, accum: int, world_size: int, max_grad_norm: float
) -> None:
    """Put the plan's sizes into the DeepSpeed config's "auto" fields; refuse fixed ones that
    differ."""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in wanted.items():
        current = ds_config.get(key, "auto")
        if current != "auto" and current != value:
            raise ConfigError(
                f"the DeepSpeed config sets {key}={current} but this run needs {value} (from the "
                f'plan and --max_grad_norm); set it to "auto" in the DeepSpeed JSON'
            )
        ds_config[key] = value
    # accelerate checks its own accumulation count against the DeepSpeed config at prepare.
    accelerator.gradient_accumulation_steps = accum
