"""Training metrics: the log window, the global loss of each step, the log line, the step bar's
ETA and the trackers.

Losses and padding counts stay on the device until a log line is due; then one collective sums
every pending step's loss over ranks, and one gathers each rank's step time, forward time, data
wait, memory, positions and padding. Throughput is over training time, the steps' own wall time,
so evals and saves in a window do not lower it: `train tokens/s` counts every position through
the model (padding included; both rows of an encoder-decoder pair), `label tokens/s` the
positions with a label; per row (a pair of rows for an encoder-decoder), `useful positions/row`
counts the positions that are not padding and `label tokens/row` the labels. The ETA is the
run's average wall time per step (evals and saves included) times the steps left, one figure
for the log line and the progress bar.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lowmem_core.memory import format_bytes, process_memory, torch_cuda_memory
from trainer_low_mem.distributed import RankContext
from trainer_low_mem.progress import StepBar, clock, eta_seconds

Count = int | torch.Tensor  # a count, on the device until a log line reads it


def batch_positions(batch: Mapping[str, torch.Tensor], pad_id: int) -> tuple[int, Count]:
    """(positions, padding positions) of one micro-batch, every side of it counted (an
    encoder-decoder pair's encoder and decoder rows). Padding is what ends a row where the
    loaders wrote no token: a run of the pad id at row-start positions (0, or -1 in pair rows).
    The padding count stays on the batch's device."""
    positions: int = 0
    padding: Count = 0
    for key, ids in batch.items():
        if not key.endswith("input_ids"):
            continue
        rows = batch[key.removesuffix("input_ids") + "position_ids"]  # (B, L) int64
        empty = (ids == pad_id) & (rows <= 0)
        # The trailing run of each row: a product that stays 1 from the row's end inwards.
        padding = padding + empty.flip(-1).to(torch.int32).cumprod(-1).sum()
        positions += ids.numel()
    return positions, padding


@dataclass
class _Window:
    started: float = field(default_factory=time.perf_counter)
    wait_at_start: float = 0.0
    steps: int = 0
    step_s: float = 0.0
    forward_s: float = 0.0
    tokens: int = 0  # global label tokens
    positions: int = 0  # this rank's positions through the model
    rows: int = 0  # this rank's rows (batch entries) through the model
    padding: Count = 0  # this rank's padding positions
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
        pad_id: int,
    ):
        self.ctx, self.accelerator, self.pad_id = ctx, accelerator, pad_id
        self._wait_s_total = wait_s_total
        self._grad_norm = grad_norm  # the global gradient norm of the last step (nan: unknown)
        self.use_trackers = use_trackers
        self.losses: list[float] = []  # global token-mean loss of each step of this process
        self._pending: list[tuple[torch.Tensor, int]] = []  # (local loss sum, global tokens)
        self._window = _Window(wait_at_start=wait_s_total())
        self._run_started = time.perf_counter()
        self._last_step_at = self._run_started
        self._steps_done = 0  # steps this process ran (a resumed run counts from its start)
        self._step, self._total_steps = 0, 0
        self._bar: StepBar | None = None
        # The running step's positions, padding and rows.
        self._step_counts: tuple[int, Count, int] = (0, 0, 0)

    def start_trackers(self, config: dict[str, Any]) -> None:
        if self.use_trackers:
            self.accelerator.init_trackers("train_low_mem", config=config)

    def end_trackers(self) -> None:
        if self.use_trackers:
            self.accelerator.end_training()

    def progress_bar(self, total_steps: int, initial_step: int, enabled: bool) -> StepBar:
        """The step bar, advanced by `add_step` with the log line's ETA."""
        self._step, self._total_steps = initial_step, total_steps
        self._bar = StepBar(total_steps, initial_step, enabled)
        return self._bar

    def count_batches(self, batches: list[Mapping[str, torch.Tensor]]) -> None:
        """This rank's micro-batches of the step about to run (no sync). A step retried after an
        out-of-memory backoff counts the batches it reads again instead."""
        positions, padding = 0, 0
        for batch in batches:
            n, pad = batch_positions(batch, self.pad_id)
            positions, padding = positions + n, padding + pad
        rows = sum(batch["input_ids"].shape[0] for batch in batches)
        self._step_counts = (positions, padding, rows)

    def add_step(
        self, loss_sum: torch.Tensor, global_tokens: int, step_s: float, forward_s: float
    ) -> None:
        """Record one completed optimizer step (no collective)."""
        w = self._window
        w.steps += 1
        w.step_s += step_s
        w.forward_s += forward_s
        w.tokens += global_tokens
        positions, padding, rows = self._step_counts
        w.positions, w.padding = w.positions + positions, w.padding + padding
        w.rows += rows
        self._step_counts = (0, 0, 0)
        norm = self._grad_norm()
        if math.isfinite(norm):
            w.grad_norms.append(norm)
        self._pending.append((loss_sum, global_tokens))
        self._steps_done += 1
        self._step += 1
        self._last_step_at = time.perf_counter()
        if self._steps_done == 1:
            # The first step includes warm-up (first batches, allocations): keep it out of the
            # data-wait fraction, which should point at a steady-state bottleneck.
            w.wait_at_start, w.wait_started = self._wait_s_total(), self._last_step_at
        if self._bar is not None:
            self._bar.advance(self._eta_s(self._step, self._total_steps))

    def _eta_s(self, step: int, total_steps: int) -> float:
        """Seconds to `total_steps` from `step`, as of the last completed step."""
        elapsed_s = self._last_step_at - self._run_started
        return eta_seconds(elapsed_s, self._steps_done, total_steps - step)

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
        uss_bytes = process_memory().uss_bytes
        mine = (
            w.step_s,
            w.forward_s / steps,
            wait_frac,
            uss_bytes,
            w.positions,
            int(w.padding),
            w.rows,
        )
        per_rank = self.ctx.gather(mine)
        self._window = _Window(wait_at_start=self._wait_s_total())
        elapsed_s, eta_s = now - self._run_started, self._eta_s(step, total_steps)
        if not self.ctx.is_main or not losses:
            return None
        step_s = [r[0] / steps for r in per_rank]
        forward_s = [r[1] for r in per_rank]
        wait_frac = max(r[2] for r in per_rank)
        job_uss_bytes = sum(r[3] for r in per_rank)
        positions, padding = sum(r[4] for r in per_rank), sum(r[5] for r in per_rank)
        train_s = max(max(r[0] for r in per_rank), 1e-9)  # the slowest rank's time in steps
        loss = sum(losses) / len(losses)
        grad_norm = sum(w.grad_norms) / len(w.grad_norms) if w.grad_norms else math.nan
        train_tokens_per_s, label_tokens_per_s = positions / train_s, w.tokens / train_s
        padding_frac = padding / max(positions, 1)
        rows = max(sum(r[6] for r in per_rank), 1)
        useful_per_row, label_tokens_per_row = (positions - padding) / rows, w.tokens / rows
        mean_step_s = sum(step_s) / len(step_s)
        spread = (max(step_s) - min(step_s)) / mean_step_s if min(step_s) > 0 else 0.0
        line = (
            f"step: {step}/{total_steps}, loss: {loss:.4f}, lr: {lr:.3g}, "
            f"grad norm: {'n/a' if math.isnan(grad_norm) else f'{grad_norm:.3g}'}, "
            f"elapsed: {clock(elapsed_s)}, eta: {clock(eta_s)}, "
            f"train tokens/s: {train_tokens_per_s:,.0f}, "
            f"label tokens/s: {label_tokens_per_s:,.0f}, padding: {100 * padding_frac:.1f}%, "
            f"useful positions/row: {useful_per_row:.1f}, "
            f"label tokens/row: {label_tokens_per_row:.1f}, "
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
                    "train_tokens_per_s": train_tokens_per_s,
                    "label_tokens_per_s": label_tokens_per_s,
                    "padding_frac": padding_frac,
                    "useful_positions_per_row": useful_per_row,
                    "label_tokens_per_row": label_tokens_per_row,
                    "data_wait_frac": wait_frac,
                    "lr": lr,
                    **({} if math.isnan(grad_norm) else {"grad_norm": grad_norm}),
                    "job_uss_bytes": job_uss_bytes,
                    "step_time_spread_frac": spread,
                },
                step=step,
            )
        return line


def _device_memory(device: torch.device) -> str:
    cuda = torch_cuda_memory(device)
    if cuda is None:
        return "gpu mem: cpu"
    total = torch.cuda.get_device_properties(cuda.device_index).total_memory
    return (
        f"gpu mem: {format_bytes(cuda.allocated_bytes)}/"
        f"{format_bytes(cuda.peak_allocated_bytes)}/{format_bytes(total)} (alloc/peak/total)"
    )
