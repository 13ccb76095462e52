"""What the planner reads from the machine: host RAM, usable cores, and the device each rank
trains on.

`train` plans for the machine it runs on: a requested host limit above what the machine has is
capped. `plan` describes the target machine with its flags (`host_from_flags`): a given
--host_ram_limit or --num_cores is the target's and taken as given; what is not given is read
from this machine, and the reasons say so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from lowmem_core.errors import ConfigError
from lowmem_core.memory import (
    HostMemory,
    effective_host_limit_bytes,
    format_bytes,
    gpu_memory,
    host_memory,
    own_cgroup_dirs,
)
from trainer_low_mem.planner.explain import Reason

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


def host_limit(
    requested_bytes: int | None,
    safety_frac: float,
    host: HostMemory | None = None,
    host_from_flags: bool = False,
) -> Reason:
    """The host RAM the plan may fill (the reason's value, in bytes) and where it came from.

    A limit given for the target machine (`host_from_flags`) is taken as given: only the
    planning margin comes off. Otherwise this machine's RAM and cgroup limit bound it (`host`: its
    reading; None reads it now).
    """
    margin = {"margin_frac": float(safety_frac)}
    if host_from_flags and requested_bytes is not None:
        limit = effective_host_limit_bytes(requested_bytes, safety_frac, _given(requested_bytes))
        why = (
            "--host_ram_limit {requested_bytes} of the target machine (not capped by this "
            "machine's RAM) x (1 - {margin_frac} margin)"
        )
        return Reason(
            "host_limit_bytes", limit, why, {"requested_bytes": requested_bytes, **margin}
        )
    host = host if host is not None else host_memory()
    numbers = {
        "requested_bytes": requested_bytes,
        "cgroup_bytes": host.cgroup_limit_bytes,
        "total_bytes": host.total_bytes,
        **margin,
    }
    limit = effective_host_limit_bytes(requested_bytes, safety_frac, host)
    if requested_bytes is None:
        why = "this machine's RAM: min(cgroup limit {cgroup_bytes}, total {total_bytes})"
        if host_from_flags:
            why += " (no --host_ram_limit given for the target machine)"
    else:
        why = (
            "min(--host_ram_limit {requested_bytes}, this machine's cgroup limit {cgroup_bytes} "
            "and total {total_bytes})"
        )
    return Reason("host_limit_bytes", limit, why + " x (1 - {margin_frac} margin)", numbers)


def _given(limit_bytes: int) -> HostMemory:
    """A machine known only by the host RAM the flags give it."""
    return HostMemory(limit_bytes, limit_bytes, None, None, None)


def cores(num_cores: int | None, host_from_flags: bool = False) -> tuple[int, str]:
    """The cores a plan shares among ranks, and where the count came from (for a reason)."""
    if num_cores is not None:
        return num_cores, f"{num_cores} core(s) (--num_cores)"
    found = usable_cores()
    where = f"{found} core(s) of this machine"
    return found, where + (" (no --num_cores given for the target)" if host_from_flags else "")


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
        return Devices(device, ranks_per_node, budget_bytes, "given (--device_budget)")
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
        f"this machine's GPUs: least free memory over {len(gpus)} visible (NVML): {listed}",
    )
