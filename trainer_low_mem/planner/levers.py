"""How the user turns each planning lever in the command they ran: `Levers`.

The planner's advice when nothing fits names a lever only as the user can change it: `plan`
takes flags, `train` takes its ZeRO settings from the accelerate/DeepSpeed config file
(trainer_low_mem/launch.py builds those). A lever already on is not advised again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Levers:
    zero_stage: str
    """Turns on ZeRO-2 (gradients and optimizer states partitioned over the ranks)."""
    offload_optimizer: str
    """Moves the optimizer states to host RAM."""
    drop_offload: str
    """Keeps the optimizer states on the GPU again."""
    grad_checkpointing: str | None = "--grad_checkpointing=True"
    """Recomputes activations in backward; None when it is already on."""
    shorter_rows: str = "a shorter --max_seq_len"
    host_ram: str = "raise --host_ram_limit, or run fewer ranks per node"

    def without_checkpointing_hint(self, grad_checkpointing_on: bool) -> Levers:
        if not grad_checkpointing_on:
            return self
        return dataclasses.replace(self, grad_checkpointing=None)


PLAN_FLAG_LEVERS = Levers(
    zero_stage="--zero_stage 2",
    offload_optimizer="--offload_optimizer=True (with --zero_stage 1 or 2)",
    drop_offload="drop --offload_optimizer",
)
