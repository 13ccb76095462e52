"""FSDP2 parameter sharding (torch's `fully_shard`), chosen by an accelerate config with
`distributed_type: FSDP` and `fsdp_version: 2`.

Every transformer block is its own FSDP unit and the model itself the root unit (embeddings,
final norm, output head): each rank keeps 1/world_size of every parameter, gradient and optimizer
state, and a unit's full weights exist only while it runs (all-gathered before its forward and
again before its backward). The loss reads the output head's weight inside the root's forward,
where the root's parameters are gathered, so the chunked loss sees the whole head and tied
embeddings stay one parameter.

The trainer shards the model here instead of through `accelerator.prepare`: accelerate enables
its FSDP path for GPU processes only, and sharding here runs the same engine on CUDA ranks and on
gloo CPU ranks. Only rank 0 reads the weights into host RAM (accelerate's
`fsdp_cpu_ram_efficient_loading`, always on here, whatever that key says): the other ranks build
the model on the meta device, every rank shards it, and rank 0's full state is broadcast into the
shards one tensor at a time: the job holds one whole copy at load (rank 0's), not one per rank.
With fsdp_offload_params every rank still loads the whole model: the shards rest in host RAM,
where a CUDA job's NCCL group cannot broadcast into them.

The state is torch's distributed checkpoint (DCP) of the sharded model and optimizer, which loads
on any number of ranks; the export gathers the full weights into rank 0's host RAM, one
parameter at a time, for the moment it writes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lowmem_core.errors import MemoryLimitError
from trainer_low_mem.planner.load_memory import rank0_loads_alone

ENGINE = "fsdp2"  # recorded in a state's manifest: a state loads only under the same engine
STATE_DIR_NAME = "fsdp2_sharded"  # the DCP folder inside a training state


def _mixed_precision_policy(mixed_precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "no":
        return MixedPrecisionPolicy()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    # Computed in half precision, gradients reduced and kept in fp32 beside fp32 master weights.
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the elements of every outermost `nn.ModuleList` whose
    elements share one class and hold parameters (a decoder's layers; an encoder-decoder's
    encoder and decoder blocks), not lists inside a block (a mixture's experts)."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) == 1 and any(True for _ in module[0].parameters()):
            blocks.extend(module)
            inside.update(id(m) for block in module for m in block.modules())
    return blocks


def shard_model(
    model: nn.Module, *, mixed_precision: str, offload_params: bool, device: torch.device
) -> nn.Module:
    """Shard `model` in place over the default process group (collective); returns it. Rank 0
    passes the whole model, built on the CPU with its weights; where `rank0_loads_alone`, the
    other ranks pass the same model built on the meta device (`materialised_bytes` 0), else
    the whole model too. Each unit moves to `device` as it
    is sharded (fully_shard moves it), so a device holds one whole block at a time on top of
    its shards, never the whole model; then, where rank 0 alone loaded, its weights and buffers
    are broadcast into every rank's shards, so all ranks start from rank 0's model (its seeded
    initial weights, LoRA adapters included).

    `offload_params`: sharded parameters, gradients and the optimizer step rest in host RAM
    (torch's CPUOffloadPolicy), gathered onto the device for each unit's forward and backward."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    kwargs = {
        "mp_policy": _mixed_precision_policy(mixed_precision),
        "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        if offload_params
        else OffloadPolicy(),
    }
    # Views of rank 0's whole tensors (no copy), alive until broadcast; the others send nothing.
    full_state = model.state_dict() if dist.get_rank() == 0 else {}
    unsaved = _unsaved_buffer_names(model)
    for block in block_modules(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    if not rank0_loads_alone(ENGINE, offload_params):
        return model
    if materialised_bytes(model) < _tensor_bytes(model):
        # Storage for the meta shards (and buffers), filled by the broadcast below.
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    del full_state
    # Buffers outside the state dict (rotary inv_freq) are computed at build: rank 0's are right.
    for name, buffer in model.named_buffers():
        if name in unsaved:
            dist.broadcast(buffer, src=0)
    return model


def _unsaved_buffer_names(model: nn.Module) -> set[str]:
    """The buffers a state dict leaves out (registered with persistent=False)."""
    return {name for name, _ in model.named_buffers()} - set(model.state_dict())


def _tensor_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def materialised_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers that hold memory (not on the meta device): a rank's
    whole model before sharding on rank 0, nothing on the others."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if not t.is_meta]
    return sum(t.numel() * t.element_size() for t in tensors)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: its shards under FSDP2, everything otherwise."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip the sharded gradients to a global norm `max_norm`; returns the norm before clipping
    (the same on every rank: the shards' norms are reduced over the group)."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the next backward reduce-scatters gradients (off for the non-final micro-batches
    of an accumulated step, which accumulate unsharded gradients locally)."""
    model.set_requires_gradient_sync(enabled)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Collective: on rank 0, the full parameters (in host RAM) in place of the shards inside
    the block, e.g. to export them; the other ranks only send theirs. A model that FSDP2 did not
    shard is left as it is."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    # Gathered one parameter at a time into rank 0's host RAM (the other ranks get nothing).
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    replaced = []
    if full:
        params: dict[int, nn.Parameter] = {}
        for fqn, p in model.named_parameters(remove_duplicate=False):
            if fqn in full and id(p) not in params:
                params[id(p)] = nn.Parameter(full[fqn], requires_grad=p.requires_grad)
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                replaced.append((module, name, p))
                setattr(module, name, params[id(p)])  # tied parameters stay one
    try:
        yield
    finally:
        for module, name, p in replaced:
            setattr(module, name, p)


def out_of_memory(rank: int, where: str, detail: str) -> MemoryLimitError:
    """The error for an out-of-memory error in a multi-rank FSDP2 step, on the rank it hit."""
    # The other ranks wait in the unit's all-gather, so the ranks cannot meet to back off
    # together as DDP's do: this rank stops, and the launcher ends the others.
    return MemoryLimitError(
        f"out of memory in an FSDP2 step (rank {rank}, {where}: {detail}); its ranks cannot "
        "back off together inside the all-gathers: restart with a smaller --batch_size_per_gpu, "
        "--grad_checkpointing True, or fsdp_offload_params: true in the accelerate config"
    )


class ShardedState:
    """The sharded model and optimizer as one DCP checkpoint (`save`/`load` are collectives).

    Frozen parameters (a LoRA run's base) are left out, as in the unsharded state: they are
    loaded again from the model folder."""

    engine = ENGINE

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(ignore_frozen_params=True)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
        return {"model": model_sd, "optimizer": optim_sd}

    def save(self, state_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(state_dir / STATE_DIR_NAME))

    def load(self, state_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(state_dir / STATE_DIR_NAME))
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
