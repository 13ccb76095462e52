"""Machine readings: cores under a cgroup quota, and which device a plan is for."""

from __future__ import annotations

import pytest

from lowmem_core.errors import ConfigError
from trainer_low_mem.planner import detect_devices, usable_cores

GiB = 1 << 30


def test_usable_cores_honours_a_cgroup_cpu_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cores(tmp_path) == min(2, usable_cores(tmp_path / "absent"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == usable_cores(tmp_path / "absent")


def test_a_given_budget_means_cuda_and_ranks_default_to_the_visible_gpus():
    d = detect_devices(world_size=3, budget_bytes=20 * GiB, num_gpus_visible=0)
    assert (d.device, d.on_gpu, d.ranks_per_node, d.budget_bytes) == ("cuda", True, 3, 20 * GiB)
    two_gpus = detect_devices(world_size=4, budget_bytes=20 * GiB, num_gpus_visible=2)
    assert two_gpus.ranks_per_node == 2


def test_without_gpu_or_budget_the_plan_is_for_cpu():
    d = detect_devices(world_size=2, num_gpus_visible=0)
    assert (d.device, d.ranks_per_node, d.budget_bytes) == ("cpu", 2, None)
    assert detect_devices(world_size=1, device="cpu", budget_bytes=GiB).device == "cpu"


def test_impossible_device_settings_are_config_errors():
    with pytest.raises(ConfigError, match="ranks_per_node must be in"):
        detect_devices(world_size=2, num_gpus_visible=0, ranks_per_node=3)
    with pytest.raises(ConfigError, match="needs each rank's device budget: give --device_budget"):
        detect_devices(world_size=1, num_gpus_visible=2)
    with pytest.raises(ConfigError, match="device must be one of cuda, cpu"):
        detect_devices(world_size=1, device="tpu")
