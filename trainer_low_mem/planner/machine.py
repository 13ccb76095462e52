"""What the planner reads from the machine: usable cores, and the device each rank trains on."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from lowmem_core.errors import ConfigError
from lowmem_core.memory import format_bytes, gpu_memory, own_cgroup_dirs

DEVICES = ("cuda", "cpu")


def usable_cores(cgroup_dir: Path | str | None = None) -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 cpu.max quota."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    if cgroup_dir is not None:
        folders = [Path(cgroup_dir)]
    else:
        folders = [d for version, d in own_cgroup_dirs() if version == 2]
    for folder in folders:
        try:
            quota, period = (folder / "cpu.max").read_text().split()
        except (OSError, ValueError):
            continue
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return cores


@dataclass(frozen=True)
class Devices:
    """Where the ranks train and how much device memory each may use."""

    device: str  # "cuda", or "cpu" when training runs in host RAM
    ranks_per_node: int  # processes sharing this host's RAM
    budget_bytes: int | None  # GPU: the per-rank budget; CPU: a cap on the rank's host share
    budget_why: str  # how budget_bytes was found

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"


def detect_devices(
    world_size: int,
    budget_bytes: int | None = None,
    num_gpus_visible: int | None = None,
    ranks_per_node: int | None = None,
    device: str | None = None,
) -> Devices:
    """The device, ranks per node and per-rank budget, from the arguments or from NVML.

    `device` None means CUDA when a budget is given (planning for another machine's GPUs) or
    when NVML sees a GPU, else CPU. On CUDA without a budget, the least free memory over the
    visible GPUs is the budget.
    """
    if device is not None and device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if budget_bytes is not None and budget_bytes <= 0:
        raise ConfigError(f"the device budget must be positive, got {budget_bytes} bytes")
    gpus = None
    if num_gpus_visible is None and device != "cpu":
        gpus = gpu_memory()
        num_gpus_visible = len(gpus)
    num_gpus_visible = num_gpus_visible or 0
    if device is None:
        device = "cuda" if budget_bytes is not None or num_gpus_visible > 0 else "cpu"
    if ranks_per_node is None:
        ranks_per_node = min(world_size, num_gpus_visible) if num_gpus_visible > 0 else world_size
    if not 1 <= ranks_per_node <= world_size:
        raise ConfigError(
            f"ranks_per_node must be in [1, world_size={world_size}], got {ranks_per_node}"
        )
    if budget_bytes is not None:
        return Devices(device, ranks_per_node, budget_bytes, "given")
    if device == "cpu":
        return Devices(device, ranks_per_node, None, "")
    if not gpus:
        raise ConfigError(
            "planning for CUDA needs each rank's device budget: give --device_budget (e.g. "
            "20GiB), or plan on the machine with the GPUs"
        )
    least = min(g.free_bytes for g in gpus)
    listed = ", ".join(f"GPU {g.index} {format_bytes(g.free_bytes)}" for g in gpus)
    return Devices(
        device,
        ranks_per_node,
        least,
        f"least free memory over {len(gpus)} visible GPU(s) (NVML): {listed}",
    )
