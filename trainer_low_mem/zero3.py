"""DeepSpeed ZeRO-3 in the trainer: what changes when every rank holds only its shard of the
parameters.

DeepSpeed partitions the model when accelerate prepares it, and from then on a parameter is an
empty placeholder outside the forward/backward of the module that owns it. The trainer's other
modules stay engine-agnostic and call in here at the few points where that matters:

- Build: the model is built whole on every rank, then partitioned by `prepare`. transformers
  would otherwise build a Hugging Face model under `deepspeed.zero.Init` (accelerate keeps its
  `HfDeepSpeedConfig` alive for stage 3), and the trainer's build steps that read weights
  (`--init_from`, LoRA, the loss-path check, parameter counts, the plan's model probe) would see
  placeholders. `whole_model_build` hides that config for the build and the plan.
- Loss: the chunked loss multiplies hidden states by the output head's weight outside the head's
  own forward; `gather_loss_head` registers that weight with the module whose forward reads it.
- Export: `gathered` gathers one module's parameters at a time (a collective) and copies them
  into rank 0's host RAM, where the export reads them; no device holds the whole model, as in
  FSDP2's export gather.
- Out of memory: with several ranks, one rank's error inside the forward cannot be backed off
  together (the others wait in a parameter all-gather), so that rank stops the job with
  `out_of_memory`'s one line; a single rank backs off, `release_gathered` first freeing what the
  failed forward left gathered.
- Quantised weights (QLoRA): bitsandbytes' packed 4-bit/8-bit codes are partitioned like any
  frozen parameter (DeepSpeed casts only floating-point tensors); their statistics stay whole
  on every rank, and a resume quantises them again from the model folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lowmem_core.errors import MemoryLimitError

ENGINE = "zero3"  # Launch.sharding_engine's name for DeepSpeed ZeRO-3


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage of the accelerator's DeepSpeed config; None without DeepSpeed."""
    state = getattr(accelerator, "state", None) if accelerator is not None else None
    plugin = getattr(state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def is_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned `module`'s parameters (each carries a ds_id)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def whole_model_build(accelerator) -> Iterator[None]:
    """Build (and plan) the model whole on this rank, however transformers would under ZeRO-3;
    the DeepSpeed config transformers reads is restored afterwards, as training expects it."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or not plugin.hf_ds_config.is_zero3():
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def parameter_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole model's parameters) of a
    partitioned module: each parameter's local partition (`ds_tensor`, padded to an equal share
    per rank) against its full size."""
    local = whole = 0
    for param in module.parameters():
        size = param.ds_tensor.element_size()
        local += param.ds_tensor.numel() * size
        whole += param.ds_numel * size
    return local, whole


def gather_loss_head(module: nn.Module) -> None:
    """Make ZeRO-3 gather the output head's parameters for the whole forward and backward of
    `module` (the chunked loss reads them there, outside the head's own forward); every model
    kind's module names them (`loss_head_parameters`)."""
    from deepspeed.runtime.zero import register_external_parameter

    for param in module.loss_head_parameters():
        register_external_parameter(module, param)


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Collective under ZeRO-3 (every rank enters): on rank 0, each of `module`'s parameters
    holds its full value in host RAM inside the block, e.g. to export it; the other ranks only
    take part in the gathers. A no-op for a module that is not partitioned."""
    if not is_partitioned(module):
        yield
        return
    host = _host_copies(module)
    resting = {}
    for param in module.parameters():
        if id(param) in host:  # rank 0 only; tied parameters are one object
            resting[id(param)] = (param, param.data)
            param.data = host[id(param)]
    try:
        yield
    finally:
        for param, data in resting.values():
            param.data = data  # the empty partition placeholder DeepSpeed expects


def _host_copies(module: nn.Module) -> dict[int, torch.Tensor]:
    """Rank 0's host copy of every parameter of `module`, by id. One submodule's own parameters
    are gathered onto the device at a time and partitioned again before the next, so the device
    never holds more than one module's full parameters (the whole model at once would not fit
    where training needed the partitioning); the other ranks keep nothing."""
    import torch.distributed as dist
    from deepspeed.runtime.zero import GatheredParameters

    keep = not dist.is_initialized() or dist.get_rank() == 0
    host: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        own = [p for p in sub.parameters(recurse=False) if id(p) not in host]
        if not own:
            continue
        with GatheredParameters(own, modifier_rank=None):
            for param in own:
                host[id(param)] = param.data.to("cpu", copy=True) if keep else torch.empty(0)
    return host if keep else {}


def out_of_memory(rank: int, where: str, detail: str, advice: str) -> MemoryLimitError:
    """The error for an out-of-memory error in a multi-rank ZeRO-3 forward, on the rank it hit;
    `advice` is the plan's (levers that are off)."""
    # The other ranks wait in the next parameter all-gather, so they cannot meet this one to back
    # off together as ZeRO-2's ranks do: this rank stops, and the launcher ends the others.
    return MemoryLimitError(
        f"out of memory in a ZeRO-3 step (rank {rank}, {where}: {detail}); its ranks cannot back "
        "off together inside the parameter all-gathers: restart with a smaller "
        f"--batch_size_per_gpu, or {advice}"
    )


def release_gathered(engine) -> None:
    """Partition again every parameter a failed forward or backward left gathered, so the retry
    after an out-of-memory backoff starts from the engine's resting state."""
    empty = getattr(engine, "empty_partition_cache", None)
    if empty is not None and engine.zero_optimization_partition_weights():
        empty()
