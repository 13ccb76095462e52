"""Memory readings: cgroup v1/v2 files, host limit derivation, process USS/PSS, pinned counter, GPU
absence."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch

from lowmem_core import memory
from lowmem_core.errors import ConfigError
from lowmem_core.memory import (
    HostMemory,
    PinnedBytesCounter,
    effective_host_limit_bytes,
    format_bytes,
    host_memory,
    memory_snapshot,
    process_memory,
    read_cgroup_memory,
    torch_cuda_memory,
)

GiB = 1 << 30


def test_cgroup_v2_files_are_read(tmp_path):
    (tmp_path / "memory.max").write_text("8589934592\n")
    (tmp_path / "memory.current").write_text("123456789\n")
    (tmp_path / "memory.stat").write_text("anon 1000\nfile 4096000\nfile_mapped 12\n")
    cg = read_cgroup_memory(tmp_path)
    assert (cg.version, cg.limit_bytes, cg.current_bytes, cg.page_cache_bytes) == (
        2,
        8 * GiB,
        123456789,
        4096000,
    )


def test_cgroup_v2_max_means_no_limit(tmp_path):
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("5\n")
    cg = read_cgroup_memory(tmp_path)
    assert cg.limit_bytes is None and cg.current_bytes == 5 and cg.page_cache_bytes is None


def test_cgroup_v1_files_are_read_and_huge_limits_are_no_limit(tmp_path):
    (tmp_path / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "memory.usage_in_bytes").write_text("2000\n")
    (tmp_path / "memory.stat").write_text("cache 10\nrss 20\ntotal_cache 300\n")
    cg = read_cgroup_memory(tmp_path)
    assert (cg.version, cg.limit_bytes, cg.current_bytes, cg.page_cache_bytes) == (
        1,
        None,
        2000,
        300,
    )


def test_a_folder_without_memory_files_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="neither memory.max"):
        read_cgroup_memory(tmp_path)


def test_host_memory_takes_the_cgroup_readings(tmp_path):
    (tmp_path / "memory.max").write_text(f"{4 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{1 * GiB}\n")
    (tmp_path / "memory.stat").write_text("file 777\n")
    host = host_memory(tmp_path)
    assert host.cgroup_limit_bytes == 4 * GiB
    assert host.cgroup_current_bytes == 1 * GiB
    assert host.page_cache_bytes == 777
    assert host.total_bytes > 0 and 0 < host.available_bytes <= host.total_bytes
    assert host.limit_bytes == min(4 * GiB, host.total_bytes)


def test_effective_host_limit_is_the_tightest_bound_minus_the_margin():
    host = HostMemory(
        total_bytes=32 * GiB,
        available_bytes=20 * GiB,
        cgroup_limit_bytes=24 * GiB,
        cgroup_current_bytes=None,
        page_cache_bytes=None,
    )
    assert effective_host_limit_bytes(None, 0.1, host) == int(24 * GiB * 0.9)
    assert effective_host_limit_bytes(16 * GiB, 0.25, host) == 12 * GiB
    assert effective_host_limit_bytes(64 * GiB, 0.0, host) == 24 * GiB
    no_cgroup = HostMemory(32 * GiB, 20 * GiB, None, None, None)
    assert effective_host_limit_bytes(None, 0.5, no_cgroup) == 16 * GiB
    with pytest.raises(ConfigError, match="safety_frac"):
        effective_host_limit_bytes(None, 1.0, host)
    with pytest.raises(ConfigError, match="must be positive"):
        effective_host_limit_bytes(0, 0.1, host)


def test_process_memory_sums_children():
    alone = process_memory(include_children=False)
    assert alone.num_processes == 1
    assert 0 < alone.uss_bytes <= alone.pss_bytes <= alone.rss_bytes
    # Earlier tests in the same process may leave helpers alive (a multiprocessing resource
    # tracker, a compile worker): count the new child against what is already there.
    already = process_memory().num_processes
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        with_child = process_memory()
        assert with_child.num_processes == already + 1
        assert with_child.uss_bytes > process_memory(include_children=False).uss_bytes
    finally:
        child.communicate(b"")


def test_pinned_counter_is_thread_safe_and_tracks_the_peak():
    counter = PinnedBytesCounter()

    def churn():
        for _ in range(2000):
            counter.add(3)
            counter.release(3)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.current() == 0
    assert 3 <= counter.peak() <= 12
    counter.add(100)
    counter.reset_peak()
    assert counter.peak() == 100
    with pytest.raises(ValueError, match="cannot release 101"):
        counter.release(101)
    with pytest.raises(ValueError, match="negative"):
        counter.add(-1)


def test_without_nvml_there_are_no_gpus_and_a_readable_reason(monkeypatch):
    pynvml = pytest.importorskip("pynvml")

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    assert memory.gpu_memory() == []
    assert memory.gpu_summary().startswith("no GPU: NVML unavailable")


@pytest.mark.parametrize(
    "spec,expected",
    [
        (None, [0, 1, 2, 3]),
        ("2,0", [2, 0]),
        ("1,7,2", [1]),
        ("", []),
        ("GPU-bb", [1]),
        ("GPU-b,-1,3", [1]),
    ],
)
def test_cuda_visible_devices_maps_to_nvml_indices(monkeypatch, spec, expected):
    if spec is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    uuids = ["GPU-aa11", "GPU-bb22", "GPU-cc33", "GPU-dd44"]
    assert memory._visible_nvml_indices(4, uuids) == expected


def test_torch_cuda_memory_is_none_without_cuda_or_for_a_cpu_device():
    assert torch_cuda_memory("cpu") is None
    if not torch.cuda.is_available():
        assert torch_cuda_memory() is None


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.50 KiB"),
        (20 * GiB, "20.00 GiB"),
        (-2048, "-2.00 KiB"),
        (3 * 1024 * GiB, "3.00 TiB"),
        (None, "n/a"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_memory_snapshot_is_json_ready_and_complete():
    counter = PinnedBytesCounter()
    counter.add(4096)
    snap = memory_snapshot(include_children=False, pinned_counter=counter)
    json.dumps(snap)
    assert set(snap) == {
        "host",
        "process",
        "pinned_bytes",
        "pinned_peak_bytes",
        "gpus",
        "gpu_note",
        "torch_cuda",
    }
    assert snap["pinned_bytes"] == snap["pinned_peak_bytes"] == 4096
    assert snap["process"]["num_processes"] == 1
    if not snap["gpus"]:
        assert snap["gpu_note"].startswith("no GPU")
