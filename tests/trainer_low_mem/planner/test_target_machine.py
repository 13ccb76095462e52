"""A plan for another machine takes what the flags say about it; `train` keeps this machine's
limits. The reasons say which numbers came from flags and which from this machine."""

from __future__ import annotations

import pytest

from lowmem_core.memory import HostMemory

GiB = 1 << 30
# The machine `plan` runs on: 23.5 GiB, no cgroup limit.
HERE = HostMemory(
    total_bytes=int(23.5 * GiB),
    available_bytes=20 * GiB,
    cgroup_limit_bytes=None,
    cgroup_current_bytes=None,
    page_cache_bytes=None,
)


def test_a_plan_for_another_machine_takes_its_given_host_limit_above_this_machines(gpu_plan):
    p = gpu_plan(host=HERE, host_ram_limit_bytes=32 * GiB, host_from_flags=True)
    assert p.host_limit_bytes == int(32 * GiB * 0.9)
    text = p.reasons["host_limit_bytes"].text
    assert text.startswith("--host_ram_limit 32.00 GiB of the target machine (not capped by this")


def test_train_caps_a_requested_host_limit_by_this_machine(gpu_plan):
    p = gpu_plan(host=HERE, host_ram_limit_bytes=32 * GiB)
    assert p.host_limit_bytes == int(23.5 * GiB * 0.9)
    assert "this machine's" in p.reasons["host_limit_bytes"].text


@pytest.mark.parametrize("from_flags", [True, False], ids=["plan", "train"])
def test_without_a_given_limit_the_reason_says_it_is_this_machines(gpu_plan, from_flags):
    p = gpu_plan(host=HERE, host_from_flags=from_flags)
    assert p.host_limit_bytes == int(23.5 * GiB * 0.9)
    text = p.reasons["host_limit_bytes"].text
    assert text.startswith("this machine's RAM")
    assert ("--host_ram_limit" in text) is from_flags  # plan says how to describe the target


@pytest.mark.parametrize(
    "num_cores, from_flags, says",
    [
        (16, True, "16 core(s) (--num_cores)"),
        (None, True, "core(s) of this machine (no --num_cores given for the target)"),
        (None, False, "core(s) of this machine /"),
    ],
)
def test_the_reader_reason_says_where_the_core_count_came_from(
    gpu_plan, num_cores, from_flags, says
):
    p = gpu_plan(num_cores=num_cores, host_from_flags=from_flags)
    assert says in p.reasons["num_readers"].text
