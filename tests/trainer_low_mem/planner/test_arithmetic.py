"""plan(): the global batch invariant, the micro-batch band, ZeRO placement, host limits, errors."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lowmem_core.errors import ConfigError, MemoryLimitError
from lowmem_core.memory import host_memory
from pipeline.cost import BATCH_BYTES_PER_TOKEN, READER_SCRATCH_BYTES_PER_TOKEN, READER_THREAD_BYTES
from trainer_low_mem.planner.levers import Levers
from trainer_low_mem.planner.load_memory import LOAD_PRIVATE_BYTES_PER_PARAM

GiB, MiB = 1 << 30, 1 << 20
L = 512
P = 100_000_000
STATIC = P * (2 + 2 + 12)  # bf16 weights + bf16 grads + fp32 master and Adam moments
ACT_PER_SEQ = 100_000 * L


def per_seq_on_gpu(depth: int) -> int:
    """Activations plus the prefetcher's device copies: (depth + 1) batches of one sequence."""
    return ACT_PER_SEQ + (depth + 1) * BATCH_BYTES_PER_TOKEN * L


# -- the global batch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "global_batch,world_size", [(384, 3), (384, 1), (96, 4), (7, 7), (60, 5), (1, 1)]
)
@pytest.mark.parametrize("budget_gib", [2, 20, 80])
def test_micro_times_accum_times_world_is_the_global_batch(
    gpu_plan, global_batch, world_size, budget_gib
):
    p = gpu_plan(
        global_batch=global_batch, world_size=world_size, device_budget_bytes=budget_gib * GiB
    )
    assert p.micro_batch_per_rank * p.grad_accum_steps * p.world_size == global_batch
    assert (global_batch // world_size) % p.micro_batch_per_rank == 0
    assert p.device_peak_bytes_planned <= 0.92 * p.device_budget_bytes


def test_micro_batch_is_the_largest_divisor_under_the_band_top(gpu_plan):
    p = gpu_plan()  # 16 cores / 3 ranks -> 4 readers, depth 4
    assert (p.device_fixed_bytes, p.device_bytes_per_sequence) == (STATIC, per_seq_on_gpu(4))
    assert STATIC + 128 * per_seq_on_gpu(4) <= 0.92 * 20 * GiB
    assert (p.micro_batch_per_rank, p.grad_accum_steps) == (128, 1)

    tight = gpu_plan(device_budget_bytes=4 * GiB)
    fitting = [
        m for m in (1, 2, 4, 8, 16, 32, 64, 128) if STATIC + m * per_seq_on_gpu(4) <= 0.92 * 4 * GiB
    ]
    assert tight.micro_batch_per_rank == max(fitting) == 32
    assert tight.grad_accum_steps == 4
    assert tight.device_peak_bytes_planned == STATIC + 32 * per_seq_on_gpu(4)


def test_planned_peak_sits_in_the_band_when_the_divisors_allow_it(gpu_plan):
    budget = math.ceil((STATIC + 16 * per_seq_on_gpu(4)) / 0.90)
    p = gpu_plan(device_budget_bytes=budget)
    assert p.micro_batch_per_rank == 16
    assert 0.85 <= p.device_peak_bytes_planned / budget <= 0.92


def test_a_given_micro_batch_must_fit_the_whole_budget_not_the_band(gpu_plan):
    budget = STATIC + 32 * per_seq_on_gpu(4)  # 100% of the budget at micro 32
    assert gpu_plan(device_budget_bytes=budget).micro_batch_per_rank == 16
    given = gpu_plan(device_budget_bytes=budget, micro_batch_per_rank=32)
    assert (given.micro_batch_per_rank, given.grad_accum_steps) == (32, 4)
    # One byte less: fewer prefetch copies on the device make room; below depth 1's need, none.
    leaner = gpu_plan(device_budget_bytes=budget - 1, micro_batch_per_rank=32)
    assert (leaner.micro_batch_per_rank, leaner.prefetch_depth) == (32, 1)
    with pytest.raises(MemoryLimitError, match="no plan fits"):
        gpu_plan(device_budget_bytes=STATIC + 32 * per_seq_on_gpu(1) - 1, micro_batch_per_rank=32)


# -- model states -------------------------------------------------------------------------------


def test_zero2_partitions_grads_and_optimizer_and_offload_moves_states_to_host(gpu_plan):
    shard = math.ceil(P / 3)
    buckets = 2 * 768 * 768 * 2
    zero0, zero2 = gpu_plan(), gpu_plan(zero_stage=2)
    offload = gpu_plan(zero_stage=2, offload_optimizer=True)
    assert zero0.device_fixed_bytes == P * 2 + P * 2 + P * 12
    assert zero2.device_fixed_bytes == P * 2 + shard * 2 + buckets + shard * 12
    assert offload.device_fixed_bytes == P * 2 + shard * 2 + buckets
    # Host: 3 ranks x (reader stacks + the model's load peak, or the 16 B per offloaded
    # parameter where larger: the load copy is freed before the offloaded states exist).
    load = P * LOAD_PRIVATE_BYTES_PER_PARAM
    assert shard * 16 > load
    assert zero2.host_fixed_bytes == 3 * (4 * READER_THREAD_BYTES + load)
    assert offload.host_fixed_bytes == 3 * (4 * READER_THREAD_BYTES + shard * 16)


def test_only_trainable_parameters_get_gradients_and_optimizer_states(gpu_plan, model_memory):
    lora = dataclasses.replace(model_memory, trainable_count=1_000_000)
    p = gpu_plan(model=lora)
    assert p.device_fixed_bytes == P * 2 + 1_000_000 * (2 + 12)


def test_readers_and_depth_follow_cores_per_rank(gpu_plan):
    assert (gpu_plan(num_cores=16).num_readers, gpu_plan(num_cores=16).prefetch_depth) == (4, 4)
    assert (gpu_plan(num_cores=6).num_readers, gpu_plan(num_cores=6).prefetch_depth) == (1, 2)
    capped = gpu_plan(num_cores=64)
    assert capped.num_readers == 4
    assert capped.reasons["num_readers"].numbers["per_rank"] == 21


def test_pinned_pool_is_depth_plus_one_batches(gpu_plan):
    p = gpu_plan(num_cores=6)
    assert p.pin_memory is True
    assert p.pinned_pool_bytes == (p.prefetch_depth + 1) * p.micro_batch_per_rank * L * 24


# -- host limits --------------------------------------------------------------------------------


def write_cgroup_v2(folder, limit: str, current: int = 1 * GiB, file_bytes: int = 256 * MiB):
    folder.mkdir(exist_ok=True)
    (folder / "memory.max").write_text(limit + "\n")
    (folder / "memory.current").write_text(f"{current}\n")
    (folder / "memory.stat").write_text(f"anon 1000\nfile {file_bytes}\nkernel 20\n")
    return folder


def test_cgroup_limit_is_honoured_over_a_larger_request(gpu_plan, tmp_path):
    host = host_memory(cgroup_dir=write_cgroup_v2(tmp_path / "cg", str(8 * GiB)))
    p = gpu_plan(host=host, host_ram_limit_bytes=32 * GiB)
    assert p.host_limit_bytes == int(min(8 * GiB, host.total_bytes) * 0.9)
    assert p.host_bytes_planned <= p.host_limit_bytes
    assert p.reasons["host_limit_bytes"].numbers["cgroup_bytes"] == 8 * GiB


def test_requested_limit_below_the_machine_is_used_with_the_margin(gpu_plan):
    p = gpu_plan(host_ram_limit_bytes=10 * GiB, host_safety_frac=0.2)
    assert p.host_limit_bytes == int(10 * GiB * 0.8)


def test_dataset_that_fits_is_memory_mapped_and_counted_else_ultra_low_mem(gpu_plan):
    small = gpu_plan(host_ram_limit_bytes=8 * GiB, dataset_bytes=1 * GiB, zero_stage=2)
    big = gpu_plan(host_ram_limit_bytes=8 * GiB, dataset_bytes=40 * GiB, zero_stage=2)
    assert (small.ultra_low_mem, big.ultra_low_mem) == (False, True)
    assert small.host_bytes_planned - big.host_bytes_planned == 1 * GiB
    assert big.host_bytes_planned <= big.host_limit_bytes


def test_tight_host_lowers_prefetch_depth_then_readers_before_giving_up(gpu_plan):
    args = dict(num_cores=16, world_size=1, global_batch=8, host_safety_frac=0.0)
    base = gpu_plan(**args)
    assert (base.prefetch_depth, base.num_readers) == (4, 4)
    micro = base.micro_batch_per_rank
    d1_r4 = base.host_fixed_bytes + micro * (
        2 * L * BATCH_BYTES_PER_TOKEN + 4 * L * READER_SCRATCH_BYTES_PER_TOKEN
    )
    lowered = gpu_plan(**args, host_ram_limit_bytes=d1_r4 + 1)
    assert (lowered.prefetch_depth, lowered.num_readers) == (1, 4)
    assert "lowered from 4 to 1" in lowered.reasons["prefetch_depth"].text
    d1_r1 = (
        base.host_fixed_bytes
        - 3 * READER_THREAD_BYTES
        + micro * (2 * L * BATCH_BYTES_PER_TOKEN + L * READER_SCRATCH_BYTES_PER_TOKEN)
    )
    lowest = gpu_plan(**args, host_ram_limit_bytes=d1_r1)
    assert (lowest.prefetch_depth, lowest.num_readers) == (1, 1)
    assert lowest.host_bytes_planned == d1_r1
    with pytest.raises(MemoryLimitError, match="no plan fits"):
        gpu_plan(**args, host_ram_limit_bytes=d1_r1 - 1)


def test_offloaded_optimizer_that_cannot_fit_the_host_is_refused_before_training(gpu_plan):
    with pytest.raises(MemoryLimitError, match="offloaded optimizer takes .* --offload_optimizer"):
        gpu_plan(zero_stage=2, offload_optimizer=True, host_ram_limit_bytes=1 * GiB)


def test_cpu_training_budgets_host_ram(gpu_plan):
    p = gpu_plan(
        device_budget_bytes=None,
        num_gpus_visible=0,
        world_size=1,
        global_batch=64,
        host_ram_limit_bytes=10 * GiB,
        host_safety_frac=0.0,
    )
    assert (p.device, p.pin_memory, p.pinned_pool_bytes) == ("cpu", False, 0)
    assert p.device_budget_bytes == 10 * GiB
    assert p.host_bytes_planned == p.device_peak_bytes_planned <= 0.92 * 10 * GiB


def test_a_device_budget_on_cpu_caps_the_rank_share(gpu_plan):
    p = gpu_plan(
        device="cpu",
        device_budget_bytes=2 * GiB,
        world_size=1,
        global_batch=64,
        host_ram_limit_bytes=10 * GiB,
        host_safety_frac=0.0,
    )
    assert (p.device, p.device_budget_bytes) == ("cpu", 2 * GiB)
    assert p.device_peak_bytes_planned <= 0.92 * 2 * GiB


# -- errors -------------------------------------------------------------------------------------


def test_global_batch_not_divisible_by_world_size_says_what_would_work(gpu_plan):
    with pytest.raises(
        ConfigError, match=r"global batch 385 .* world size 3.*384 or 387.*5, 7, 11"
    ):
        gpu_plan(global_batch=385)


def test_forced_micro_batch_must_divide_the_per_rank_batch(gpu_plan):
    with pytest.raises(ConfigError, match=r"micro-batch 5 does not divide .* 128.*\[1, 2, 4, 8"):
        gpu_plan(micro_batch_per_rank=5)


def test_model_that_cannot_fit_one_sequence_names_the_remedies(gpu_plan):
    with pytest.raises(MemoryLimitError) as info:
        gpu_plan(device_budget_bytes=1 * GiB)
    message = str(info.value)
    assert "GPU at micro-batch 1" in message
    for remedy in ("--zero_stage 2", "--offload_optimizer=True", "--grad_checkpointing=True"):
        assert remedy in message


def test_the_remedies_are_named_as_the_given_levers_and_one_already_on_is_not_advised(gpu_plan):
    train_levers = Levers(
        zero_stage="zero_optimization.stage: 2 in ds.json",
        offload_optimizer="zero_optimization.offload_optimizer.device: cpu in ds.json",
        drop_offload="remove zero_optimization.offload_optimizer from ds.json",
    ).without_checkpointing_hint(grad_checkpointing_on=True)
    with pytest.raises(MemoryLimitError) as info:
        gpu_plan(device_budget_bytes=1 * GiB, levers=train_levers)
    message = str(info.value)
    assert "zero_optimization.stage: 2 in ds.json partitions" in message
    assert "zero_optimization.offload_optimizer.device: cpu in ds.json moves" in message
    assert "a shorter --max_seq_len cuts activations" in message
    assert "--zero_stage" not in message and "--grad_checkpointing" not in message


def test_invalid_settings_are_config_errors(gpu_plan):
    with pytest.raises(ConfigError, match="needs ZeRO stage 1 or 2"):
        gpu_plan(offload_optimizer=True)
    with pytest.raises(ConfigError, match="zero_stage must be 0, 1, 2 or 3, got 4"):
        gpu_plan(zero_stage=4)
    with pytest.raises(ConfigError, match="stage 3 shards the parameters"):
        gpu_plan(zero_stage=3)
    with pytest.raises(ConfigError, match="target_frac"):
        gpu_plan(target_frac=(0.95, 0.9))
