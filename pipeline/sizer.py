"""The sizer: from the machine's limits and the model's memory model, an explained `Plan`.

`plan(...)` picks the micro-batch per GPU (global batch kept fixed: micro x accumulation x
world size == global batch), reader threads, prefetch depth, the pinned pool and ultra-low-mem
mode, and records for each decision one line with the numbers behind it. Memory is modelled
linearly in the micro-batch m (sequences of seq_len tokens):

    device peak(m) = device_fixed_bytes + m * device_bytes_per_sequence
    host bytes(m)  = host_fixed_bytes   + m * host_bytes_per_sequence

so a plan can be re-derived for another micro-batch (OOM backoff, rank agreement) without the
model at hand. docs/ARCHITECTURE.md ("How the sizer decides") gives the formulas.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lowmem_core.errors import ConfigError, MemoryLimitError
from lowmem_core.memory import (
    DEFAULT_HOST_SAFETY_FRAC,
    HostMemory,
    effective_host_limit_bytes,
    format_bytes,
    gpu_memory,
    host_memory,
    own_cgroup_dirs,
)

if TYPE_CHECKING:
    import torch

    from pipeline.config import PlanConfig

MiB = 1 << 20
GiB = 1 << 30

# A batch as the loader hands it out: input_ids, labels, position_ids, each int64.
BATCH_BYTES_PER_TOKEN = 3 * 8
# A reader thread's scratch in the loader: five int64 segment arrays plus a token staging buffer
# of at most 4 bytes per token, each B*L long; and its resident stack and thread state.
READER_SCRATCH_BYTES_PER_TOKEN = 5 * 8 + 4
READER_THREAD_BYTES = 1 * MiB
# Adam keeps two fp32 moments; with 16-bit weights the optimizer also keeps an fp32 master copy.
ADAM_MOMENT_BYTES_PER_PARAM = 8
FP32_MASTER_BYTES_PER_PARAM = 4
# ZeRO CPU offload runs Adam on the host over an fp32 gradient partition next to the states.
OFFLOAD_GRAD_BYTES_PER_PARAM = 4
# The model is built in fp32 on the host before it moves to the GPU: one copy per process.
HOST_MODEL_BYTES_PER_PARAM = 4

DEFAULT_CUDA_RESERVE_BYTES = 768 * MiB  # CUDA context, cuBLAS workspaces, allocator fragmentation
DEFAULT_PROCESS_BASE_BYTES = 1 * GiB  # Python + torch (+ CUDA runtime) resident per process
DEFAULT_MAX_READERS = 4
DEFAULT_LOSS_CHUNK_TOKENS = 4096
DEFAULT_TARGET_GPU_FRAC = (0.85, 0.92)


# ----------------------------------------------------------------------------------------------
# The model's memory model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMemory:
    """What the sizer needs to know about a model's memory at training precision."""

    param_count: int
    n_layers: int
    d_model: int
    vocab_size: int
    activation_bytes_per_token: int  # saved for backward + backward working set, per token
    param_dtype_bytes: int = 2  # weights (and gradients) on the device: 2 for bf16/fp16, 4 for fp32
    step_fixed_bytes: int = 0  # per-step transients that do not grow with tokens (loss chunk, head grad)
    source: str = "analytic"  # "analytic" or "probe": how activation_bytes_per_token was obtained

    def __post_init__(self) -> None:
        for name in ("param_count", "n_layers", "d_model", "vocab_size", "activation_bytes_per_token"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelMemory.{name} must be a positive integer, got {value!r}")
        if self.param_dtype_bytes not in (2, 4):
            raise ConfigError(f"param_dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {self.param_dtype_bytes}")
        if self.step_fixed_bytes < 0:
            raise ConfigError(f"step_fixed_bytes must be >= 0, got {self.step_fixed_bytes}")

    @property
    def optimizer_bytes_per_param(self) -> int:
        """Adam moments, plus the fp32 master weights when the device weights are 16-bit."""
        master = FP32_MASTER_BYTES_PER_PARAM if self.param_dtype_bytes < 4 else 0
        return ADAM_MOMENT_BYTES_PER_PARAM + master


def analytic_model_memory(
    param_count: int,
    n_layers: int,
    d_model: int,
    n_heads: int,
    vocab_size: int,
    seq_len: int,
    grad_checkpointing: bool = False,
    dtype_bytes: int = 2,
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
    d_ff: int | None = None,
) -> ModelMemory:
    """The memory model of a pre-norm decoder (trainer_low_mem.model.DecoderLM), counted tensor by tensor.

    Per layer and token, autograd keeps (b = dtype_bytes, d = d_model, f = d_ff, h = n_heads):
    two RMSNorms, each an fp32 copy of its input (4d), its 4-byte statistic, its output and the
    linear's input (2bd); the qkv output (3bd), rotated q and k (2bd), the attention output and
    the projection's input (2bd) plus the fused kernel's fp32 log-sum-exp (4h); the MLP's hidden
    before and after the GELU (2bf). Fused attention keeps no L x L scores, so this does not
    depend on seq_len, which is only checked. Gradient checkpointing keeps just each block's
    input (bd) and recomputes one layer at a time. Backward needs about one layer's activations
    again as gradients. The chunked loss keeps d(loss)/d(hidden) (bd) per token, and per step a
    fp32 head gradient (4 V d) and one chunk's logits in three forms (chunk x V x (2b + 4)).
    """
    for name, value in (("param_count", param_count), ("n_layers", n_layers), ("d_model", d_model),
                        ("n_heads", n_heads), ("vocab_size", vocab_size), ("seq_len", seq_len),
                        ("loss_chunk_tokens", loss_chunk_tokens)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if dtype_bytes not in (2, 4):
        raise ConfigError(f"dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {dtype_bytes}")
    b, d, h = dtype_bytes, d_model, n_heads
    f = 4 * d_model if d_ff is None else d_ff
    norm = 4 * d + 4 + 2 * b * d
    layer = 2 * norm + 3 * b * d + 2 * b * d + 2 * b * d + 4 * h + 2 * b * f
    kept_per_layer = b * d if grad_checkpointing else layer
    recompute = layer if grad_checkpointing else 0
    head = norm + b * d + 8 + BATCH_BYTES_PER_TOKEN  # final norm, loss grad, targets, the batch itself
    per_token = n_layers * kept_per_layer + recompute + layer + head
    step_fixed = 4 * vocab_size * d + loss_chunk_tokens * vocab_size * (2 * b + 4)
    return ModelMemory(
        param_count=param_count,
        n_layers=n_layers,
        d_model=d_model,
        vocab_size=vocab_size,
        activation_bytes_per_token=per_token,
        param_dtype_bytes=dtype_bytes,
        step_fixed_bytes=step_fixed,
        source="analytic",
    )


def probe_model_memory(
    model: "torch.nn.Module",
    seq_len: int,
    device: "torch.device | str",
    micro_batches: tuple[int, int] = (1, 2),
    autocast_dtype: "torch.dtype | None" = None,
    vocab_size: int | None = None,
) -> ModelMemory:
    """Measure activations per token on the GPU: peak memory of one forward/backward at two micro-batches.

    The model must already sit on `device` with its training dtype. One warm-up step allocates
    the gradients and the libraries' workspaces, so the two measured peaks above the allocated
    baseline differ only by activations: their slope over the extra tokens is
    activation_bytes_per_token, and the intercept is the step's fixed transient memory.
    `autocast_dtype` (e.g. torch.bfloat16) runs the steps under autocast, as a mixed-precision
    trainer would. Random token ids stand in for data; memory does not depend on their values.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(
            f"probe_model_memory measures CUDA allocator peaks and needs a CUDA device, got {device}; "
            "use analytic_model_memory without a GPU"
        )
    m1, m2 = micro_batches
    if not 1 <= m1 < m2:
        raise ConfigError(f"micro_batches must be two increasing sizes >= 1, got {micro_batches}")
    preset = getattr(model, "preset", None)
    hf_config = getattr(model, "config", None)
    n_layers = getattr(preset, "n_layers", None) or getattr(hf_config, "num_hidden_layers", None)
    d_model = getattr(preset, "d_model", None) or getattr(hf_config, "hidden_size", None)
    vocab = vocab_size or getattr(preset, "vocab_size", None) or getattr(hf_config, "vocab_size", None)
    if not (n_layers and d_model and vocab):
        raise ConfigError(
            "cannot read n_layers/d_model/vocab_size from the model; give a DecoderLM or a transformers model")
    params = list(model.parameters())
    param_dtype_bytes = params[0].element_size()

    def step(micro: int) -> int:
        ids = torch.randint(0, vocab, (micro, seq_len), device=device)
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(ids, labels=ids)
        out.loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
        del out, ids
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
    fixed = max(0, peak1 - per_token * m1 * seq_len)
    return ModelMemory(
        param_count=sum(p.numel() for p in params),
        n_layers=int(n_layers),
        d_model=int(d_model),
        vocab_size=int(vocab),
        activation_bytes_per_token=per_token,
        param_dtype_bytes=param_dtype_bytes if param_dtype_bytes in (2, 4) else 4,
        step_fixed_bytes=fixed,
        source="probe",
    )


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything the data path and the trainer size from the machine, each with its reason."""

    micro_batch_per_gpu: int
    grad_accum_steps: int
    world_size: int
    global_batch: int  # sequences of seq_len tokens per optimizer step, over all ranks
    seq_len: int
    num_readers: int
    prefetch_depth: int
    pinned_pool_bytes: int  # per rank; 0 when pin_memory is off
    pin_memory: bool
    ultra_low_mem: bool
    gpu_budget_bytes: int  # per rank; without a GPU, this rank's share of host RAM
    gpu_peak_bytes_planned: int
    host_limit_bytes: int  # per node
    host_bytes_planned: int  # per node
    device: str  # "cuda", or "cpu" when training runs on host RAM
    ranks_per_node: int
    device_fixed_bytes: int  # device peak at micro-batch 0 (see the module docstring)
    device_bytes_per_sequence: int
    host_fixed_bytes: int  # host bytes at micro-batch 0
    host_bytes_per_sequence: int
    reasons: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        product = self.micro_batch_per_gpu * self.grad_accum_steps * self.world_size
        if min(self.micro_batch_per_gpu, self.grad_accum_steps, self.world_size) < 1 or product != self.global_batch:
            raise ConfigError(
                f"plan breaks the global batch: micro {self.micro_batch_per_gpu} x accumulation "
                f"{self.grad_accum_steps} x world {self.world_size} = {product}, not {self.global_batch}"
            )

    @property
    def per_rank_batch(self) -> int:
        """Sequences each rank processes per optimizer step."""
        return self.global_batch // self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        unknown, missing = sorted(set(d) - names), sorted(required - set(d))
        if unknown or missing:
            raise ConfigError(
                f"not a Plan dict (missing: {', '.join(missing) or 'none'}; unknown: {', '.join(unknown) or 'none'}); "
                "it was written by another version -- re-plan with `python -m pipeline plan`"
            )
        return cls(**{**d, "reasons": dict(d.get("reasons", {}))})

    # -- derived plans ----------------------------------------------------------------------
    def with_micro_batch(self, micro: int, why: str | None = None) -> Plan:
        """The same plan at another micro-batch: accumulation adjusted so the global batch is unchanged."""
        per_rank = self.per_rank_batch
        if not isinstance(micro, int) or micro < 1 or per_rank % micro:
            raise ConfigError(
                f"micro-batch {micro} does not divide the per-rank batch {per_rank} "
                f"(= global {self.global_batch} / world {self.world_size}); choose one of {_divisors(per_rank)}"
            )
        peak = self.device_fixed_bytes + micro * self.device_bytes_per_sequence
        host = self.host_fixed_bytes + micro * self.host_bytes_per_sequence
        pool = (self.prefetch_depth + 1) * micro * self.seq_len * BATCH_BYTES_PER_TOKEN
        reasons = dict(self.reasons)
        reasons["micro_batch_per_gpu"] = (
            f"{micro} (was {self.micro_batch_per_gpu}){': ' + why if why else ''}; "
            f"planned peak {format_bytes(peak)} = {_pct(peak, self.gpu_budget_bytes)} of "
            f"{format_bytes(self.gpu_budget_bytes)}"
        )
        reasons["grad_accum_steps"] = f"{per_rank // micro} = per-rank batch {per_rank} / micro {micro}"
        return dataclasses.replace(
            self,
            micro_batch_per_gpu=micro,
            grad_accum_steps=per_rank // micro,
            gpu_peak_bytes_planned=peak,
            host_bytes_planned=host,
            pinned_pool_bytes=pool if self.pin_memory else 0,
            reasons=reasons,
        )

    def backoff(self) -> Plan:
        """After an out-of-memory error: the largest valid micro-batch at most half the current one."""
        if self.micro_batch_per_gpu == 1:
            raise MemoryLimitError(
                f"out of memory at micro-batch 1 (planned peak {format_bytes(self.gpu_peak_bytes_planned)} of "
                f"{format_bytes(self.gpu_budget_bytes)}); enable gradient checkpointing, ZeRO-2 with "
                "--offload-optimizer, or a shorter --seq-len"
            )
        half = self.micro_batch_per_gpu // 2
        micro = max(m for m in _divisors(self.per_rank_batch) if m <= half)
        return self.with_micro_batch(micro, why="halved after running out of memory")

    # -- display ----------------------------------------------------------------------------
    def table(self) -> str:
        """The plan as an aligned three-column table: setting, value, reason."""
        byte_fields = {"pinned_pool_bytes", "gpu_budget_bytes", "gpu_peak_bytes_planned",
                       "host_limit_bytes", "host_bytes_planned"}
        order = ["micro_batch_per_gpu", "grad_accum_steps", "num_readers", "prefetch_depth", "pin_memory",
                 "pinned_pool_bytes", "ultra_low_mem", "gpu_budget_bytes", "gpu_peak_bytes_planned",
                 "host_limit_bytes", "host_bytes_planned"]
        rows = [("setting", "value", "reason")]
        for name in order:
            value = getattr(self, name)
            shown = format_bytes(value) if name in byte_fields else str(value)
            rows.append((name, shown, self.reasons.get(name, "")))
        width0 = max(len(r[0]) for r in rows)
        width1 = max(len(r[1]) for r in rows)
        header = (
            f"plan: global batch {self.global_batch} = micro {self.micro_batch_per_gpu} x accumulation "
            f"{self.grad_accum_steps} x world {self.world_size}; seq_len {self.seq_len} "
            f"({self.tokens_per_step:,} tokens per step); device {self.device}, {self.ranks_per_node} rank(s) per node"
        )
        lines = [header] + [f"{a:<{width0}}  {b:<{width1}}  {c}".rstrip() for a, b, c in rows]
        extra = [f"  {k}: {v}" for k, v in self.reasons.items() if k not in order]
        return "\n".join(lines + (["notes:"] + extra if extra else []))


def agree_across_ranks(plan: Plan, all_reduce_min: Callable[[int], int]) -> Plan:
    """Every rank takes the smallest micro-batch any rank planned, so none runs out of memory alone.

    `all_reduce_min(x)` returns the minimum of x over all ranks (e.g. a MIN all-reduce of a tensor).
    """
    agreed = int(all_reduce_min(plan.micro_batch_per_gpu))
    if not 1 <= agreed <= plan.micro_batch_per_gpu:
        raise ConfigError(
            f"all_reduce_min returned {agreed} for a local micro-batch of {plan.micro_batch_per_gpu}; "
            "it must return the minimum over ranks"
        )
    if agreed == plan.micro_batch_per_gpu:
        return plan
    return plan.with_micro_batch(agreed, why="the smallest micro-batch planned on any rank")


# ----------------------------------------------------------------------------------------------
# Machine readings used by plan()
# ----------------------------------------------------------------------------------------------


def usable_cores(cgroup_dir: Path | str | None = None) -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 cpu.max quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    folders = [Path(cgroup_dir)] if cgroup_dir is not None else [d for v, d in own_cgroup_dirs() if v == 2]
    for folder in folders:
        try:
            quota, period = (folder / "cpu.max").read_text().split()
        except (OSError, ValueError):
            continue
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return cores


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole > 0 else "n/a"


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """global_batch / world_size, or a ConfigError naming batch sizes and world sizes that divide."""
    for name, value in (("global_batch", global_batch), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if global_batch % world_size:
        below = global_batch - global_batch % world_size
        options = [x for x in (below, below + world_size) if x > 0]
        worlds = [d for d in _divisors(global_batch) if d > 1][:6]
        raise ConfigError(
            f"global batch {global_batch} is not divisible by world size {world_size}: each rank must take the "
            f"same number of sequences; use a global batch of {' or '.join(map(str, options))}, "
            f"or a world size dividing {global_batch} ({', '.join(map(str, worlds)) or 'only 1'})"
        )
    return global_batch // world_size


# ----------------------------------------------------------------------------------------------
# plan()
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StaticBytes:
    """Per-rank bytes that do not depend on the micro-batch."""

    weights: int
    grads: int
    optimizer_on_device: int
    offloaded: int  # this rank's optimizer states and fp32 gradient partition in host RAM
    note: str  # ZeRO / offload placement, for the reasons

    @property
    def device(self) -> int:
        return self.weights + self.grads + self.optimizer_on_device

    def describe(self) -> str:
        return (f"weights {format_bytes(self.weights)} + grads {format_bytes(self.grads)} + optimizer "
                f"{format_bytes(self.optimizer_on_device)}{self.note}")


def _static_bytes(model: ModelMemory, world_size: int, zero_stage: int, offload: bool) -> _StaticBytes:
    P, pb = model.param_count, model.param_dtype_bytes
    shard = math.ceil(P / world_size)
    if zero_stage >= 2:
        grads = shard * pb + 2 * model.d_model * model.d_model * pb  # partition + reduce buckets
    else:
        grads = P * pb
    optimizer = (shard if zero_stage >= 1 else P) * model.optimizer_bytes_per_param
    offloaded = shard * (model.optimizer_bytes_per_param + OFFLOAD_GRAD_BYTES_PER_PARAM) if offload else 0
    note = (f" (ZeRO-{zero_stage} over {world_size} ranks)" if zero_stage else "") + (
        " (offloaded to host)" if offload else "")
    return _StaticBytes(P * pb, grads, 0 if offload else optimizer, offloaded, note)


@dataclass(frozen=True)
class _Sizing:
    """The memory lines of the plan for one data-path setting (see the module docstring)."""

    depth: int
    readers: int
    ultra_low_mem: bool
    budget_bytes: int
    device_fixed_bytes: int
    device_bytes_per_sequence: int
    host_fixed_bytes: int
    host_bytes_per_sequence: int

    def device_peak(self, micro: int) -> int:
        return self.device_fixed_bytes + micro * self.device_bytes_per_sequence

    def host_bytes(self, micro: int) -> int:
        return self.host_fixed_bytes + micro * self.host_bytes_per_sequence


@dataclass(frozen=True)
class _MemoryModel:
    """Everything plan() has fixed before it tries data-path settings."""

    model: ModelMemory
    static: _StaticBytes
    seq_len: int
    on_gpu: bool
    ranks_per_node: int
    gpu_budget_bytes: int | None
    host_limit_bytes: int
    dataset_bytes: int | None
    process_base_bytes: int
    cuda_reserve_bytes: int

    def sizing(self, depth: int, readers: int, ultra_low_mem: bool) -> _Sizing:
        L, R = self.seq_len, self.ranks_per_node
        dataset = 0 if (ultra_low_mem or self.dataset_bytes is None) else self.dataset_bytes
        activations_per_seq = self.model.activation_bytes_per_token * L
        pool_per_seq = (depth + 1) * BATCH_BYTES_PER_TOKEN * L
        data_path_per_seq = pool_per_seq + readers * READER_SCRATCH_BYTES_PER_TOKEN * L
        process_fixed = self.process_base_bytes + readers * READER_THREAD_BYTES
        if self.on_gpu:
            process_fixed += self.model.param_count * HOST_MODEL_BYTES_PER_PARAM
            device_fixed = self.static.device + self.model.step_fixed_bytes + self.cuda_reserve_bytes
            device_per_seq = activations_per_seq + pool_per_seq  # the prefetcher's device copies
            return _Sizing(depth, readers, ultra_low_mem, self.gpu_budget_bytes, device_fixed, device_per_seq,
                           R * (self.static.offloaded + process_fixed) + dataset, R * data_path_per_seq)
        # CPU training: model, states and activations live in host RAM beside the data path.
        device_fixed = self.static.device + self.model.step_fixed_bytes + process_fixed
        device_per_seq = activations_per_seq + data_path_per_seq
        budget = (self.host_limit_bytes - dataset) // R
        return _Sizing(depth, readers, ultra_low_mem, budget, device_fixed, device_per_seq,
                       R * device_fixed + dataset, R * device_per_seq)


def _devices(world_size: int, gpu_budget_bytes: int | None, num_gpus_visible: int | None,
             ranks_per_node: int | None, reasons: dict[str, str]) -> tuple[bool, int, int | None]:
    """(training on GPUs, ranks per node, per-rank GPU budget) from the arguments or NVML."""
    gpus = None
    if num_gpus_visible is None:
        gpus = gpu_memory()
        num_gpus_visible = len(gpus)
    on_gpu = gpu_budget_bytes is not None or num_gpus_visible > 0
    if ranks_per_node is None:
        ranks_per_node = min(world_size, num_gpus_visible) if num_gpus_visible > 0 else world_size
    if not 1 <= ranks_per_node <= world_size:
        raise ConfigError(f"ranks_per_node must be in [1, world_size={world_size}], got {ranks_per_node}")
    if not on_gpu:
        return False, ranks_per_node, None
    if gpu_budget_bytes is not None:
        reasons["gpu_budget_bytes"] = "given"
    elif gpus is None:
        raise ConfigError(
            f"num_gpus_visible={num_gpus_visible} was given without gpu_budget_bytes; "
            "give the per-GPU budget (--gpu-budget-gb) or let the sizer read the GPUs"
        )
    else:
        gpu_budget_bytes = min(g.free_bytes for g in gpus)
        reasons["gpu_budget_bytes"] = (
            f"least free memory over {len(gpus)} visible GPU(s) (NVML): "
            + ", ".join(f"GPU {g.index} {format_bytes(g.free_bytes)}" for g in gpus)
        )
    if gpu_budget_bytes <= 0:
        raise ConfigError(f"GPU budget must be positive, got {gpu_budget_bytes} bytes")
    return True, ranks_per_node, gpu_budget_bytes


def _readers_and_depth(cores: int, ranks_per_node: int, max_readers: int, reasons: dict[str, str]) -> tuple[int, int]:
    if cores < 1:
        raise ConfigError(f"num_cores must be >= 1, got {cores}")
    cores_per_rank = max(1, cores // ranks_per_node)
    readers = min(max_readers, max(1, cores_per_rank - 1))
    capped = cores_per_rank - 1 > max_readers
    reasons["num_readers"] = (
        f"{cores} core(s) / {ranks_per_node} rank(s) = {cores_per_rank} per rank, one kept for the training loop"
        + (f", capped at {max_readers} (a [B, L] fill takes well under a millisecond)" if capped else "")
        + f" -> {readers}"
    )
    reasons["prefetch_depth"] = "max(2, readers): every reader has a batch in flight and one is always ready"
    return readers, max(2, readers)


def _choose(memory: _MemoryModel, settings: list[tuple[int, int, bool]], divisors: list[int],
            micro_given: int | None, band_top: float) -> tuple[_Sizing | None, int, list[str]]:
    """The first data-path setting under which a micro-batch fits the device and the host.

    Returns (sizing, micro-batch, why each earlier setting failed); sizing is None when none fits.
    """
    failures: list[str] = []

    def failed(message: str) -> None:
        if message not in failures:  # leaner data paths rarely change a GPU verdict: say it once
            failures.append(message)

    for depth, readers, ultra in settings:
        s = memory.sizing(depth, readers, ultra)
        ceiling = s.budget_bytes if micro_given is not None else int(band_top * s.budget_bytes)
        candidates = [micro_given] if micro_given is not None else divisors
        fits = [m for m in candidates if s.device_peak(m) <= ceiling]
        if not fits:
            m = candidates[0]
            failed(f"{'GPU' if memory.on_gpu else 'host'} at micro-batch {m}: peak "
                   f"{format_bytes(s.device_peak(m))} > {format_bytes(ceiling)}")
            continue
        micro = max(fits)
        if s.host_bytes(micro) > memory.host_limit_bytes:
            failed(f"host at depth {depth}, {readers} reader(s), ultra_low_mem {ultra}: "
                   f"{format_bytes(s.host_bytes(micro))} > limit {format_bytes(memory.host_limit_bytes)}")
            continue
        return s, micro, failures
    return None, 0, failures


def plan(
    *,
    global_batch: int,
    seq_len: int,
    world_size: int,
    model: ModelMemory,
    zero_stage: int = 0,
    offload_optimizer: bool = False,
    host_ram_limit_bytes: int | None = None,
    gpu_budget_bytes: int | None = None,
    num_gpus_visible: int | None = None,
    num_cores: int | None = None,
    dataset_bytes: int | None = None,
    micro_batch_per_gpu: int | None = None,
    target_gpu_frac: tuple[float, float] = DEFAULT_TARGET_GPU_FRAC,
    ranks_per_node: int | None = None,
    host: HostMemory | None = None,
    host_safety_frac: float = DEFAULT_HOST_SAFETY_FRAC,
    cuda_reserve_bytes: int = DEFAULT_CUDA_RESERVE_BYTES,
    process_base_bytes: int = DEFAULT_PROCESS_BASE_BYTES,
    max_readers: int = DEFAULT_MAX_READERS,
) -> Plan:
    """Size a run; see the module docstring and docs/ARCHITECTURE.md for the rules.

    Inputs left as None are read from this machine: GPUs and their free memory (NVML), cores
    (affinity and cgroup cpu.max), host RAM (psutil and the cgroup memory limit, via `host`).
    Raises ConfigError for impossible shapes and MemoryLimitError when nothing fits, before any
    training starts, with the numbers.
    """
    per_rank = per_rank_batch(global_batch, world_size)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    if zero_stage not in (0, 1, 2):
        raise ConfigError(f"zero_stage must be 0, 1 or 2, got {zero_stage!r} (stage 3 is not supported)")
    if offload_optimizer and zero_stage == 0:
        raise ConfigError("optimizer offload needs ZeRO stage 1 or 2; pass --zero-stage 2 with --offload-optimizer")
    lo, hi = target_gpu_frac
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"target_gpu_frac must satisfy 0 < low <= high <= 1, got {target_gpu_frac}")
    if max_readers < 1:
        raise ConfigError(f"max_readers must be >= 1, got {max_readers}")
    divisors = _divisors(per_rank)
    if micro_batch_per_gpu is not None and micro_batch_per_gpu not in divisors:
        raise ConfigError(
            f"micro-batch {micro_batch_per_gpu} does not divide the per-rank batch {per_rank} "
            f"(= global {global_batch} / world {world_size}); choose one of {divisors}"
        )

    reasons: dict[str, str] = {}
    on_gpu, ranks_per_node, gpu_budget_bytes = _devices(world_size, gpu_budget_bytes, num_gpus_visible,
                                                        ranks_per_node, reasons)
    host = host if host is not None else host_memory()
    host_limit = effective_host_limit_bytes(host_ram_limit_bytes, host_safety_frac, host)
    reasons["host_limit_bytes"] = (
        f"min(requested {format_bytes(host_ram_limit_bytes)}, cgroup limit {format_bytes(host.cgroup_limit_bytes)}, "
        f"total {format_bytes(host.total_bytes)}) x (1 - {host_safety_frac:g} margin)"
    )
    cores = num_cores if num_cores is not None else usable_cores()
    readers0, depth0 = _readers_and_depth(cores, ranks_per_node, max_readers, reasons)
    static = _static_bytes(model, world_size, zero_stage, offload_optimizer and on_gpu)
    memory = _MemoryModel(model, static, seq_len, on_gpu, ranks_per_node, gpu_budget_bytes, host_limit,
                          dataset_bytes, process_base_bytes, cuda_reserve_bytes)

    # Data-path settings from best to leanest: memory-mapped, ultra-low-mem, depth 1, one reader.
    settings = [(depth0, readers0, False)]
    if dataset_bytes:
        settings.append((depth0, readers0, True))
    if depth0 > 1:
        settings.append((1, readers0, bool(dataset_bytes)))
    if readers0 > 1:
        settings.append((1, 1, bool(dataset_bytes)))
    s, micro, failures = _choose(memory, settings, divisors, micro_batch_per_gpu, hi)
    if s is None:
        raise MemoryLimitError(_nothing_fits_message(failures, memory, zero_stage, offload_optimizer, world_size))

    peak = s.device_peak(micro)
    pct = _pct(peak, s.budget_bytes)
    if micro_batch_per_gpu is not None:
        band = ("inside" if lo * s.budget_bytes <= peak <= hi * s.budget_bytes
                else "above" if peak > hi * s.budget_bytes else "below")
        reasons["micro_batch_per_gpu"] = (
            f"given; planned peak {format_bytes(peak)} = {pct} of the budget, {band} the {lo:.0%}-{hi:.0%} band")
    elif micro == per_rank:
        below = "; below the band, nothing larger to run" if peak < lo * s.budget_bytes else ""
        reasons["micro_batch_per_gpu"] = (
            f"the whole per-rank batch {per_rank} fits: peak {format_bytes(peak)} = {pct} of the budget "
            f"(no accumulation needed{below})"
        )
    else:
        nxt = divisors[divisors.index(micro) + 1]
        reasons["micro_batch_per_gpu"] = (
            f"largest divisor of the per-rank batch {per_rank} with peak <= {hi:.0%} of the budget: "
            f"{format_bytes(peak)} = {pct}; {nxt} would need {_pct(s.device_peak(nxt), s.budget_bytes)}"
        )
    reasons["grad_accum_steps"] = (
        f"{per_rank // micro} = global {global_batch} / (world {world_size} x micro {micro}); global batch unchanged")
    reasons["gpu_peak_bytes_planned"] = (
        f"{static.describe()} + activations {format_bytes(model.activation_bytes_per_token)}/token ({model.source}) "
        f"x {micro} x {seq_len} + step transients {format_bytes(model.step_fixed_bytes)}"
        + (f" + prefetch copies + CUDA reserve {format_bytes(cuda_reserve_bytes)}" if on_gpu
           else " + process and data path (CPU training: host RAM)")
    )
    if not on_gpu:
        mapped = " - mapped dataset" if dataset_bytes and not s.ultra_low_mem else ""
        reasons["gpu_budget_bytes"] = (
            f"no GPU: this rank's share of the host limit, ({format_bytes(host_limit)}{mapped}) / "
            f"{ranks_per_node} rank(s)")
    why = f" to fit the host limit ({failures[-1]})" if failures else ""
    if s.readers != readers0:
        reasons["num_readers"] += f"; lowered to {s.readers}{why}"
    if s.depth != depth0:
        reasons["prefetch_depth"] += f"; lowered from {depth0} to {s.depth}{why}"
    pool_bytes = (s.depth + 1) * micro * seq_len * BATCH_BYTES_PER_TOKEN
    reasons["pin_memory"] = ("CUDA present: page-locked buffers copy asynchronously at full PCIe rate" if on_gpu
                             else "no GPU: nothing to copy to, pinned memory would only lock RAM")
    reasons["pinned_pool_bytes"] = (
        f"(depth {s.depth} + 1) buffer sets x {micro} x {seq_len} tokens x {BATCH_BYTES_PER_TOKEN} B" if on_gpu
        else f"0 (pageable pool of {format_bytes(pool_bytes)} instead)"
    )
    if dataset_bytes is None:
        reasons["ultra_low_mem"] = (
            "dataset size not given: memory-mapped (its page cache is shared and reclaimable, not counted)")
    elif s.ultra_low_mem:
        reasons["ultra_low_mem"] = (
            f"dataset {format_bytes(dataset_bytes)} does not fit beside the rest under the host limit "
            f"{format_bytes(host_limit)}: pread + drop from page cache keeps resident memory flat"
        )
    else:
        reasons["ultra_low_mem"] = (
            f"dataset {format_bytes(dataset_bytes)} fits in the page cache beside the rest: "
            "memory-mapped, shared by all ranks"
        )
    host_bytes = s.host_bytes(micro)
    reasons["host_bytes_planned"] = (
        f"{format_bytes(host_bytes)} = {_pct(host_bytes, host_limit)} of the limit: "
        + (f"mapped dataset {format_bytes(dataset_bytes)} + " if dataset_bytes and not s.ultra_low_mem else "")
        + f"{ranks_per_node} rank(s) x (process {format_bytes(process_base_bytes)}"
        + (f" + offloaded optimizer {format_bytes(static.offloaded)}" if static.offloaded else "")
        + (f" + fp32 model copy {format_bytes(model.param_count * HOST_MODEL_BYTES_PER_PARAM)}" if on_gpu
           else " + training state")
        + f" + prefetch pool + {s.readers} reader(s))"
    )
    return Plan(
        micro_batch_per_gpu=micro,
        grad_accum_steps=per_rank // micro,
        world_size=world_size,
        global_batch=global_batch,
        seq_len=seq_len,
        num_readers=s.readers,
        prefetch_depth=s.depth,
        pinned_pool_bytes=pool_bytes if on_gpu else 0,
        pin_memory=on_gpu,
        ultra_low_mem=s.ultra_low_mem,
        gpu_budget_bytes=s.budget_bytes,
        gpu_peak_bytes_planned=peak,
        host_limit_bytes=host_limit,
        host_bytes_planned=host_bytes,
        device="cuda" if on_gpu else "cpu",
        ranks_per_node=ranks_per_node,
        device_fixed_bytes=s.device_fixed_bytes,
        device_bytes_per_sequence=s.device_bytes_per_sequence,
        host_fixed_bytes=s.host_fixed_bytes,
        host_bytes_per_sequence=s.host_bytes_per_sequence,
        reasons=reasons,
    )


def _nothing_fits_message(failures: list[str], memory: _MemoryModel, zero_stage: int, offload: bool,
                          world_size: int) -> str:
    static = memory.static
    hints = []
    if failures[0].startswith("GPU"):
        if zero_stage < 2 and world_size > 1:
            hints.append("--zero-stage 2 partitions gradients and optimizer states over the ranks")
        if not offload and static.optimizer_on_device:
            hints.append(f"--offload-optimizer moves {format_bytes(static.optimizer_on_device)} of optimizer "
                         "states to host RAM")
        hints.append("gradient checkpointing or a shorter --seq-len cuts activations")
    else:
        if static.offloaded:
            hints.append(f"the offloaded optimizer takes {format_bytes(memory.ranks_per_node * static.offloaded)}: "
                         "drop --offload-optimizer if the GPU can hold it")
        hints.append("raise the host RAM limit, or run fewer ranks per node")
    tried = failures if len(failures) <= 2 else [failures[0], f"... {failures[-1]}"]
    per_seq = memory.model.activation_bytes_per_token * memory.seq_len
    return (
        f"no plan fits ({'; '.join(tried)}). Static memory per rank: {static.describe()}; activations "
        f"{format_bytes(per_seq)} per sequence; host limit {format_bytes(memory.host_limit_bytes)}. "
        f"Try: {'; '.join(hints)}"
    )


# ----------------------------------------------------------------------------------------------
# The `python -m pipeline plan` subcommand
# ----------------------------------------------------------------------------------------------


def dataset_size_bytes(path: Path | str) -> int:
    """Bytes of a dataset's tokens (what a memory map of it would bring into the page cache)."""
    from pipeline.dataset import open_dataset

    with open_dataset(path, ultra_low_mem=True) as ds:
        return ds.token_bytes


def plan_from_config(cfg: "PlanConfig") -> Plan:
    """Resolve the model preset, build its analytic memory model and plan."""
    from trainer_low_mem.model import resolve_preset

    preset = resolve_preset(cfg.model_preset, cfg.vocab_size)
    if cfg.seq_len > preset.max_seq_len:
        raise ConfigError(
            f"--seq-len {cfg.seq_len} exceeds preset {cfg.model_preset!r}'s max_seq_len {preset.max_seq_len}"
        )
    dtype_bytes = 4 if cfg.precision == "fp32" else 2
    model = analytic_model_memory(
        param_count=preset.param_count(), n_layers=preset.n_layers, d_model=preset.d_model,
        n_heads=preset.n_heads, vocab_size=preset.vocab_size, seq_len=cfg.seq_len,
        grad_checkpointing=cfg.grad_checkpointing, dtype_bytes=dtype_bytes, d_ff=preset.d_ff,
    )
    gb = None if cfg.gpu_budget_gb is None else int(cfg.gpu_budget_gb * GiB)
    return plan(
        global_batch=cfg.global_batch,
        seq_len=cfg.seq_len,
        world_size=cfg.world_size,
        model=model,
        zero_stage=cfg.zero_stage,
        offload_optimizer=cfg.offload_optimizer,
        host_ram_limit_bytes=None if cfg.host_ram_limit_gb is None else int(cfg.host_ram_limit_gb * GiB),
        gpu_budget_bytes=gb,
        num_cores=cfg.num_cores,
        dataset_bytes=None if cfg.dataset is None else dataset_size_bytes(cfg.dataset),
        micro_batch_per_gpu=cfg.micro_batch_per_gpu,
        ranks_per_node=cfg.ranks_per_node,
    )
