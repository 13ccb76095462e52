"""The plan of a training job: its config and model in, the `Plan` every rank runs with out.

Used by the trainer at start-up and by the `plan` subcommand, so both decide the same way: the
model's memory is probed on CUDA (when the model is at hand and DeepSpeed does not own it),
traced on fake tensors otherwise, and counted analytically when there is nothing to trace or the
trace fails (estimate.py); given readers override the planned ones; ranks agree on the smallest
micro-batch; a given accumulation must agree with the plan. The loss chunk (loss_chunk.py) is
chosen first, from the budget and the vocabulary, because the model traced or probed must run
with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from lowmem_core.errors import ConfigError
from lowmem_core.memory import DEFAULT_HOST_SAFETY_FRAC, format_bytes
from trainer_low_mem.config import JobConfig, PlanConfig
from trainer_low_mem.planner.arithmetic import plan
from trainer_low_mem.planner.batch import check_split
from trainer_low_mem.planner.estimate import ModelFactory, estimate_model_memory
from trainer_low_mem.planner.explain import Reason
from trainer_low_mem.planner.levers import PLAN_FLAG_LEVERS, Levers
from trainer_low_mem.planner.loss_chunk import choose_loss_chunk
from trainer_low_mem.planner.machine import detect_devices, host_limit
from trainer_low_mem.planner.model_memory import ModelShape
from trainer_low_mem.planner.plan import Plan

if TYPE_CHECKING:
    import torch

    from pipeline.batch_spec import BatchSpec


def plan_for_job(
    config: JobConfig | PlanConfig,
    shape: ModelShape,
    *,
    world_size: int,
    device: str | None = None,
    zero_stage: int = 0,
    offload_optimizer: bool = False,
    deepspeed: bool = False,
    model: torch.nn.Module | None = None,
    model_factory: ModelFactory | None = None,
    dataset_bytes: int | None = None,
    index_bytes: int | None = None,
    all_reduce_min: Callable[[int], int] | None = None,
    ranks_per_node: int | None = None,
    num_cores: int | None = None,
    model_key: str | None = None,
    batch_spec: BatchSpec | None = None,
    levers: Levers = PLAN_FLAG_LEVERS,
    host_from_flags: bool = False,
    loss_chunk: Reason | None = None,
    sharding: str | None = None,
    offload_params: bool = False,
) -> Plan:
    """The plan for `config` on this launch (see the module docstring).

    `device` is "cuda" or "cpu" (None: a device budget or a visible GPU means CUDA). A `model`
    already on the GPU (no DeepSpeed) is probed there; otherwise `model_factory()` (or a
    meta-device copy of `model`) is traced, once per `model_key`, on the example batches of
    `batch_spec`. `all_reduce_min` returns the minimum of an int over ranks; without it the
    plan is this process's own. Advice when nothing fits names `levers`. `host_from_flags`:
    the host limit given describes the target machine (see `plan`). `loss_chunk`: the
    `loss_chunk_for_job` reason the model (at hand, or `model_factory`'s) was given; None
    chooses it here for a model that takes the chunk it was built with. `sharding`: the
    engine that shards the parameters ("fsdp2", "zero3"; `Launch.sharding_engine`), with the
    shards in host RAM when `offload_params` (planner/sharding.py).
    """
    seq_len, t = config.data.max_seq_len, config.training
    if loss_chunk is None:
        loss_chunk = loss_chunk_for_job(
            config,
            shape.vocab_size,
            world_size=world_size,
            device=device,
            ranks_per_node=ranks_per_node,
            host_from_flags=host_from_flags,
        )
    if device is None:
        budget = config.memory.device_budget_bytes
        device = detect_devices(world_size, budget, None, ranks_per_node, device).device
    estimate = estimate_model_memory(
        config,
        shape,
        device=device,
        world_size=world_size,
        zero_stage=zero_stage,
        offload_optimizer=offload_optimizer,
        deepspeed=deepspeed,
        model=model,
        model_factory=model_factory,
        model_key=model_key,
        batch_spec=batch_spec,
        loss_chunk_tokens=loss_chunk.value,
        sharding=sharding,
        offload_params=offload_params,
    )
    memory = estimate.memory
    # A given micro-batch (--batch_size_per_gpu) is checked to fit; the data path is still sized.
    result = plan(
        global_batch=config.resolve_global_batch(world_size),
        seq_len=seq_len,
        world_size=world_size,
        model=memory,
        zero_stage=zero_stage,
        offload_optimizer=offload_optimizer,
        host_ram_limit_bytes=config.memory.host_ram_limit_bytes,
        device_budget_bytes=config.memory.device_budget_bytes,
        device=device,
        dataset_bytes=dataset_bytes,
        index_bytes=index_bytes,
        micro_batch_per_rank=t.batch_size_per_gpu,
        ranks_per_node=ranks_per_node,
        num_cores=num_cores,
        levers=levers,
        host_from_flags=host_from_flags,
        optimizer=t.optimizer,
        offload_activations=t.offload_activations,
        grad_checkpointing=config.model.grad_checkpointing,
        sharding=sharding,
        offload_params=offload_params,
    )
    reasons = {**result.reasons, "model_estimate": estimate.reason, loss_chunk.what: loss_chunk}
    result = dataclasses.replace(result, reasons=reasons, loss_chunk_tokens=loss_chunk.value)
    if config.data.num_readers is not None:
        result = result.with_num_readers(config.data.num_readers, "given (--num_readers)")
    elif not config.memory.auto_plan:
        result = result.with_num_readers(1, "1 with --auto_plan=False")
    if all_reduce_min is not None:
        result = agree_across_ranks(result, all_reduce_min)
    check_split(
        result.global_batch, world_size, result.micro_batch_per_rank, t.gradient_accumulation_steps
    )
    return result


def loss_chunk_for_job(
    config: JobConfig | PlanConfig,
    vocab_size: int,
    *,
    world_size: int,
    device: str | None = None,
    ranks_per_node: int | None = None,
    host_from_flags: bool = False,
    all_reduce_min: Callable[[int], int] | None = None,
) -> Reason:
    """The loss chunk of this job (see loss_chunk.py), from the rank's device budget, or its share
    of host RAM when it trains there; ranks take the smallest (`all_reduce_min`)."""
    devices = detect_devices(
        world_size, config.memory.device_budget_bytes, None, ranks_per_node, device
    )
    budget, why = devices.budget_bytes, devices.budget_why
    if budget is None:
        limit = host_limit(
            config.memory.host_ram_limit_bytes, DEFAULT_HOST_SAFETY_FRAC, None, host_from_flags
        )
        budget = limit.value // devices.ranks_per_node
        why = (
            f"training in host RAM: the limit {format_bytes(limit.value)} over "
            f"{devices.ranks_per_node} rank(s)"
        )
    chunk = choose_loss_chunk(
        vocab_size=vocab_size,
        budget_bytes=budget,
        mixed_precision=config.training.mixed_precision,
        budget_why=why,
    )
    agreed = chunk.value if all_reduce_min is None else int(all_reduce_min(chunk.value))
    if agreed == chunk.value:
        return chunk
    why = chunk.why + "; {agreed}, the smallest chunk any rank chose"
    return Reason(chunk.what, agreed, why, {**chunk.numbers, "agreed": agreed})


def agree_across_ranks(plan: Plan, all_reduce_min: Callable[[int], int]) -> Plan:
    """Every rank takes the smallest micro-batch any rank planned, so none runs out alone.

    `all_reduce_min(x)` returns the minimum of x over all ranks (e.g. a MIN all-reduce).
    """
    mine = plan.micro_batch_per_rank
    agreed = int(all_reduce_min(mine))
    if not 1 <= agreed <= mine:
        raise ConfigError(
            f"all_reduce_min returned {agreed} for a local micro-batch of {mine}; it must "
            "return the minimum over ranks"
        )
    if agreed == mine:
        return plan
    return plan.with_micro_batch(agreed, "the smallest micro-batch planned on any rank")
