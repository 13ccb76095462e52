"""Out-of-memory agreement and backoff: every rank drops the step together, or none does.

A CUDA out-of-memory error (or an injected one: LOWMEM_INJECT_OOM_AT_STEP=k, optionally
LOWMEM_INJECT_OOM_RANK=r) is agreed on by all ranks wherever no gradient collective is in flight:
after every forward, and after the backward of non-final micro-batches under DDP (those run under
`accelerator.no_sync`). The loop then halves the micro-batch, doubles the accumulation and rebuilds
the data path at the last completed step. An OOM inside the gradient all-reduce (the final
backward; any DeepSpeed backward) or after DeepSpeed reduced part of a step stops the run with
MemoryLimitError: one rank cannot back off alone there.

DDP: a rank whose final forward succeeded has its reducer armed for a backward that never runs,
and its next backward would start an all-reduce the other ranks never join. Instead of resetting
the reducer (private state), every rank drops the wrapper and prepares the module again
(`rewrap_ddp`): a new DistributedDataParallel with the accelerator's arguments, no reducer
armed. DeepSpeed with several ranks: the agreed OOM can only be in micro-batch 0's forward (no
gradient exists yet); the engine takes the new sizes through `set_train_micro_batch_size` /
`set_train_batch_size`.

What a GPU test must confirm (the CPU tests inject the error; gloo cannot run out of memory):
1. DDP, 2+ GPUs, NCCL: a real torch.cuda.OutOfMemoryError on one rank in the final micro-batch's
   forward while the others succeed (their reducers armed), and one in a non-final backward; all
   ranks back off, the retried step completes without an NCCL timeout (run with a short
   TORCH_NCCL timeout), and the parameters are equal on every rank afterwards.
2. The old wrapper is freed: torch.cuda.memory_allocated() after the rewrap is no higher than
   before the failed step (DDP's buckets hold a gradient-sized copy), and `ensure_released`
   never fires.
3. bf16 autocast under DDP: after a rewrap the module's forward carries one autocast wrapper
   (loss of the retried step equals a fresh run at the halved micro-batch).
4. DeepSpeed ZeRO-2, with and without CPU offload: an OOM in micro-batch 0's forward, then the
   retried step matches a fresh run at the halved micro-batch (engine.gradient_accumulation_steps()
   is the new accumulation; no partially filled reduce bucket is carried over).
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch

from lowmem_core.errors import MemoryLimitError
from trainer_low_mem.distributed import RankContext

INJECT_OOM_ENV = "LOWMEM_INJECT_OOM_AT_STEP"
INJECT_OOM_RANK_ENV = "LOWMEM_INJECT_OOM_RANK"


class InjectedOutOfMemory(RuntimeError):
    """Stands in for a CUDA out-of-memory error when LOWMEM_INJECT_OOM_AT_STEP is set."""


OOM_ERRORS = (torch.cuda.OutOfMemoryError, InjectedOutOfMemory)


class OomInjector:
    """Raises InjectedOutOfMemory once, in micro-batch 0 of step LOWMEM_INJECT_OOM_AT_STEP."""

    def __init__(self, rank: int):
        at_step = os.environ.get(INJECT_OOM_ENV)
        only_rank = os.environ.get(INJECT_OOM_RANK_ENV)
        armed = at_step is not None and (only_rank is None or int(only_rank) == rank)
        self.at_step = int(at_step) if armed else None

    def maybe_raise(self, step: int, micro_index: int) -> None:
        """Call before micro-batch `micro_index`'s forward in optimizer step `step` (1-based)."""
        if self.at_step is None or micro_index != 0 or step != self.at_step:
            return
        self.at_step = None
        raise InjectedOutOfMemory(f"injected out-of-memory error at step {step} ({INJECT_OOM_ENV})")


def attempt(fn: Callable[..., Any], *args: Any) -> tuple[Any, str | None]:
    """(fn(*args), None), or (None, the first line of the out-of-memory error it raised)."""
    try:
        return fn(*args), None
    except OOM_ERRORS as exc:
        return None, (str(exc).splitlines() or [type(exc).__name__])[0]


def agreed_failure(ctx: RankContext, where: str, detail: str | None) -> str | None:
    """Collective: None when no rank failed at `where`, else one reason, the same on every rank."""
    details = ctx.gather(detail)
    failed = [r for r, d in enumerate(details) if d is not None]
    if not failed:
        return None
    return f"rank {', '.join(map(str, failed))}, {where}: {details[failed[0]]}"


def fatal_in_collective(rank: int, where: str, detail: str, advice: str) -> MemoryLimitError:
    """The error for an OOM where the ranks cannot agree (inside the gradient reduction);
    `advice` is the plan's, naming only levers that are off."""
    return MemoryLimitError(
        f"out of GPU memory inside the gradient reduction (rank {rank}, {where}: {detail}); the "
        f"ranks cannot back off together there: restart with a smaller --batch_size_per_gpu, or "
        f"{advice}"
    )


def rewrap_ddp(accelerator, model, optimizer) -> tuple[Any, Any]:
    """Collective: forget the prepared DDP model and optimizer and prepare them again.

    The new DistributedDataParallel gets the accelerator's arguments and a fresh reducer. The
    caller must drop its references to the old wrapper and then call `ensure_released`.
    """
    module = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # no stacked autocast
    base_optimizer = optimizer.optimizer
    accelerator.free_memory()  # drops accelerate's references; registered objects stay
    return accelerator.prepare(module, base_optimizer)


def ensure_released(old_wrapper: weakref.ref) -> None:
    """Raise when the old DDP wrapper is still alive: its reducer hooks would still fire."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if old_wrapper() is not None:
        raise RuntimeError(
            "the DistributedDataParallel wrapper dropped after an out-of-memory backoff is still "
            "referenced, so its reducer could start an all-reduce the other ranks never join; "
            "this is a bug"
        )


def backoff_message(step: int, reason: str, old, new, global_batch: int) -> str:
    """The line printed (and kept in TrainResult.backoffs) for one backoff."""
    return (
        f"out of memory at step {step} ({reason}): micro-batch {old.micro_batch_per_rank} -> "
        f"{new.micro_batch_per_rank}, accumulation {old.grad_accum_steps} -> "
        f"{new.grad_accum_steps}, global batch {global_batch} unchanged; retrying the step "
        "from the same data position"
    )
