"""Training metrics: the log window, the global loss of each step, the log line and the trackers.

Losses stay on the device until a log line is due; then one collective sums every pending step's
loss over ranks, and one gathers each rank's step time, forward time, data wait and memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lowmem_core.memory import format_bytes, process_memory, torch_cuda_memory
from trainer_low_mem.distributed import RankContext


@dataclass
class _Window:
    started: float = field(default_factory=time.perf_counter)
    wait_at_start: float = 0.0
    steps: int = 0
    step_s: float = 0.0
    forward_s: float = 0.0
    tokens: int = 0
    wait_started: float | None = None  # data-wait is timed from here (after the warm-up step)
    grad_norms: list[float] = field(default_factory=list)  # finite global norms of the steps


class Metrics:
    """Sums over one log window and the run's losses; `log` is a collective of every rank."""

    def __init__(
        self,
        ctx: RankContext,
        accelerator,
        *,
        wait_s_total: Callable[[], float],
        grad_norm: Callable[[], float] = lambda: math.nan,
        use_trackers: bool,
    ):
        self.ctx, self.accelerator = ctx, accelerator
        self._wait_s_total = wait_s_total
        self._grad_norm = grad_norm  # the global gradient norm of the last step (nan: unknown)
        self.use_trackers = use_trackers
        self.losses: list[float] = []  # global token-mean loss of each step of this process
        self._pending: list[tuple[torch.Tensor, int]] = []  # (local loss sum, global tokens)
        self._window = _Window(wait_at_start=wait_s_total())
        self._run_started = time.perf_counter()
        self._steps_done = 0  # steps this process ran (a resumed run counts from its start)

    def start_trackers(self, config: dict[str, Any]) -> None:
        if self.use_trackers:
            self.accelerator.init_trackers("train_low_mem", config=config)

    def end_trackers(self) -> None:
        if self.use_trackers:
            self.accelerator.end_training()

    def add_step(
        self, loss_sum: torch.Tensor, global_tokens: int, step_s: float, forward_s: float
    ) -> None:
        """Record one completed optimizer step (no collective)."""
        w = self._window
        w.steps += 1
        w.step_s += step_s
        w.forward_s += forward_s
        w.tokens += global_tokens
        norm = self._grad_norm()
        if math.isfinite(norm):
            w.grad_norms.append(norm)
        self._pending.append((loss_sum, global_tokens))
        if self._steps_done == 0 and w.steps == 1:
            # The first step includes warm-up (first batches, allocations): keep it out of the
            # data-wait fraction, which should point at a steady-state bottleneck.
            w.wait_at_start, w.wait_started = self._wait_s_total(), time.perf_counter()

    def flush_losses(self) -> list[float]:
        """Collective: the global loss of each step since the last flush."""
        if not self._pending:
            return []
        sums = self.ctx.sum_over_ranks([float(s.item()) for s, _ in self._pending])
        losses = [s / max(n, 1) for s, (_, n) in zip(sums, self._pending, strict=True)]
        self._pending.clear()
        self.losses.extend(losses)
        return losses

    def log(self, step: int, total_steps: int, host_limit_bytes: int, lr: float) -> str | None:
        """Collective: close the window; the log line on rank 0 (None elsewhere)."""
        losses = self.flush_losses()
        w, now = self._window, time.perf_counter()
        wall_s = max(now - w.started, 1e-9)
        steps = max(w.steps, 1)
        wait_wall_s = wall_s
        if w.wait_started is not None and w.steps > 1:
            wait_wall_s = max(now - w.wait_started, 1e-9)
        wait_frac = (self._wait_s_total() - w.wait_at_start) / wait_wall_s
        mine = (w.step_s / steps, w.forward_s / steps, wait_frac, process_memory().uss_bytes)
        per_rank = self.ctx.gather(mine)
        self._window = _Window(wait_at_start=self._wait_s_total())
        self._steps_done += w.steps
        elapsed_s = now - self._run_started
        eta_s = elapsed_s / max(self._steps_done, 1) * max(total_steps - step, 0)
        if not self.ctx.is_main or not losses:
            return None
        step_s = [r[0] for r in per_rank]
        forward_s = [r[1] for r in per_rank]
        wait_frac = max(r[2] for r in per_rank)
        job_uss_bytes = sum(r[3] for r in per_rank)
        loss = sum(losses) / len(losses)
        grad_norm = sum(w.grad_norms) / len(w.grad_norms) if w.grad_norms else math.nan
        tokens_per_s = w.tokens / wall_s
        mean_step_s = sum(step_s) / len(step_s)
        spread = (max(step_s) - min(step_s)) / mean_step_s if min(step_s) > 0 else 0.0
        line = (
            f"step: {step}/{total_steps}, loss: {loss:.4f}, lr: {lr:.3g}, "
            f"grad norm: {'n/a' if math.isnan(grad_norm) else f'{grad_norm:.3g}'}, "
            f"elapsed: {_clock(elapsed_s)}, eta: {_clock(eta_s)}, tokens/s: {tokens_per_s:,.0f}, "
            f"data-wait: {100 * wait_frac:.1f}%, {_device_memory(self.ctx.device)}, "
            f"host RAM: {format_bytes(job_uss_bytes)} job USS "
            f"(limit {format_bytes(host_limit_bytes)})"
        )
        if self.ctx.world_size > 1:
            line += (
                f", rank step s: {' '.join(f'{s:.4f}' for s in step_s)} "
                f"(spread {100 * spread:.1f}%), "
                f"rank forward s: {' '.join(f'{s:.4f}' for s in forward_s)}"
            )
        if self.use_trackers:
            self.accelerator.log(
                {
                    "loss": loss,
                    "tokens_per_s": tokens_per_s,
                    "data_wait_frac": wait_frac,
                    "lr": lr,
                    **({} if math.isnan(grad_norm) else {"grad_norm": grad_norm}),
                    "job_uss_bytes": job_uss_bytes,
                    "step_time_spread_frac": spread,
                },
                step=step,
            )
        return line


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _device_memory(device: torch.device) -> str:
    cuda = torch_cuda_memory(device)
    if cuda is None:
        return "gpu mem: cpu"
    total = torch.cuda.get_device_properties(cuda.device_index).total_memory
    return (
        f"gpu mem: {format_bytes(cuda.allocated_bytes)}/"
        f"{format_bytes(cuda.peak_allocated_bytes)}/{format_bytes(total)} (alloc/peak/total)"
    )
