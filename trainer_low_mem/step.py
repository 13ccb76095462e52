"""One optimizer step over `accumulation` micro-batches, with the accumulation driven explicitly.

Non-final micro-batches run under `accelerator.no_sync` (DDP) or with DeepSpeed's accumulation
boundary unset (DeepSpeed's documented manual-boundary style: `engine.step()` once after the
final backward), so no library step counter has to agree with the plan. The step's loss is the
mean over every counted target token of the step, on all ranks and micro-batches: each
micro-batch's summed loss is scaled by `accumulation * world_size / tokens_in_step` before
backward, which cancels the `1/accumulation` of accelerate (or DeepSpeed) and the `1/world_size`
of the gradient all-reduce, so neither depends on how the global batch is split.

Activation offload (the plan's `offload_activations`): each forward runs under the hooks of
planner/saved_activations.py, so what autograd saves for backward waits in (pinned) host RAM and
comes back during backward; only the forward is wrapped, so a checkpointed layer's recompute in
backward keeps its activations on the device for the moment it needs them.

Divergence guard: a step whose loss or global gradient norm is not finite (on any rank) is
skipped, as DeepSpeed and AMP skip fp16 overflows: gradients dropped, no optimizer or schedule
step, so no non-finite weight is ever saved. `max_bad_steps` consecutive skips stop the run with
a DivergenceError; the last saved state stays as it was.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref

import torch

from lowmem_core.errors import DivergenceError, MemoryLimitError
from lowmem_core.format import IGNORE_INDEX
from trainer_low_mem import fsdp, oom, zero3
from trainer_low_mem.distributed import RankContext
from trainer_low_mem.loss import shift_labels
from trainer_low_mem.planner.saved_activations import offload_saved_activations

StepOutcome = tuple[torch.Tensor, int, float]  # (local loss sum, global tokens, forward seconds)


class Stepper:
    """Runs optimizer steps on the prepared model and optimizer (replaced after a DDP rewrap)."""

    def __init__(
        self,
        accelerator,
        ctx: RankContext,
        model,
        optimizer,
        scheduler,
        *,
        labels_shifted: bool = False,
        max_grad_norm: float,
        max_bad_steps: int = 3,
        offload_activations: bool = False,
        memory_advice: str = "try a shorter --max_seq_len",
        fsdp2: bool = False,
    ):
        self.accelerator, self.ctx = accelerator, ctx
        self.labels_shifted = labels_shifted  # the batch spec's (pipeline/batch_spec.py)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.engine = model if ctx.uses_deepspeed else None  # the DeepSpeed engine
        self.max_grad_norm = max_grad_norm
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0  # consecutive skipped (non-finite) steps
        self.last_grad_norm = math.nan  # global norm before clipping of the last step
        self.skipped = False  # whether the last step was skipped
        self.injector = oom.OomInjector(ctx.rank)
        self.offload_activations = offload_activations
        self.memory_advice = memory_advice  # the plan's: only levers that are off
        self.fsdp2 = fsdp2  # the model is sharded by trainer_low_mem/fsdp.py, not accelerate
        self.zero3 = self.engine is not None and zero3.is_partitioned(model)

    def set_sizes(self, micro_batch: int, accumulation: int, global_batch: int) -> None:
        """Give accelerate and DeepSpeed the plan's micro-batch and accumulation."""
        if self.engine is not None:
            self.engine.set_train_micro_batch_size(micro_batch)
            self.engine.set_train_batch_size(global_batch)
        self.accelerator.gradient_accumulation_steps = accumulation

    def run(self, micro_batches: list[dict[str, torch.Tensor]], step: int) -> StepOutcome | str:
        """Optimizer step `step` (1-based) over this rank's micro-batches, or the agreed reason
        of an out-of-memory error (every rank returns the same one; nothing was updated)."""
        ctx, accum = self.ctx, len(micro_batches)
        counts = [_target_count(mb["labels"], self.labels_shifted) for mb in micro_batches]
        global_tokens = int(ctx.all_reduce_sum(int(torch.stack(counts).sum().item())))
        scale = accum * ctx.world_size / max(global_tokens, 1)
        loss_sum = torch.zeros((), dtype=torch.float32, device=ctx.device)
        forward_s = 0.0
        for i, mb in enumerate(micro_batches):
            last = i == accum - 1
            with self._gradient_sync(last):
                t0 = time.perf_counter()
                token_loss_sum, detail = oom.attempt(self._forward, mb, step, i)
                forward_s += time.perf_counter() - t0
                if detail is not None and self.fsdp2 and ctx.world_size > 1:
                    raise fsdp.out_of_memory(ctx.rank, f"micro-batch {i} forward", detail)
                if detail is not None and self.zero3 and ctx.world_size > 1:
                    raise zero3.out_of_memory(
                        ctx.rank, f"micro-batch {i} forward", detail, self.memory_advice
                    )
                failure = oom.agreed_failure(ctx, f"micro-batch {i} forward", detail)
                if failure is not None:
                    if self.engine is not None and i > 0:
                        # DeepSpeed has already reduced this step's earlier micro-batches into
                        # its gradient partitions, which cannot be rolled back from here.
                        raise MemoryLimitError(
                            f"out of memory in a DeepSpeed step ({failure}); restart with a "
                            f"smaller --batch_size_per_gpu, or {self.memory_advice}"
                        )
                    return failure
                _, detail = oom.attempt(self._backward, token_loss_sum * scale, last)
                # Non-final DDP backward passes run no collective, so ranks can still agree; the
                # final one (and every DeepSpeed one) is inside the gradient reduction.
                if ctx.world_size == 1 or (not last and self.engine is None and not self.fsdp2):
                    failure = oom.agreed_failure(ctx, f"micro-batch {i} backward", detail)
                    if failure is not None:
                        return failure
                elif detail is not None and self.fsdp2:
                    raise fsdp.out_of_memory(ctx.rank, f"micro-batch {i} backward", detail)
                elif detail is not None:
                    raise oom.fatal_in_collective(
                        ctx.rank, f"micro-batch {i} backward", detail, self.memory_advice
                    )
                loss_sum += token_loss_sum.detach()
        self._optimizer_step(loss_sum, step)
        return loss_sum, global_tokens, forward_s

    def reset_after_oom(self) -> None:
        """Collective, after an agreed OOM: drop the step's gradients and any armed DDP reducer."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.engine is not None:
            zero3.release_gathered(self.engine)
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            stale = weakref.ref(self.model)
            self.model, self.optimizer = oom.rewrap_ddp(
                self.accelerator, self.model, self.optimizer
            )
            oom.ensure_released(stale)

    # -- parts of a step ----------------------------------------------------------------------
    def _gradient_sync(self, last: bool):
        """DDP and FSDP2 reduce gradients in the final micro-batch's backward only."""
        if self.fsdp2:
            fsdp.set_gradient_sync(self.model, last)
            return contextlib.nullcontext()
        if last or self.engine is not None:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    def _forward(self, micro_batch: dict[str, torch.Tensor], step: int, index: int) -> torch.Tensor:
        """Summed token loss of one micro-batch."""
        self.injector.maybe_raise(step, index)
        with self._saved_activations():
            out = self.model(**micro_batch)  # the loader's keys: decoder-only, or encoder-decoder
        return out.loss * out.n_loss_tokens

    def _saved_activations(self):
        """Where the forward's saved activations wait for backward: host RAM under offload."""
        if not self.offload_activations:
            return contextlib.nullcontext()
        device = self.ctx.device
        return offload_saved_activations(
            self.model.parameters(), device, pin_memory=device.type == "cuda"
        )

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(loss)
        else:
            self.accelerator.backward(loss)

    def _optimizer_step(self, loss_sum: torch.Tensor, step: int) -> None:
        finite = math.isfinite(float(loss_sum))
        grad_norm = float("nan")
        if self.engine is None and finite:
            # The gradients are reduced already: every rank sees the same global norm.
            limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
            if self.fsdp2:
                grad_norm = fsdp.clip_grad_norm(self.model.parameters(), limit)
            else:
                grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), limit))
            finite = math.isfinite(grad_norm)
        self.last_grad_norm = grad_norm
        bad = int(not finite)
        if self.ctx.world_size > 1:
            bad = self.ctx.all_reduce_max(bad)  # a skip is agreed: every rank skips or none
        self.skipped = bool(bad)
        if self.skipped:
            if self.engine is not None:
                self.engine.zero_grad()
            self.optimizer.zero_grad(set_to_none=True)
            self._count_bad_step(step, f"loss sum {float(loss_sum)}, grad norm {grad_norm}")
            return
        if self.engine is not None:
            if not self._deepspeed_step(step):
                return
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps = 0
        # Only accelerate's optimizer wrapper skips (an fp16 overflow); FSDP2 runs without it.
        if self.fsdp2 or not self.optimizer.step_was_skipped:
            self.scheduler.step()

    def _deepspeed_step(self, step: int) -> bool:
        """DeepSpeed clips, steps and zeroes the gradients; its ZeRO optimizer finds a non-finite
        gradient norm itself (the same on every rank) and skips the update. Returns whether the
        update was applied; a skip counts as a bad step."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        finite_norm = norm is None or math.isfinite(float(norm))
        self.last_grad_norm = math.nan if norm is None else float(norm)
        if self.engine.was_step_applied():
            if finite_norm:
                return True
            # Applied with a non-finite norm (bf16 without overflow checks): the weights are
            # lost, so nothing of this run may be saved any more.
            raise DivergenceError(
                f"training diverged: DeepSpeed applied a step with gradient norm {norm} at step "
                f"{step}; the last saved state is unchanged: resume it with a lower --lr"
            )
        self.skipped = True
        self._count_bad_step(step, f"grad norm {norm}, skipped by DeepSpeed")
        return False

    def _count_bad_step(self, step: int, detail: str) -> None:
        self.bad_steps += 1
        if self.bad_steps >= self.max_bad_steps:
            raise DivergenceError(
                f"training diverged: {self.bad_steps} consecutive steps up to step {step} had "
                f"a non-finite loss or gradient norm (last: {detail}) and were skipped; the last "
                "saved state is unchanged: resume it with a lower --lr (or --max_grad_norm), or "
                "raise --max_bad_steps"
            )


def _target_count(labels: torch.Tensor, labels_shifted: bool) -> torch.Tensor:
    """Tokens with a target: labels already aligned with their positions (an encoder-decoder's)
    count as they are; a decoder-only batch's are shifted by the model first."""
    return ((labels if labels_shifted else shift_labels(labels)) != IGNORE_INDEX).sum()
