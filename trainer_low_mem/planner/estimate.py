"""Which estimate of the model's memory a job's plan uses, and why: `estimate_model_memory`.

A GPU probe when the model is at hand on CUDA and DeepSpeed does not own it (it sees the real
kernels and allocator). Otherwise a fake-tensor trace (trace.py) of the model the job trains,
built on the meta device by the caller's factory or copied there from the model at hand; traces
are cached per model and settings in this process. The analytic count is the fallback when
there is nothing to trace or the trace fails (the explanation names the cause), and beside a
trace it is kept as a cross-check.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lowmem_core.errors import LowMemError
from lowmem_core.memory import format_bytes
from trainer_low_mem.planner.explain import Reason, quantised_weights_wording
from trainer_low_mem.planner.load_memory import load_private_bytes
from trainer_low_mem.planner.model_memory import (
    DEFAULT_LOSS_CHUNK_TOKENS,
    ModelMemory,
    ModelShape,
    QuantisedWeights,
    ShardUnits,
    analytic_model_memory,
    quantised_host_model_bytes,
    with_quantised_weights,
)

if TYPE_CHECKING:
    from torch import nn

    from pipeline.batch_spec import BatchSpec
    from trainer_low_mem.config import JobConfig, PlanConfig
    from trainer_low_mem.planner.traced_memory import TracedMemory

ModelFactory = Callable[[], "nn.Module"]
_TRACES: dict[tuple, TracedMemory | str] = {}  # settings -> trace, or why it failed


@dataclass(frozen=True)
class Estimate:
    """The model memory a plan uses and the `model_estimate` note that says where it came from."""

    memory: ModelMemory
    reason: Reason


def estimate_model_memory(
    config: JobConfig | PlanConfig,
    shape: ModelShape,
    *,
    device: str,
    world_size: int,
    zero_stage: int = 0,
    offload_optimizer: bool = False,
    deepspeed: bool = False,
    model: nn.Module | None = None,
    model_factory: ModelFactory | None = None,
    model_key: str | None = None,
    batch_spec: BatchSpec | None = None,
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
    sharding: str | None = None,
    offload_params: bool = False,
) -> Estimate:
    """The estimate for the job `config` describes on `device` ("cuda" or "cpu").

    `model_factory` must build the model of `config.model` (see `trace_step_memory`); without
    it a given `model` is copied to the meta device (its weights are not copied). `model_key`
    names what decides the traced model's memory (its identity, checkpointing, masking), so a
    trace is made once per process; without it nothing is cached. `batch_spec` gives the
    batches the model takes (default: rows of max_seq_len tokens). A given `model` is probed
    on CUDA where it already sits on the GPU and DeepSpeed does not own it. The analytic count
    takes the loss chunk the model runs with (`loss_chunk_tokens`). `sharding` ("fsdp2",
    "zero3") places the model states as that engine shards them (sharding.py; never probed:
    the probe measures whole-model ranks), `offload_params` with the shards in host RAM.
    """
    estimate = _estimate(
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
        loss_chunk_tokens=loss_chunk_tokens,
        sharding=sharding,
        offload_params=offload_params,
    )
    if estimate.memory.units is None:  # what a sharded launch would gather, for the advice
        units = ShardUnits.of_shape(shape, estimate.memory.trainable)
        compute = 4 if config.training.mixed_precision == "no" else 2
        units = dataclasses.replace(units, compute_dtype_bytes=compute)
        memory = dataclasses.replace(estimate.memory, units=units)
        estimate = dataclasses.replace(estimate, memory=memory)
    mapped = shape.half_precision_param_count()
    if shape.quantised_weights is not None or not mapped:
        return estimate  # a quantised load counts its own (quantised_host_model_bytes)
    host = load_private_bytes(estimate.memory.param_count, mapped)
    return dataclasses.replace(
        estimate, memory=dataclasses.replace(estimate.memory, host_model_bytes=host)
    )


def _estimate(
    config: JobConfig | PlanConfig,
    shape: ModelShape,
    *,
    device: str,
    world_size: int,
    zero_stage: int,
    offload_optimizer: bool,
    deepspeed: bool,
    model: nn.Module | None,
    model_factory: ModelFactory | None,
    model_key: str | None,
    batch_spec: BatchSpec | None,
    loss_chunk_tokens: int,
    sharding: str | None = None,
    offload_params: bool = False,
) -> Estimate:
    precision, seq_len = config.training.mixed_precision, config.data.max_seq_len
    on_gpu = device == "cuda"
    if sharding is not None:
        zero_stage = 0  # the engine places the states itself (sharding.py)
    if on_gpu and model is not None and not deepspeed and sharding is None:
        probed = _probe(model, shape, seq_len, precision, batch_spec)
        proportions = analytic_model_memory(
            shape,
            seq_len,
            grad_checkpointing=config.model.grad_checkpointing,
            dtype_bytes=4 if precision == "no" else 2,
            loss_chunk_tokens=loss_chunk_tokens,
        )
        lever_memory = with_lever_figures(probed.memory, model, proportions)
        return dataclasses.replace(probed, memory=lever_memory)
    analytic = analytic_model_memory(
        shape,
        seq_len,
        grad_checkpointing=config.model.grad_checkpointing,
        dtype_bytes=4 if precision == "no" else 2,
        loss_chunk_tokens=loss_chunk_tokens,
    )
    quantised = shape.quantised_weights
    if quantised is not None:
        analytic = with_quantised_weights(
            analytic, quantised, shape, config.model.grad_checkpointing
        )
        analytic = _placed(analytic, zero_stage, offload_optimizer, world_size)
    if sharding is not None:
        offloads = (offload_optimizer and on_gpu, offload_params and on_gpu)
        analytic = _sharded(analytic, shape, sharding, world_size, precision, offloads)
    factory = model_factory or (meta_copy_factory(model) if model is not None else None)
    if factory is None:
        why = "analytic: counted from the model's dimensions (no model to trace); " + _LINE
        return _analytic(analytic, why, _line(analytic), quantised)
    settings = (
        model_key,
        repr(batch_spec),
        seq_len,
        device,
        precision,
        zero_stage,
        offload_optimizer and device == "cuda" and sharding is None,
        world_size,
        sharding is not None,  # one trace serves every engine and offload: only placed apart
    )
    traced = _cached_trace(settings, factory, batch_spec)
    if sharding is not None and not isinstance(traced, str):
        offloads = (offload_optimizer and on_gpu, offload_params and on_gpu)
        traced = _sharded_trace(traced, sharding, world_size, offloads)
    if isinstance(traced, str):
        why = "analytic: the trace failed ({cause}); counted from the model's dimensions, " + _LINE
        numbers = {"cause": traced, **_line(analytic)}
        return _analytic(analytic, why, numbers, quantised)
    memory = traced.to_model_memory()
    if traced.quantised is not None:
        host = quantised_host_model_bytes(traced.quantised, shape)
        memory = dataclasses.replace(memory, host_model_bytes=host)
    return Estimate(memory, _trace_reason(traced, analytic))


def _analytic(
    memory: ModelMemory, why: str, numbers: dict, quantised: QuantisedWeights | None
) -> Estimate:
    if quantised is not None:
        quantised_why, quantised_numbers = quantised_weights_wording(
            memory.static_device_bytes, quantised
        )
        why, numbers = why + "; " + quantised_why, {**numbers, **quantised_numbers}
    return Estimate(memory, Reason("model_estimate", "analytic", why, numbers))


def _placed(memory: ModelMemory, zero_stage: int, offload: bool, world_size: int) -> ModelMemory:
    """A quantised count's static bytes placed for ZeRO/offload as a trace places its own."""
    from trainer_low_mem.planner.traced_memory import (
        DEFAULT_REDUCE_BUCKET_ELEMENTS,
        place_traced_states,
    )

    placed, host, _ = place_traced_states(
        dict(memory.static_device_bytes),
        memory.trainable,
        memory.param_dtype_bytes,
        zero_stage,
        offload and zero_stage > 0,
        world_size,
        DEFAULT_REDUCE_BUCKET_ELEMENTS,
    )
    return dataclasses.replace(memory, static_device_bytes=placed, host_offload_bytes=host)


def _sharded(
    memory: ModelMemory,
    shape: ModelShape,
    sharding: str,
    world_size: int,
    precision: str,
    offloads: tuple[bool, bool],
) -> ModelMemory:
    """The count's model states placed as `sharding` shards them (sharding.py); quantised
    weights stay whole. `offloads`: (optimizer, parameters) in host RAM."""
    from trainer_low_mem.planner.sharding import WHOLE_CATEGORIES, sharded_states

    static = memory.static_device_bytes or {}
    whole = {k: static[k] for k in WHOLE_CATEGORIES if k in static}
    quantised = shape.quantised_weights
    params = memory.param_count - (quantised.quantised_params if quantised else 0)
    compute = 4 if precision == "no" else 2
    units = dataclasses.replace(
        ShardUnits.of_shape(shape, memory.trainable), compute_dtype_bytes=compute
    )
    states = sharded_states(
        sharding,
        param_count=params,
        trainable_count=memory.trainable,
        units=units,
        world_size=world_size,
        compute_dtype_bytes=compute,
        offload_optimizer=offloads[0],
        offload_params=offloads[1],
        whole=whole,
    )
    return dataclasses.replace(
        memory,
        static_device_bytes=states.device,
        host_offload_bytes=states.offloaded,
        units=units,
    )


def _sharded_trace(
    traced: TracedMemory, sharding: str, world_size: int, offloads: tuple[bool, bool]
) -> TracedMemory:
    """A sharded trace placed as `sharding` shards it with `offloads` (optimizer, parameters)
    in host RAM; an optimizer step the engine runs on the host leaves no device transient."""
    from trainer_low_mem.planner.sharding import WHOLE_CATEGORIES, sharded_states

    whole = {k: traced.static_bytes[k] for k in WHOLE_CATEGORIES if k in traced.static_bytes}
    quantised = traced.quantised.quantised_params if traced.quantised is not None else 0
    offload_optimizer, offload_params = offloads
    states = sharded_states(
        sharding,
        param_count=traced.param_count - quantised,
        trainable_count=traced.trainable_count,
        units=traced.units,
        world_size=world_size,
        compute_dtype_bytes=traced.units.compute_dtype_bytes,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        whole=whole,
    )
    host_step = offload_params if sharding == "fsdp2" else offload_optimizer
    return dataclasses.replace(
        traced,
        static_bytes={**states.device, "buffers": traced.static_bytes["buffers"]},
        host_offload_bytes=states.offloaded,
        optimizer_step_bytes=0 if host_step else traced.optimizer_step_bytes,
    )


def with_lever_figures(memory: ModelMemory, model: nn.Module, analytic: ModelMemory) -> ModelMemory:
    """A probe's memory with what its measured steps do not show: the 8-bit AdamW states of the
    model's trainable parameters, counted exactly, and the activation-offload split, taken in
    the analytic count's proportions of the measured bytes per token."""
    from trainer_low_mem.planner.optimizer_states import adamw_8bit_state_bytes
    from trainer_low_mem.planner.trace import CUDA_BLOCK_BYTES

    trainable = [p.numel() for p in model.parameters() if p.requires_grad]
    per_token, whole = memory.activation_bytes_per_token, analytic.activation_bytes_per_token
    device = analytic.offload_device_bytes_per_token
    host = analytic.offload_host_bytes_per_token
    return dataclasses.replace(
        memory,
        adamw_8bit_state_bytes=adamw_8bit_state_bytes(trainable, CUDA_BLOCK_BYTES),
        offload_device_bytes_per_token=-(-per_token * device // whole),
        offload_host_bytes_per_token=-(-per_token * host // whole),
    )


def meta_copy_factory(model: nn.Module) -> ModelFactory:
    """A factory of `model` on the meta device: a deep copy whose parameters and buffers are meta
    tensors of the same shapes, dtypes and requires_grad. The weights are never copied."""
    import torch
    from torch import nn

    def build() -> nn.Module:
        memo: dict[int, Any] = {}
        for t in [*model.parameters(), *model.buffers()]:
            meta = torch.empty_like(t, device="meta")
            is_param = isinstance(t, nn.Parameter)
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if is_param else meta
        return copy.deepcopy(model, memo)

    return build


_LINE = "{per_token} B/token + {step_bytes} fixed"


def _line(memory: ModelMemory) -> dict[str, Any]:
    return {
        "per_token": f"{memory.activation_bytes_per_token:,}",
        "step_bytes": memory.step_fixed_bytes,
    }


def _probe(
    model: nn.Module, shape: ModelShape, seq_len: int, precision: str, batch_spec
) -> Estimate:
    # Measured on this GPU at the training precision (weights stay fp32 under autocast).
    import torch

    from trainer_low_mem.planner.probe import probe_model_memory

    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    memory = probe_model_memory(
        model, shape, seq_len, "cuda", autocast_dtype=autocast, batch_spec=batch_spec
    )
    why = "GPU probe: two measured steps on this GPU, " + _LINE
    return Estimate(memory, Reason("model_estimate", "probe", why, _line(memory)))


def _trace_reason(traced: TracedMemory, analytic: ModelMemory) -> Reason:
    memory = traced.to_model_memory()
    static = ", ".join(f"{k} {format_bytes(v)}" for k, v in traced.static_bytes.items())
    ratio = analytic.activation_bytes_per_token / memory.activation_bytes_per_token
    numbers = {
        "traced_on": traced.traced_on,
        "device": traced.device_type,
        "trace_s": f"{traced.trace_seconds:.1f}",
        "static_bytes": traced.static_device_bytes,
        "static": static,
        "host_bytes": traced.host_offload_bytes,
        "trainable": f"{traced.trainable_count:,}",
        **_line(memory),
        "analytic_per_token": f"{analytic.activation_bytes_per_token:,}",
        "analytic_ratio": f"{ratio:.2f}",
    }
    why = (
        "trace: one optimizer step on fake {traced_on} tensors for {device} ({trace_s} s); "
        "static {static_bytes} per rank ({static}; host offload {host_bytes}), {trainable} "
        "trainable; " + _LINE + "; analytic cross-check {analytic_per_token} B/token "
        "({analytic_ratio}x)"
    )
    if not traced.linear:
        numbers["residual_frac"] = traced.linear_residual_frac
        why += "; not linear in tokens: the line is up to {residual_frac} above a traced point"
    if traced.quantised is not None:
        quantised_why, quantised_numbers = quantised_weights_wording(
            traced.static_bytes, traced.quantised
        )
        why += "; " + quantised_why
        numbers.update(quantised_numbers)
    return Reason("model_estimate", "trace", why, numbers)


def _cached_trace(settings: tuple, factory: ModelFactory, batch_spec) -> TracedMemory | str:
    """The trace at `settings`, or the one-line reason it failed; each traced once per process
    (never cached without a model key)."""
    if settings not in _TRACES or settings[0] is None:
        from trainer_low_mem.planner.trace import trace_step_memory

        _, _, seq_len, device, precision, zero_stage, offload, world_size, sharded = settings
        # A failing fake-tensor op logs its traceback; the plan gives the cause in one line.
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        level = fake_log.level
        fake_log.setLevel(logging.CRITICAL)
        try:
            _TRACES[settings] = trace_step_memory(
                factory,
                seq_len=seq_len,
                device_type=device,
                mixed_precision=precision,
                zero_stage=zero_stage,
                offload_optimizer=offload,
                sharding="fsdp2" if sharded else None,
                world_size=world_size,
                batch_spec=batch_spec,
            )
        except LowMemError as exc:
            _TRACES[settings] = str(exc)
        except Exception as exc:  # noqa: BLE001 (any failure falls back to the analytic count)
            first = (str(exc).strip().splitlines() or ["no message"])[0][:200]
            _TRACES[settings] = f"{type(exc).__name__}: {first}"
        finally:
            fake_log.setLevel(level)
    return _TRACES[settings]
