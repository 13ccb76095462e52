"""Memory readings: host and cgroup limits, per-process USS/PSS, pinned bytes, GPU and torch memory.

Private memory (USS), proportionally shared memory (PSS) and page cache are reported apart, so
that pages of a memory-mapped dataset -- shared by every reader and rank, and reclaimable -- are
not mistaken for a leak. Every reading is a small dataclass; `memory_snapshot()` gathers them
into one dict for logs and checkpoints. Nothing here needs an NVIDIA GPU: without one the GPU
readings are empty and `gpu_summary()` says why.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

from lowmem_core.errors import ConfigError

CGROUP_MOUNT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX rounded to the page size (about 2^63); any
# limit this large is no limit at all.
_NO_LIMIT_BYTES = 1 << 60


# ----------------------------------------------------------------------------------------------
# Host and cgroup
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupMemory:
    """The memory controller of the cgroup this process runs in."""

    version: int  # 1 or 2
    path: str  # the cgroup folder the readings came from
    limit_bytes: int | None  # memory.max (v2) / memory.limit_in_bytes (v1); None when unlimited
    current_bytes: int | None  # memory.current / memory.usage_in_bytes, page cache included
    page_cache_bytes: int | None  # memory.stat `file` (v2) / `total_cache` (v1)


@dataclass(frozen=True)
class HostMemory:
    """Host RAM as this process sees it: the machine's totals and its cgroup's limit and usage."""

    total_bytes: int
    available_bytes: int  # what the kernel could hand out without swapping (psutil `available`)
    cgroup_limit_bytes: int | None
    cgroup_current_bytes: int | None
    page_cache_bytes: int | None  # the cgroup's page cache when there is one, else the host's

    @property
    def limit_bytes(self) -> int:
        """The tighter of the machine's RAM and the cgroup limit."""
        if self.cgroup_limit_bytes is None:
            return self.total_bytes
        return min(self.total_bytes, self.cgroup_limit_bytes)


def _read_int_file(path: Path) -> int | None:
    """An integer file of a cgroup; None when absent, unreadable or `max`."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    value = int(text)
    return None if value >= _NO_LIMIT_BYTES else value


def _read_stat_field(path: Path, field: str) -> int | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(" ")
        if key == field:
            return int(value)
    return None


def own_cgroup_dirs() -> list[tuple[int, Path]]:
    """(version, folder) of this process's memory cgroup, leaf first, then its ancestors (v2).

    Limits of ancestors apply too, so for v2 each ancestor up to the mount is listed. In a
    container the path in /proc/self/cgroup may not exist under the mount (the namespace root
    is mounted instead); the mount root is then the process's cgroup.
    """
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    v2_path = v1_path = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    if v2_path is not None and (CGROUP_MOUNT / "cgroup.controllers").exists():
        leaf = CGROUP_MOUNT / v2_path.lstrip("/")
        if not leaf.is_dir():
            leaf = CGROUP_MOUNT
        dirs = [leaf, *[p for p in leaf.parents if p.is_relative_to(CGROUP_MOUNT)]]
        return [(2, d) for d in dirs]
    if v1_path is not None:
        mount = CGROUP_MOUNT / "memory"
        leaf = mount / v1_path.lstrip("/")
        # v1 already reports the hierarchical limit in memory.stat `hierarchical_memory_limit`,
        # but memory.limit_in_bytes of the leaf is what a container runtime sets.
        return [(1, leaf if leaf.is_dir() else mount)]
    return []


def read_cgroup_memory(cgroup_dir: Path | str | None = None) -> CgroupMemory | None:
    """The memory limit, usage and page cache of a cgroup; None when there is no memory cgroup.

    `cgroup_dir` points at one cgroup folder (v2 when it holds memory.max, v1 when it holds
    memory.limit_in_bytes); by default this process's own cgroup is found from /proc/self/cgroup,
    and for v2 the tightest memory.max of it and its ancestors is the limit.
    """
    if cgroup_dir is not None:
        folder = Path(cgroup_dir)
        if (folder / "memory.max").exists() or (folder / "memory.current").exists():
            candidates = [(2, folder)]
        elif (folder / "memory.limit_in_bytes").exists():
            candidates = [(1, folder)]
        else:
            raise ConfigError(
                f"{folder} holds neither memory.max (cgroup v2) nor memory.limit_in_bytes (cgroup "
                "v1); point at a cgroup folder with a memory controller"
            )
    else:
        candidates = own_cgroup_dirs()
        if not candidates:
            return None
    version, leaf = candidates[0]
    if version == 2:
        limits = [_read_int_file(d / "memory.max") for _, d in candidates]
        known = [x for x in limits if x is not None]
        current = _read_int_file(leaf / "memory.current")
        cache = _read_stat_field(leaf / "memory.stat", "file")
        if not known and current is None:
            return None  # the memory controller is not enabled for this cgroup
        return CgroupMemory(2, str(leaf), min(known) if known else None, current, cache)
    return CgroupMemory(
        1,
        str(leaf),
        _read_int_file(leaf / "memory.limit_in_bytes"),
        _read_int_file(leaf / "memory.usage_in_bytes"),
        _read_stat_field(leaf / "memory.stat", "total_cache"),
    )


def host_memory(cgroup_dir: Path | str | None = None) -> HostMemory:
    """Host RAM totals from psutil, and the cgroup's limit/usage/page cache (see
    read_cgroup_memory)."""
    vm = psutil.virtual_memory()
    cgroup = read_cgroup_memory(cgroup_dir)
    page_cache = cgroup.page_cache_bytes if cgroup is not None else None
    if page_cache is None:
        page_cache = getattr(vm, "cached", None)  # Linux only
    return HostMemory(
        total_bytes=int(vm.total),
        available_bytes=int(vm.available),
        cgroup_limit_bytes=cgroup.limit_bytes if cgroup is not None else None,
        cgroup_current_bytes=cgroup.current_bytes if cgroup is not None else None,
        page_cache_bytes=None if page_cache is None else int(page_cache),
    )


DEFAULT_HOST_SAFETY_FRAC = 0.10


def effective_host_limit_bytes(
    requested: int | None = None,
    safety_frac: float = DEFAULT_HOST_SAFETY_FRAC,
    host: HostMemory | None = None,
) -> int:
    """The host RAM a run may plan for: min(requested, cgroup limit, total) x (1 - safety_frac).

    The margin leaves room for the kernel, the page cache of the code itself and whatever else
    runs on the machine; a requested limit above what the machine has is capped, not trusted.
    """
    if not 0.0 <= safety_frac < 1.0:
        raise ConfigError(f"safety_frac must be in [0, 1), got {safety_frac}")
    if requested is not None and requested <= 0:
        raise ConfigError(f"requested host RAM limit must be positive, got {requested} bytes")
    host = host if host is not None else host_memory()
    base = host.limit_bytes if requested is None else min(requested, host.limit_bytes)
    return int(base * (1.0 - safety_frac))


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessMemory:
    """Memory of a process (and, when asked, its descendants), summed over processes."""

    uss_bytes: int  # private: freed if the processes exited
    pss_bytes: int  # private + each shared page divided by the processes sharing it
    rss_bytes: int  # resident, shared pages counted in full
    shared_bytes: int  # resident pages shared with other processes (mapped files included)
    num_processes: int


def process_memory(pid: int | None = None, include_children: bool = True) -> ProcessMemory:
    """USS/PSS/RSS/shared of `pid` (default: this process) and, by default, all its descendants.

    Descendants that exit or cannot be read while being measured are skipped.
    """
    root = psutil.Process(pid)
    procs = [root, *(root.children(recursive=True) if include_children else [])]
    uss = pss = rss = shared = count = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            if proc is root:
                raise
            continue
        uss += info.uss
        pss += getattr(info, "pss", info.uss)
        rss += info.rss
        shared += getattr(info, "shared", 0)
        count += 1
    return ProcessMemory(uss, pss, rss, shared, count)


# ----------------------------------------------------------------------------------------------
# Pinned host memory held by the pipeline
# ----------------------------------------------------------------------------------------------


class PinnedBytesCounter:
    """Thread-safe count of page-locked host bytes held, and the peak since the last reset."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current_bytes = 0
        self._peak_bytes = 0

    def add(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"cannot add a negative byte count ({nbytes})")
        with self._lock:
            self._current_bytes += nbytes
            self._peak_bytes = max(self._peak_bytes, self._current_bytes)

    def release(self, nbytes: int) -> None:
        with self._lock:
            if not 0 <= nbytes <= self._current_bytes:
                raise ValueError(
                    f"cannot release {nbytes} pinned bytes, {self._current_bytes} are held"
                )
            self._current_bytes -= nbytes

    def current(self) -> int:
        with self._lock:
            return self._current_bytes

    def peak(self) -> int:
        with self._lock:
            return self._peak_bytes

    def reset_peak(self) -> None:
        with self._lock:
            self._peak_bytes = self._current_bytes


# The process-wide counter: every Prefetcher adds its pinned pool here.
PINNED_BYTES = PinnedBytesCounter()


# ----------------------------------------------------------------------------------------------
# GPUs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory as NVML reports it (all processes on the device counted)."""

    index: int  # NVML (physical) index
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int


def _visible_nvml_indices(count: int, uuids: list[str]) -> list[int]:
    """NVML indices of the devices CUDA_VISIBLE_DEVICES exposes, in CUDA order."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return list(range(count))
    chosen = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            break
        if token.lstrip("-").isdigit():
            index = int(token)
            if not 0 <= index < count:
                break  # CUDA ignores this entry and everything after it
            chosen.append(index)
        else:
            match = [i for i, uuid in enumerate(uuids) if uuid.startswith(token)]
            if len(match) != 1:
                break
            chosen.append(match[0])
    return chosen


def _read_nvml() -> tuple[list[GpuMemory], str | None]:
    try:
        import pynvml
    except ImportError:
        return [], "no GPU: nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [], f"no GPU: NVML unavailable ({exc})"
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = [_as_str(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        gpus = []
        for index in _visible_nvml_indices(count, uuids):
            info = pynvml.nvmlDeviceGetMemoryInfo(handles[index])
            name = _as_str(pynvml.nvmlDeviceGetName(handles[index]))
            gpus.append(GpuMemory(index, name, int(info.total), int(info.free), int(info.used)))
    except pynvml.NVMLError as exc:
        return [], f"no GPU: NVML query failed ({exc})"
    finally:
        pynvml.nvmlShutdown()
    if not gpus:
        return [], "no GPU: NVML found no visible NVIDIA device (check CUDA_VISIBLE_DEVICES)"
    return gpus, None


def _as_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def gpu_memory() -> list[GpuMemory]:
    """Memory of each visible NVIDIA GPU (CUDA_VISIBLE_DEVICES honoured); [] without one."""
    return _read_nvml()[0]


def gpu_summary() -> str:
    """One line per visible GPU, or why there is none (e.g. `no GPU: NVML unavailable (...)`)."""
    gpus, reason = _read_nvml()
    if reason is not None:
        return reason
    return "\n".join(
        f"GPU {g.index} {g.name}: {format_bytes(g.used_bytes)} used, {format_bytes(g.free_bytes)} "
        f"free of {format_bytes(g.total_bytes)}"
        for g in gpus
    )


@dataclass(frozen=True)
class TorchCudaMemory:
    """The torch caching allocator's view of one device (this process only)."""

    device_index: int
    allocated_bytes: int  # held by live tensors
    reserved_bytes: int  # held by the caching allocator (allocated + cached free blocks)
    peak_allocated_bytes: int  # since start or the last torch.cuda.reset_peak_memory_stats
    peak_reserved_bytes: int


def torch_cuda_memory(device=None) -> TorchCudaMemory | None:
    """torch allocated/reserved/peak bytes of `device` (default: current); None without CUDA or for
    a CPU device."""
    import torch

    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        return None
    index = torch.cuda.current_device() if dev.index is None else dev.index
    return TorchCudaMemory(
        device_index=index,
        allocated_bytes=torch.cuda.memory_allocated(index),
        reserved_bytes=torch.cuda.memory_reserved(index),
        peak_allocated_bytes=torch.cuda.max_memory_allocated(index),
        peak_reserved_bytes=torch.cuda.max_memory_reserved(index),
    )


# ----------------------------------------------------------------------------------------------
# Formatting and the one-call snapshot
# ----------------------------------------------------------------------------------------------


def format_bytes(n: int | float | None) -> str:
    """Binary units with two decimals past KiB: 0 B, 512 B, 1.50 KiB, 20.00 GiB; `n/a` for None."""
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024.0
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.2f} {unit}"
    raise AssertionError("unreachable")


def memory_snapshot(
    pid: int | None = None,
    include_children: bool = True,
    device=None,
    cgroup_dir: Path | str | None = None,
    pinned_counter: PinnedBytesCounter = PINNED_BYTES,
) -> dict:
    """Every reading of this module as one JSON-ready dict (bytes throughout)."""
    gpus, gpu_reason = _read_nvml()
    cuda = torch_cuda_memory(device)
    return {
        "host": dataclasses.asdict(host_memory(cgroup_dir)),
        "process": dataclasses.asdict(process_memory(pid, include_children)),
        "pinned_bytes": pinned_counter.current(),
        "pinned_peak_bytes": pinned_counter.peak(),
        "gpus": [dataclasses.asdict(g) for g in gpus],
        "gpu_note": gpu_reason,
        "torch_cuda": None if cuda is None else dataclasses.asdict(cuda),
    }
