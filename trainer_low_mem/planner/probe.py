"""Activations per token measured on the GPU: two real forward/backward steps, their peaks' slope.

Where a GPU exists the probe wins over the analytic count: it sees the kernels, the allocator
and the libraries' workspaces of the model that will train.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lowmem_core.errors import ConfigError
from trainer_low_mem.planner.model_memory import ModelMemory, ModelShape

if TYPE_CHECKING:
    import torch

    from pipeline.batch_spec import BatchSpec


def probe_model_memory(
    model: torch.nn.Module,
    shape: ModelShape,
    seq_len: int,
    device: torch.device | str,
    micro_batches: tuple[int, int] = (1, 2),
    autocast_dtype: torch.dtype | None = None,
    batch_spec: BatchSpec | None = None,
) -> ModelMemory:
    """Peak memory of one forward/backward at two micro-batches -> activation bytes per token.

    The model must already sit on `device` with its training dtype and follow the trainer's forward
    contract, taking the example batches of `batch_spec` (default: rows of seq_len). One warm-up
    step allocates the gradients and the libraries' workspaces, so the two measured peaks above the
    allocated baseline differ only by activations: their slope over the extra tokens is the
    activation bytes per token, the intercept the step's fixed transient memory. `autocast_dtype`
    (e.g. torch.bfloat16) runs the steps under autocast, as a mixed-precision trainer would. Token
    id 0 stands in for data; memory does not depend on the values. The model is left where it was,
    in the mode it was in, without gradients.
    """
    import torch

    from pipeline.batch_spec import TokenRows

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(
            f"the probe measures CUDA allocator peaks and needs a CUDA device, got {device}; "
            "use analytic_model_memory without a GPU"
        )
    m1, m2 = micro_batches
    if not 1 <= m1 < m2:
        raise ConfigError(f"micro_batches must be two increasing sizes >= 1, got {micro_batches}")
    params = list(model.parameters())
    if params[0].device.type != "cuda":
        raise ConfigError(
            f"the probe measures the model where it trains, but it is on {params[0].device}; "
            "place it on the GPU first"
        )
    spec = batch_spec or TokenRows(seq_len)

    def step(micro: int) -> int:
        batch = spec.example(micro, device)
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(**batch)
        out.loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
        del out, batch
        for p in params:  # keep the gradient tensors allocated: they belong to the baseline
            if p.grad is not None:
                p.grad.zero_()
        return peak

    was_training = model.training
    model.train()
    try:
        step(m1)  # warm-up: allocates .grad and library workspaces
        peak1, peak2 = step(m1), step(m2)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    per_token = max(1, math.ceil((peak2 - peak1) / ((m2 - m1) * seq_len)))
    dtype_bytes = params[0].element_size()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return ModelMemory(
        param_count=total,
        activation_bytes_per_token=per_token,
        param_dtype_bytes=dtype_bytes if dtype_bytes in (2, 4) else 4,
        step_fixed_bytes=max(0, peak1 - per_token * m1 * seq_len),
        trainable_count=trainable if trainable != total else None,
        d_model=shape.d_model,
        source="probe",
    )
