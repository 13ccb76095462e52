"""Plan: derived plans recompute every dependent field; saved plans round-trip consistently."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lowmem_core.errors import ConfigError, MemoryLimitError
from pipeline.cost import BATCH_BYTES_PER_TOKEN
from trainer_low_mem.planner import Plan

GiB = 1 << 30
DEPENDENT = (
    "pinned_pool_bytes",
    "device_budget_bytes",
    "device_peak_bytes_planned",
    "host_bytes_planned",
    "device_fixed_bytes",
    "device_bytes_per_sequence",
    "host_fixed_bytes",
    "host_bytes_per_sequence",
)


def expected_fields(p: Plan) -> dict[str, int]:
    """The dependent fields as the footprint gives them at p's settings."""
    fp = p.footprint
    lines = fp.lines(p.prefetch_depth, p.num_readers, p.ultra_low_mem)
    m = p.micro_batch_per_rank
    return {
        "pinned_pool_bytes": (p.prefetch_depth + 1) * m * p.seq_len * BATCH_BYTES_PER_TOKEN
        if p.pin_memory
        else 0,
        "device_budget_bytes": lines.budget_bytes,
        "device_peak_bytes_planned": lines.device_fixed_bytes + m * lines.device_bytes_per_sequence,
        "host_bytes_planned": lines.host_fixed_bytes + m * lines.host_bytes_per_sequence,
        "device_fixed_bytes": lines.device_fixed_bytes,
        "device_bytes_per_sequence": lines.device_bytes_per_sequence,
        "host_fixed_bytes": lines.host_fixed_bytes,
        "host_bytes_per_sequence": lines.host_bytes_per_sequence,
    }


def assert_consistent(p: Plan) -> None:
    assert p.micro_batch_per_rank * p.grad_accum_steps * p.world_size == p.global_batch
    assert {k: getattr(p, k) for k in DEPENDENT} == expected_fields(p)
    for name in (
        "grad_accum_steps",
        "device_peak_bytes_planned",
        "host_bytes_planned",
        "pinned_pool_bytes",
    ):
        assert p.reasons[name].value == getattr(p, name), name


# -- derived plans ------------------------------------------------------------------------------


def test_with_micro_batch_keeps_the_global_batch_and_recomputes_memory(gpu_plan):
    p = gpu_plan(device_budget_bytes=4 * GiB)
    half = p.with_micro_batch(p.micro_batch_per_rank // 2, "test")
    assert half.micro_batch_per_rank == p.micro_batch_per_rank // 2
    assert half.grad_accum_steps == 2 * p.grad_accum_steps
    assert half.global_batch == p.global_batch
    assert half.device_peak_bytes_planned == (
        p.device_fixed_bytes + half.micro_batch_per_rank * p.device_bytes_per_sequence
    )
    assert half.pinned_pool_bytes == p.pinned_pool_bytes // 2
    assert_consistent(half)
    reason = half.reasons["micro_batch_per_rank"]
    assert (reason.value, reason.numbers["old"], reason.numbers["why"]) == (16, 32, "test")
    with pytest.raises(ConfigError, match="does not divide"):
        p.with_micro_batch(3, "test")


def test_backoff_halves_to_a_valid_divisor_until_one(gpu_plan):
    p = gpu_plan(global_batch=36, world_size=3, micro_batch_per_rank=12)
    steps = [p.micro_batch_per_rank]
    while steps[-1] > 1:
        p = p.backoff()
        steps.append(p.micro_batch_per_rank)
        assert p.micro_batch_per_rank * p.grad_accum_steps * 3 == 36
        assert_consistent(p)
    assert steps == [12, 6, 3, 1]
    assert "halved after running out of memory" in p.reasons["micro_batch_per_rank"].text
    with pytest.raises(MemoryLimitError, match="out of memory at micro-batch 1"):
        p.backoff()


@pytest.mark.parametrize(
    "derive",
    [
        lambda p: p.with_prefetch_depth(1, "x"),
        lambda p: p.with_num_readers(1, "x"),
        lambda p: p.with_ultra_low_mem("x"),
        lambda p: p.with_micro_batch(8, "x"),
        lambda p: p.backoff(),
    ],
)
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_derived_plans_saved_and_loaded_have_every_field_recomputed(gpu_plan, derive, device):
    budget = 4 * GiB if device == "cuda" else None
    p = gpu_plan(
        device=device,
        device_budget_bytes=budget,
        dataset_bytes=2 * GiB,
        host_ram_limit_bytes=64 * GiB,
    )
    derived = derive(p)
    assert derived != p
    loaded = Plan.from_dict(json.loads(json.dumps(derived.to_dict())))
    assert loaded == derived
    assert_consistent(loaded)


def test_shallower_prefetch_shrinks_the_pool_and_the_device_copies(gpu_plan):
    p = gpu_plan(device_budget_bytes=4 * GiB)
    assert p.prefetch_depth == 4
    shallow = p.with_prefetch_depth(1, "host RAM watchdog")
    m, L = p.micro_batch_per_rank, p.seq_len
    assert shallow.pinned_pool_bytes == 2 * m * L * BATCH_BYTES_PER_TOKEN
    assert p.device_bytes_per_sequence - shallow.device_bytes_per_sequence == (
        3 * L * BATCH_BYTES_PER_TOKEN
    )
    assert shallow.host_bytes_planned < p.host_bytes_planned
    assert shallow.reasons["prefetch_depth"].numbers == {
        "depth": 1,
        "old": 4,
        "why": "host RAM watchdog",
    }


def test_ultra_low_mem_takes_the_dataset_out_of_host_bytes(gpu_plan):
    p = gpu_plan(dataset_bytes=2 * GiB, host_ram_limit_bytes=64 * GiB)
    assert p.ultra_low_mem is False
    ultra = p.with_ultra_low_mem("host RAM watchdog")
    assert p.host_bytes_planned - ultra.host_bytes_planned == 2 * GiB
    assert ultra.reasons["ultra_low_mem"].value is True


def test_on_cpu_ultra_low_mem_raises_the_rank_budget(gpu_plan):
    p = gpu_plan(
        device="cpu",
        device_budget_bytes=None,
        world_size=1,
        global_batch=8,
        dataset_bytes=2 * GiB,
        host_ram_limit_bytes=10 * GiB,
        host_safety_frac=0.0,
    )
    ultra = p.with_ultra_low_mem("x")
    assert (p.device_budget_bytes, ultra.device_budget_bytes) == (8 * GiB, 10 * GiB)
    assert ultra.reasons["device_budget_bytes"].numbers["dataset_bytes"] == 0


def test_derive_arguments_are_checked(gpu_plan):
    p = gpu_plan()
    with pytest.raises(ConfigError, match="prefetch depth must be a positive integer"):
        p.with_prefetch_depth(0, "x")
    with pytest.raises(ConfigError, match="reader count must be a positive integer"):
        p.with_num_readers(0, "x")


# -- serialisation ------------------------------------------------------------------------------


def test_plan_round_trips_through_json(gpu_plan):
    p = gpu_plan(dataset_bytes=3 * GiB)
    d = json.loads(json.dumps(p.to_dict()))
    assert Plan.from_dict(d) == p
    assert d["reasons"]["grad_accum_steps"]["text"].startswith("1 = global 384")
    with pytest.raises(ConfigError, match="footprint is malformed"):
        Plan.from_dict({**d, "footprint": {"seq_len": 512}})
    del d["seq_len"]
    with pytest.raises(ConfigError, match="missing: seq_len"):
        Plan.from_dict(d)


def test_a_plan_edited_behind_its_footprint_is_refused(gpu_plan):
    p = gpu_plan()
    with pytest.raises(ConfigError, match="breaks the global batch"):
        Plan.from_dict({**p.to_dict(), "grad_accum_steps": p.grad_accum_steps + 1})
    with pytest.raises(ConfigError, match=r"plan field pinned_pool_bytes .* Plan\.with_\*\(\)"):
        dataclasses.replace(p, prefetch_depth=1)


def test_plans_saved_with_the_old_gpu_names_load(gpu_plan):
    p = gpu_plan()
    old = p.to_dict()
    del old["footprint"]
    old["micro_batch_per_gpu"] = old.pop("micro_batch_per_rank")
    old["gpu_budget_bytes"] = old.pop("device_budget_bytes")
    old["gpu_peak_bytes_planned"] = old.pop("device_peak_bytes_planned")
    old["reasons"] = {
        "micro_batch_per_gpu": "largest divisor {of} the per-rank batch",
        "gpu_budget_bytes": "given",
    }
    loaded = Plan.from_dict(old)
    assert loaded.micro_batch_per_rank == p.micro_batch_per_rank
    assert loaded.device_budget_bytes == p.device_budget_bytes
    assert loaded.device_peak_bytes_planned == p.device_peak_bytes_planned
    assert loaded.reasons["micro_batch_per_rank"].text == "largest divisor {of} the per-rank batch"
    assert "device_budget_bytes" in loaded.table()
    with pytest.raises(ConfigError, match="saved without its memory footprint"):
        loaded.backoff()
