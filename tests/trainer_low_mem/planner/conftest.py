"""Planner fixtures: a 100M-parameter model's memory, a roomy host, and a GPU plan factory."""

from __future__ import annotations

import pytest

from lowmem_core.memory import HostMemory
from trainer_low_mem.planner import ModelMemory, Plan, plan

GiB = 1 << 30
SEQ_LEN = 512
# bf16 weights and gradients (2 B each), fp32 master + Adam moments (12 B): 16 B per parameter.
MODEL = ModelMemory(
    param_count=100_000_000, activation_bytes_per_token=100_000, param_dtype_bytes=2, d_model=768
)
ROOMY_HOST = HostMemory(
    total_bytes=256 * GiB,
    available_bytes=200 * GiB,
    cgroup_limit_bytes=None,
    cgroup_current_bytes=None,
    page_cache_bytes=None,
)


@pytest.fixture
def model_memory() -> ModelMemory:
    return MODEL


@pytest.fixture
def roomy_host() -> HostMemory:
    return ROOMY_HOST


@pytest.fixture
def gpu_plan():
    """`gpu_plan(**overrides)`: 3 ranks of 20 GiB GPUs, 16 cores, a roomy host, no CUDA reserve
    or process base (so memory lines are the model's and the data path's alone)."""

    def make(**overrides) -> Plan:
        args = dict(
            global_batch=384,
            seq_len=SEQ_LEN,
            world_size=3,
            model=MODEL,
            device_budget_bytes=20 * GiB,
            num_gpus_visible=0,
            num_cores=16,
            host=ROOMY_HOST,
            cuda_reserve_bytes=0,
            process_base_bytes=0,
        )
        args.update(overrides)
        return plan(**args)

    return make
