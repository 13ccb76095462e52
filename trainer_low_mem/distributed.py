"""Rank awareness in one place: create the Accelerator and wrap it in a small `RankContext`.

Everything else in the trainer asks the `RankContext` who it is (`rank`, `is_main`) and uses its
collectives (`all_reduce_min/max/sum`, `sum_over_ranks`, `gather`, `barrier`) instead of calling
torch.distributed or testing `rank == 0` itself.

Without CUDA the Accelerator is created for CPU, so `accelerate launch --multi_gpu
--num_processes 3` on a GPU-less machine forms one 3-rank gloo process group: three ranks of one
job, never three independent jobs writing one output directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# What gloo and NCCL say when a collective's peer is gone (its process died, its node went down).
_PEER_GONE = re.compile(
    r"(Connection (?:closed|reset) by peer(?: \[[^\]]*\]:\d+)?|NCCL communicator was aborted"
    r"|ncclRemoteError)"
)


def peer_lost(exc: BaseException) -> str:
    """The backend's words when `exc` is a collective (or the launcher's store) failing because
    another rank of the job is gone, else ""."""
    if isinstance(exc, dist.DistNetworkError):
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    found = _PEER_GONE.search(str(exc)) if isinstance(exc, RuntimeError) else None
    return found[1].strip() if found else ""


def report_to_launcher(exc: BaseException) -> None:
    """Under torchrun (`accelerate launch`), write this rank's one-line error where the launcher
    reads a failed rank's cause (TORCHELASTIC_ERROR_FILE, torch elastic's error-file format), so
    the launcher's failure report, printed after it, names it instead of a pointer to its docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    report = {
        "message": {"message": f"error: {exc}", "extraInfo": {"timestamp": str(int(time.time()))}}
    }
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(report))


def create_accelerator(
    *,
    mixed_precision: str,
    cpu_multiprocess: bool,
    deepspeed: bool = False,
    log_with: str | None = None,
    project_dir: Path | None = None,
):
    """The job's Accelerator; gradient accumulation is set later from the plan.

    `cpu_multiprocess` (several processes, no CUDA; see launch.detect_cpu_multiprocess): DDP runs
    get `cpu=True`, accelerate's MULTI_CPU/gloo path; DeepSpeed ignores `cpu=True`, so it gets an
    explicit gloo process group instead.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    kwargs: dict = {}
    if cpu_multiprocess:
        if deepspeed:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            kwargs["cpu"] = True
    if log_with is not None:
        kwargs["log_with"] = log_with
        kwargs["project_config"] = ProjectConfiguration(
            project_dir=str(project_dir), logging_dir=str(project_dir)
        )
    return Accelerator(mixed_precision=mixed_precision, **kwargs)


@dataclass
class RankContext:
    """Who this process is in the job, and the few collectives the trainer needs.

    With `world_size == 1` (or no process group) every collective returns its input unchanged.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    uses_deepspeed: bool = False
    cpu_group: object | None = (
        None  # gloo group for control values, so they never sync a GPU stream
    )

    @classmethod
    def from_accelerator(cls, accelerator) -> RankContext:
        from accelerate.utils import DistributedType

        world_size = accelerator.num_processes
        cpu_group = None
        if world_size > 1 and dist.is_initialized() and dist.get_backend() != "gloo":
            cpu_group = dist.new_group(backend="gloo")  # collective: every rank creates it
        return cls(
            rank=accelerator.process_index,
            world_size=world_size,
            local_rank=accelerator.local_process_index,
            device=accelerator.device,
            uses_deepspeed=accelerator.distributed_type == DistributedType.DEEPSPEED,
            cpu_group=cpu_group,
        )

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> RankContext:
        """A one-process context (tests, tools)."""
        return cls(rank=0, world_size=1, local_rank=0, device=torch.device(device))

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that prints, logs and writes shared files."""
        return self.rank == 0

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def _reduce(self, values: list[float], op) -> list[float]:
        if not self._distributed:
            return list(values)
        # Host values reduce on CPU tensors: through the default group when it is gloo, else
        # through the side gloo group, so a control value never waits on a GPU stream.
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op, group=self.cpu_group)
        return t.tolist()

    def _reduce_scalar(self, value, op):
        out = self._reduce([float(value)], op)[0]
        return int(out) if isinstance(value, int) else out

    def all_reduce_min(self, value: int | float) -> int | float:
        """The minimum of `value` over ranks (ints stay ints)."""
        return self._reduce_scalar(value, dist.ReduceOp.MIN)

    def all_reduce_max(self, value: int | float) -> int | float:
        """The maximum of `value` over ranks (ints stay ints)."""
        return self._reduce_scalar(value, dist.ReduceOp.MAX)

    def all_reduce_sum(self, value: int | float) -> int | float:
        """The sum of `value` over ranks (ints stay ints; exact up to 2**53)."""
        return self._reduce_scalar(value, dist.ReduceOp.SUM)

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Element-wise sums of `values` over ranks, in one collective."""
        return self._reduce([float(v) for v in values], dist.ReduceOp.SUM)

    def gather(self, value: T) -> list[T]:
        """Every rank's `value` (any picklable object), indexed by rank, on every rank."""
        if not self._distributed:
            return [value]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.cpu_group)
        return gathered

    def barrier(self) -> None:
        """Wait until every rank arrives."""
        if self._distributed:
            dist.barrier(group=self.cpu_group)

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. to create a directory); the others follow."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()
