"""Activation offload: the tensors autograd saves for backward go to (pinned) host RAM.

One rule, used by the trainer's step (trainer_low_mem/step.py) and by the planner's trace, which
runs the same hooks on fake tensors to count what leaves the device and what the host holds.
Unlike `torch.autograd.graph.save_on_cpu`, tensors that share a parameter's storage stay where
they are (a linear layer saves its weight, or a view of it, for backward: copying it would
duplicate the model in host RAM and copy it over PCIe every micro-batch), and so do tensors under
`MIN_OFFLOAD_BYTES`, whose copy costs more than the memory it frees (torchtune keeps them too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

MIN_OFFLOAD_BYTES = 1024


def offload_saved_activations(
    params: Iterable[torch.Tensor],
    device: torch.device,
    *,
    pin_memory: bool,
    host_copy: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.autograd.graph.saved_tensors_hooks:
    """Hooks that keep the activations saved on `device` in host RAM until backward needs them.

    Each saved tensor on `device` that is neither a parameter's storage nor small is copied into
    a fresh host tensor (pinned with `pin_memory`), and copied back to `device` in backward: the
    values are bit-identical, so losses and gradients are too. On a CPU-only run `device` is the
    CPU and the copies are host tensors like the originals, which still runs the mechanism.
    `host_copy` makes the host copy instead (the trace counts it as host memory).
    """
    kept = {id(p.untyped_storage()) for p in params}

    def to_host(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin_memory)
        return host.copy_(t.detach())

    copy = host_copy or to_host

    def pack(t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if t.device.type != device.type or nbytes < MIN_OFFLOAD_BYTES:
            return t
        if id(t.untyped_storage()) in kept:
            return t
        return (t.device, copy(t))

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        where, host = packed
        # A fresh device tensor, also on the CPU: backward may write into what it unpacks.
        return host.to(where, copy=True, non_blocking=pin_memory)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
