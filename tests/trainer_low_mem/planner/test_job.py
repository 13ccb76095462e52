"""plan_for_job: the trainer's and the plan command's one path from a config to a Plan."""

from __future__ import annotations

import pytest

from lowmem_core.errors import ConfigError
from trainer_low_mem.config import (
    DataConfig,
    JobConfig,
    MemoryConfig,
    PlanConfig,
    PlanDataConfig,
    TrainingConfig,
)
from trainer_low_mem.model import resolve_preset
from trainer_low_mem.planner import agree_across_ranks, plan_for_job

TINY = resolve_preset("tiny")


def job(**training) -> JobConfig:
    return JobConfig(
        data=DataConfig(max_seq_len=64, num_readers=None),
        training=TrainingConfig(**training),
        memory=MemoryConfig(host_ram_limit="4GiB"),
    )


def test_the_job_plan_keeps_the_global_batch_and_counts_the_preset():
    p = plan_for_job(job(global_batch=12), TINY, world_size=3, device="cpu", num_cores=8)
    assert p.micro_batch_per_rank * p.grad_accum_steps * 3 == 12
    assert (p.device, p.seq_len, p.world_size) == ("cpu", 64, 3)
    assert p.reasons["model_memory"].numbers["source"] == "analytic"
    assert p.reasons["model_memory"].numbers["params"] == f"{TINY.param_count():,}"


def test_given_micro_batch_and_readers_are_kept_with_their_reasons():
    cfg = job(global_batch=12, batch_size_per_gpu=2)
    cfg.data.num_readers = 3
    p = plan_for_job(cfg, TINY, world_size=3, device="cpu", num_cores=8)
    assert (p.micro_batch_per_rank, p.grad_accum_steps, p.num_readers) == (2, 2, 3)
    assert p.reasons["num_readers"].numbers["why"] == "given (--num_readers)"
    assert p.reasons["micro_batch_per_rank"].text.startswith("given (--batch_size_per_gpu)")


def test_without_auto_plan_one_reader_fills_batches():
    cfg = job(global_batch=4, batch_size_per_gpu=2)
    cfg.memory.auto_plan = False
    p = plan_for_job(cfg, TINY, world_size=1, device="cpu", num_cores=8)
    assert p.num_readers == 1
    assert "--auto_plan=False" in p.reasons["num_readers"].text


def test_ranks_agree_on_the_smallest_micro_batch():
    p = plan_for_job(
        job(global_batch=48),
        TINY,
        world_size=3,
        device="cpu",
        num_cores=8,
        all_reduce_min=lambda x: min(x, 4),
    )
    assert (p.micro_batch_per_rank, p.grad_accum_steps) == (4, 4)
    assert "smallest micro-batch planned on any rank" in p.reasons["micro_batch_per_rank"].text


def test_agree_across_ranks_returns_the_plan_itself_when_ranks_agree(gpu_plan):
    p = gpu_plan(device_budget_bytes=4 << 30)
    assert agree_across_ranks(p, lambda x: x) is p
    with pytest.raises(ConfigError, match="must return the minimum"):
        agree_across_ranks(p, lambda x: x + 1)


def test_an_accumulation_that_disagrees_with_the_plan_is_refused():
    with pytest.raises(ConfigError, match=r"micro-batch 2 x accumulation 3 x 1 processes = 6 rows"):
        plan_for_job(
            job(global_batch=4, batch_size_per_gpu=2, gradient_accumulation_steps=3),
            TINY,
            world_size=1,
            device="cpu",
            num_cores=8,
        )


def test_a_plan_config_plans_the_same_as_the_job_it_describes():
    plan_cfg = PlanConfig(
        data=PlanDataConfig(max_seq_len=64),
        training=TrainingConfig(global_batch=12),
        memory=MemoryConfig(host_ram_limit="4GiB"),
    )
    a = plan_for_job(plan_cfg, TINY, world_size=3, device="cpu", num_cores=8)
    b = plan_for_job(job(global_batch=12), TINY, world_size=3, device="cpu", num_cores=8)
    assert a.to_dict() == b.to_dict()
