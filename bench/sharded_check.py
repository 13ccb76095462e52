"""`bench plan`'s sharded cases: the planner's FSDP2 rank against real 2-rank CPU steps.

The planner traces the step on fake tensors with the FSDP2 placement (planner/sharding.py:
fp32 shards of parameters, gradients and AdamW moments, two gathered blocks and the root). The
reference is torch's `MemTracker` in each of two gloo ranks spawned here, around real steps of
the model sharded as the trainer shards it (`trainer_low_mem.fsdp.shard_model`: `fully_shard`
on every transformer block, then the root; bf16 compute, fp32 reduction), in the order
`bench plan` measures unsharded cases: the optimizer step, then an accumulating micro-step. The
rank with the larger peak is the reading.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from bench.plan_check import TRACED_MICRO_BATCHES, Case, Row, Slope, compare, step_peak_bytes
from trainer_low_mem.planner.trace import trace_step_memory

WORLD_SIZE = 2


@dataclass(frozen=True)
class ShardedCase:
    """A `Case` trained by `WORLD_SIZE` FSDP2 ranks, optionally with parameters in host RAM."""

    case: Case
    offload_params: bool = False

    @property
    def name(self) -> str:
        return f"{self.case.name} fsdp2 x{WORLD_SIZE}" + (" offload" if self.offload_params else "")


def sharded_cases(quick: bool) -> list[ShardedCase]:
    from bench.plan_check import _hf, _preset

    out = [
        ShardedCase(Case("hf-llama L=256", _hf("llama", False), 8192, 256, (1, 3, 6), "bf16")),
        ShardedCase(Case("hf-llama L=256 ckpt", _hf("llama", True), 8192, 256, (1, 3, 6), "bf16")),
        ShardedCase(Case("hf-gpt2 L=256", _hf("gpt2", False), 8192, 256, (1, 3, 6), "bf16")),
        ShardedCase(Case("tiny L=256", _preset("tiny", False), 259, 256, (1, 3, 8), "bf16")),
    ]
    return out[:1] if quick else out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_peak(rank: int, port: int, name: str, micro_batch: int, out) -> None:
    """One rank: shard the case's model as the trainer does, step it, report MemTracker's peak.
    The case is found again by `name`: its factories are closures, which spawn cannot send."""
    import torch.distributed as dist

    from trainer_low_mem.fsdp import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        sharded = next(c for c in sharded_cases(quick=False) if c.name == name)
        case = sharded.case
        torch.manual_seed(0)
        model = (case.real_factory or case.factory)()
        shard_model(
            model,
            mixed_precision=case.mixed_precision or "no",
            offload_params=sharded.offload_params,
            device=torch.device("cpu"),
        )
        out.put((rank, step_peak_bytes(case, model, micro_batch)))
    finally:
        dist.destroy_process_group()


def real_sharded_peak_bytes(sharded: ShardedCase, micro_batch: int) -> int:
    """The larger rank's MemTracker peak of `WORLD_SIZE` spawned FSDP2 ranks."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = _free_port()
    mp.start_processes(
        _rank_peak,
        args=(port, sharded.name, micro_batch, queue),
        nprocs=WORLD_SIZE,
        join=True,
        start_method="spawn",
    )
    return max(queue.get()[1] for _ in range(WORLD_SIZE))


def check_sharded_case(sharded: ShardedCase) -> tuple[list[Row], Slope]:
    """The planner's FSDP2 rank against the peak of two real gloo ranks, at each micro-batch."""
    case = sharded.case
    traced = trace_step_memory(
        case.factory,
        seq_len=case.seq_len,
        micro_batches=TRACED_MICRO_BATCHES,
        device_type="cpu",
        mixed_precision=case.mixed_precision,
        sharding="fsdp2",
        offload_params=sharded.offload_params,
        world_size=WORLD_SIZE,
    )
    return compare(sharded.name, case, traced, lambda m: real_sharded_peak_bytes(sharded, m))
