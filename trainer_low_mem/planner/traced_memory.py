"""The traced memory record of one rank: static bytes by category, a line in tokens, and the
device memory a trace cannot see, as named terms a GPU probe calibrates.

`trainer_low_mem.planner.trace` fills it from a fake-tensor trace of a training step; the ZeRO /
offload placement of the model states (weights, gradients, optimizer states) is applied here,
as DeepSpeed lays them out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from lowmem_core.errors import ConfigError
from lowmem_core.memory import format_bytes
from pipeline.cost import BATCH_BYTES_PER_TOKEN
from trainer_low_mem.planner.explain import Reason, quantised_weights_wording
from trainer_low_mem.planner.model_memory import ModelMemory, QuantisedWeights, ShardUnits

MiB = 1 << 20
# What a CUDA process holds outside the tensors a trace sees; defaults until a probe measures them.
CUDA_CONTEXT_BYTES = 512 * MiB  # driver context and loaded kernels (NVML-visible, not torch's)
CUDA_WORKSPACE_BYTES = 64 * MiB  # cuBLAS/cuBLASLt and fused-kernel workspaces
CUDA_ALLOCATOR_OVERHEAD_FRAC = 0.10  # caching allocator: reserved over allocated, fragmentation
NCCL_BUFFER_BYTES = 256 * MiB  # communicator buffers when more than one rank
# ZeRO keeps an fp32 master copy and Adam's two moments (12 B) and an fp32 gradient (4 B) for its
# partition of the trainable parameters (DeepSpeed's estimate_zero2_model_states_mem_needs).
ZERO_OPTIMIZER_BYTES_PER_PARAM = 12
ZERO_FP32_GRAD_BYTES_PER_PARAM = 4
DEFAULT_REDUCE_BUCKET_ELEMENTS = 50_000_000  # accelerate_configs/ds_zero2_offload.json
LINEAR_TOLERANCE = 0.02


@dataclass(frozen=True)
class TracePoint:
    """One traced micro-batch size: the peak of a micro-step with gradients resident."""

    micro_batch: int
    tokens: int
    peak_bytes: int  # the single-process trace: static bytes + activations
    activation_bytes: int  # peak_bytes minus the static bytes (activations and temporaries)


@dataclass(frozen=True)
class OffloadPoint(TracePoint):
    """A traced micro-step under activation offload (planner/saved_activations.py)."""

    host_bytes: int = 0  # peak of the offloaded activations in host RAM


@dataclass(frozen=True)
class UnseenTerms:
    """Device memory no fake tensor shows, each named so a plan can explain it."""

    cuda_context_bytes: int = 0
    workspace_bytes: int = 0
    allocator_overhead_frac: float = 0.0
    nccl_bytes: int = 0
    prefetch_bytes_per_token: int = 0  # the prefetcher's device batches, (depth + 1) of them
    source: str = "default"  # "default", or "probe" once calibrated by measured steps

    @classmethod
    def defaults(cls, device_type: str, world_size: int, prefetch_depth: int) -> UnseenTerms:
        if device_type != "cuda":
            return cls()  # host RAM: the planner counts the process and the data path itself
        return cls(
            cuda_context_bytes=CUDA_CONTEXT_BYTES,
            workspace_bytes=CUDA_WORKSPACE_BYTES,
            allocator_overhead_frac=CUDA_ALLOCATOR_OVERHEAD_FRAC,
            nccl_bytes=NCCL_BUFFER_BYTES if world_size > 1 else 0,
            prefetch_bytes_per_token=(prefetch_depth + 1) * BATCH_BYTES_PER_TOKEN,
        )

    def reserve_bytes(self) -> int:
        """The fixed part: context, workspaces (with the allocator's overhead on them), NCCL."""
        workspaces = math.ceil(self.workspace_bytes * (1.0 + self.allocator_overhead_frac))
        return self.cuda_context_bytes + workspaces + self.nccl_bytes

    def describe(self) -> str:
        return (
            f"CUDA context {format_bytes(self.cuda_context_bytes)}, workspaces "
            f"{format_bytes(self.workspace_bytes)}, allocator overhead "
            f"{self.allocator_overhead_frac:.0%}, NCCL {format_bytes(self.nccl_bytes)}, prefetch "
            f"{self.prefetch_bytes_per_token} B/token ({self.source})"
        )


@dataclass(frozen=True)
class TracedMemory:
    """The traced memory model of one rank, with ZeRO/offload placement applied."""

    param_count: int
    trainable_count: int
    param_dtype_bytes: int
    seq_len: int
    device_type: str
    traced_on: str  # the fake tensors' device ("cpu" stands in for CUDA on a CPU build of torch)
    static_bytes: dict[str, int]  # per rank on the device: weights, gradients, optimizer, ...
    host_offload_bytes: int  # per rank in host RAM: offloaded optimizer states, fp32 gradients
    activation_bytes_per_token: int
    step_fixed_bytes: int  # activations and temporaries that do not grow with tokens
    optimizer_step_bytes: int  # transient above the static bytes during optimizer.step()
    linear_residual_frac: float  # worst relative gap between the line and a traced point
    points: tuple[TracePoint, ...]
    unseen: UnseenTerms
    trace_seconds: float
    quantised: QuantisedWeights | None = None  # the layers bitsandbytes stores quantised
    adamw_8bit_state_bytes: int | None = None  # bitsandbytes AdamW8bit states of this rank
    offload_points: tuple[OffloadPoint, ...] = ()  # the micro-steps under activation offload
    units: ShardUnits | None = None  # how FSDP2 / ZeRO-3 cut the model, when they shard it

    @property
    def static_device_bytes(self) -> int:
        return sum(self.static_bytes.values())

    @property
    def linear(self) -> bool:
        return self.linear_residual_frac <= LINEAR_TOLERANCE

    def peak_bytes(self, micro_batch: int) -> int:
        """Peak bytes of the tensors of one step at this micro-batch (what the trace sees)."""
        activations = self.step_fixed_bytes + self.activation_bytes_per_token * (
            micro_batch * self.seq_len
        )
        return self.static_device_bytes + max(activations, self.optimizer_step_bytes)

    def device_peak_bytes(self, micro_batch: int) -> int:
        """Peak device memory, with the terms the trace cannot see."""
        u = self.unseen
        tensors = math.ceil(self.peak_bytes(micro_batch) * (1.0 + u.allocator_overhead_frac))
        return tensors + u.reserve_bytes() + u.prefetch_bytes_per_token * micro_batch * self.seq_len

    def with_unseen(self, unseen: UnseenTerms) -> TracedMemory:
        return dataclasses.replace(self, unseen=unseen)

    def to_model_memory(self) -> ModelMemory:
        """The planner's record: static bytes as placed here, and one line in tokens above every
        traced peak (its fixed part also covers the optimizer step's transient from the smallest
        traced micro-batch up). The unseen terms are not in it: see `UnseenTerms.reserve_bytes`.
        """
        smallest = min(p.tokens for p in self.points)
        over_step = self.optimizer_step_bytes - self.activation_bytes_per_token * smallest
        offload_per_token, offload_fixed, host_per_token = None, 0, 0
        if self.offload_points:
            offload_per_token, offload_fixed, _ = fit_line(list(self.offload_points))
            # A line through zero at or above every traced host peak.
            host_per_token = max(-(-p.host_bytes // p.tokens) for p in self.offload_points)
        return ModelMemory(
            param_count=self.param_count,
            activation_bytes_per_token=max(self.activation_bytes_per_token, 1),
            param_dtype_bytes=self.param_dtype_bytes,
            step_fixed_bytes=max(self.step_fixed_bytes, over_step, offload_fixed, 0),
            trainable_count=self.trainable_count,
            static_device_bytes=dict(self.static_bytes),
            host_offload_bytes=self.host_offload_bytes,
            source="trace",
            adamw_8bit_state_bytes=self.adamw_8bit_state_bytes,
            offload_device_bytes_per_token=offload_per_token,
            offload_host_bytes_per_token=host_per_token,
            units=self.units,
        )

    def reasons(self) -> list[str]:
        """One line per figure, with the numbers behind it."""
        static = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.static_bytes.items())
        fit = ", ".join(
            f"m={p.micro_batch} {format_bytes(p.activation_bytes)}" for p in self.points
        )
        shape = (
            "linear"
            if self.linear
            else (
                f"NOT linear in tokens: the line is {self.linear_residual_frac:.1%} above a traced "
                "point, so it overestimates there"
            )
        )
        host = (
            f"; host offload {format_bytes(self.host_offload_bytes)}"
            if self.host_offload_bytes
            else ""
        )
        return [
            f"traced one optimizer step on fake {self.traced_on} tensors for {self.device_type} "
            f"in {self.trace_seconds:.1f} s: {self.param_count:,} parameters, "
            f"{self.trainable_count:,} trainable",
            f"static per rank: {static}{host}",
            *([self.quantised_reason()] if self.quantised else []),
            f"activations {self.activation_bytes_per_token:,} B/token + "
            f"{format_bytes(self.step_fixed_bytes)} fixed ({fit}; {shape})",
            f"optimizer step transient {format_bytes(self.optimizer_step_bytes)}",
            f"not seen by the trace: {self.unseen.describe()}",
        ]

    def quantised_reason(self) -> str:
        """The quantised weights in words (see explain.quantised_weights_wording)."""
        why, numbers = quantised_weights_wording(self.static_bytes, self.quantised)
        return Reason("quantised_weights", self.quantised.mode, why, numbers).text


@dataclass(frozen=True)
class ProbeReading:
    """One measured training step on the GPU."""

    micro_batch: int
    allocated_peak_bytes: int  # torch.cuda.max_memory_allocated
    reserved_peak_bytes: int  # torch.cuda.max_memory_reserved
    device_used_bytes: int  # NVML: this process's device memory (context included)


def calibrate_unseen(traced: TracedMemory, readings: Sequence[ProbeReading]) -> UnseenTerms:
    """The unseen terms from measured steps, each from its worst reading.

    Workspaces: what torch allocated beyond the trace; allocator overhead: reserved over
    allocated; CUDA context (NCCL included when the probe ran with its process group): the
    device's count beyond torch's reservation.
    """
    if not readings:
        raise ConfigError("calibrating the planner needs at least one probe reading; none given")
    for r in readings:
        if not 0 < r.allocated_peak_bytes <= r.reserved_peak_bytes:
            raise ConfigError(
                f"probe reading at micro-batch {r.micro_batch}: allocated {r.allocated_peak_bytes}"
                f" B must be positive and at most reserved {r.reserved_peak_bytes} B; re-run it"
            )
    return dataclasses.replace(
        traced.unseen,
        workspace_bytes=max(
            max(r.allocated_peak_bytes - traced.peak_bytes(r.micro_batch) for r in readings), 0
        ),
        allocator_overhead_frac=max(
            r.reserved_peak_bytes / r.allocated_peak_bytes - 1.0 for r in readings
        ),
        cuda_context_bytes=max(
            max(r.device_used_bytes - r.reserved_peak_bytes for r in readings), 0
        ),
        nccl_bytes=0,
        source="probe",
    )


def fit_line(points: list[TracePoint]) -> tuple[int, int, float]:
    """(bytes per token, fixed bytes, residual) of a line in tokens at or above every point.

    The slope is that of the two largest micro-batches, nearest the plan's choices; the fixed
    part is raised until no point is above the line. Peaks are piecewise linear in tokens (a
    loss chunk stops growing once full; another phase of the step may peak at small batches):
    then the line lies above some points, and the residual (the worst relative gap at a traced
    point) says by how much.
    """
    a, b = points[-2], points[-1]
    slope = max(0, math.ceil((b.activation_bytes - a.activation_bytes) / (b.tokens - a.tokens)))
    fixed = max(0, max(p.activation_bytes - slope * p.tokens for p in points))
    residual = max(
        abs(fixed + slope * p.tokens - p.activation_bytes) / max(p.activation_bytes, 1)
        for p in points
    )
    return slope, fixed, residual


def place_traced_states(
    static: dict[str, int],
    trainable: int,
    param_bytes: int,
    zero_stage: int,
    offload: bool,
    world_size: int,
    bucket_elements: int,
) -> tuple[dict[str, int], int, float]:
    """Per rank: (device bytes by category, host bytes, scale of the optimizer-step transient).

    Without ZeRO every rank holds what the trace saw; DDP adds gradient buckets as large as the
    gradients. ZeRO (DeepSpeed) keeps the weights whole and gives each rank a partition of the
    trainable parameters: their fp32 master copy, Adam moments and fp32 gradient; stage 2 also
    partitions the 16-bit gradients, reduced through two bucket buffers. Offload moves the
    partition and the optimizer step to host RAM.
    """
    # Quantised weights and their state stay whole on every rank, like the weights.
    placed = {
        "weights": static["weights"],
        **{k: static[k] for k in ("quantised_weights", "quant_state") if k in static},
        "buffers": static["buffers"],
        "gradients": static["gradients"],
        "optimizer": static["optimizer"],
    }
    if not zero_stage:
        if world_size > 1:
            placed["ddp_gradient_buckets"] = placed["gradients"]
        return placed, 0, 1.0
    shard = math.ceil(trainable / world_size)
    fp32_grads = shard * ZERO_FP32_GRAD_BYTES_PER_PARAM
    states = shard * ZERO_OPTIMIZER_BYTES_PER_PARAM
    traced_states = max(placed["optimizer"], 1)
    if zero_stage == 2:
        placed["gradients"] = shard * param_bytes
        placed["zero_reduce_buckets"] = 2 * min(bucket_elements, trainable) * param_bytes
    if offload:
        placed["gradients"] = 0 if zero_stage == 2 else placed["gradients"]
        placed["optimizer"] = 0
        return placed, states + fp32_grads, 0.0
    placed["gradients"] += fp32_grads
    placed["optimizer"] = states
    # The step's temporaries scale with the moments it updates: now the fp32 partition's.
    return placed, 0, shard * 8 / traced_states
