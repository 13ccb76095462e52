"""Facts about the machine a benchmark ran on: CPU, RAM, GPUs and library versions.

Recorded in every report so that figures from different machines are never compared blindly.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

import psutil

_VERSIONED = (
    "torch",
    "numpy",
    "numba",
    "pyarrow",
    "datasets",
    "accelerate",
    "deepspeed",
    "lowmem-pipeline",
)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict:
    """Cores, RAM, cgroup limit, GPUs (NVML) and versions, as a JSON-ready dict."""
    from lowmem_core import memory

    host = memory.host_memory()
    usable_cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    gpus = memory.gpu_memory()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "usable_cores": usable_cores,
        "ram_total_bytes": host.total_bytes,
        "ram_available_bytes": host.available_bytes,
        "cgroup_limit_bytes": host.cgroup_limit_bytes,
        "gpus": [
            {
                "index": g.index,
                "name": g.name,
                "total_bytes": g.total_bytes,
                "free_bytes": g.free_bytes,
            }
            for g in gpus
        ],
        "gpu_summary": memory.gpu_summary(),
        "versions": {name: _version(name) for name in _VERSIONED},
    }


def describe(facts: dict) -> str:
    """One line for the console and docs, e.g. '2 cores (AMD EPYC ...), 23.5 GiB RAM, no GPU'."""
    gpus = facts["gpus"]
    gpu_text = (
        ", ".join(f"{g['name']} ({g['total_bytes'] / 2**30:.0f} GiB)" for g in gpus)
        if gpus
        else "no GPU"
    )
    return (
        f"{facts['usable_cores']} cores ({facts['cpu_model']}), "
        f"{facts['ram_total_bytes'] / 2**30:.1f} GiB RAM, {gpu_text}; "
        f"torch {facts['versions']['torch']}, python {facts['python']}"
    )
