"""Device memory of one training step, traced on fake tensors: no allocation, no GPU needed.

The model is built on the meta device and its weights re-made as fake tensors; one optimizer
step (forward with the model's own loss, backward, a micro-step accumulating into the kept
gradients, AdamW's step) runs at a few micro-batch sizes while every live tensor storage is
counted. The result, a `TracedMemory` (traced_memory.py), has static bytes by category with the
ZeRO/offload placement applied, a line in tokens for activations, and named terms for what fake
tensors cannot see. `bench plan` checks it against torch's MemTracker around real steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lowmem_core.errors import ConfigError, LowMemError
from pipeline.batch_spec import BatchSpec, TokenRows
from trainer_low_mem.planner.model_memory import QuantisedWeights, ShardUnits
from trainer_low_mem.planner.optimizer_states import adamw_8bit_state_bytes
from trainer_low_mem.planner.saved_activations import offload_saved_activations
from trainer_low_mem.planner.sharding import (
    WHOLE_CATEGORIES,
    Zero3Buckets,
    check_engine,
    optimizer_step_scale,
    sharded_states,
)
from trainer_low_mem.planner.traced_memory import (
    DEFAULT_REDUCE_BUCKET_ELEMENTS,
    OffloadPoint,
    TracedMemory,
    TracePoint,
    UnseenTerms,
    fit_line,
    place_traced_states,
)

CUDA_BLOCK_BYTES = 512  # the caching allocator rounds every allocation up to this
_AUTOCAST = {None: None, "no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_FACTORY_REMEDY = (
    "give a factory that builds the model from its config on the default device (no weight "
    "loading, no .to(device)), or plan with the analytic estimate"
)


def trace_step_memory(
    model_factory: Callable[[], nn.Module],
    *,
    seq_len: int,
    micro_batches: Sequence[int] = (1, 2, 4),
    device_type: str = "cuda",
    mixed_precision: str | None = None,
    zero_stage: int = 0,
    offload_optimizer: bool = False,
    world_size: int = 1,
    reduce_bucket_elements: int = DEFAULT_REDUCE_BUCKET_ELEMENTS,
    prefetch_depth: int = 2,
    batch_spec: BatchSpec | None = None,
    sharding: str | None = None,
    offload_params: bool = False,
    zero3_buckets: Zero3Buckets | None = None,
) -> TracedMemory:
    """Trace one AdamW training step of `model_factory()` at each micro-batch (rows of seq_len).

    The factory builds the model as the trainer would (grad checkpointing, LoRA adapters, loss
    chunking included) from a config: it runs under the meta device, so it must not load weights or
    move the model. It is called with the example batches of `batch_spec` (pipeline/batch_spec.py;
    default rows of seq_len tokens) as keyword arguments and returns an object with `.loss`; tokens
    are counted as rows x seq_len whatever the spec; only parameters with requires_grad get
    gradients and optimizer states. `mixed_precision` "bf16"/"fp16" autocasts over fp32 weights, or
    under ZeRO (DeepSpeed) makes the weights 16-bit, as DeepSpeed does. Autograd on fake CUDA
    tensors needs a CUDA device (a CPU build of torch aborts), so without one the step runs on fake
    CPU tensors with CUDA's choices (foreach AdamW, 512-byte blocks); both take fused attention
    kernels. `sharding` ("fsdp2", "zero3") places the states as that engine shards them
    (planner/sharding.py) over 16-bit weights, as both gather them for compute;
    `offload_params` keeps the shards in host RAM.
    """
    check_engine(sharding)
    _check_arguments(
        seq_len,
        micro_batches,
        device_type,
        mixed_precision,
        zero_stage,
        offload_optimizer and not sharding,  # ZeRO-3's offload: sharding.py places it
        world_size,
    )
    started = time.perf_counter()
    traced_on = "cuda" if device_type == "cuda" and torch.cuda.is_available() else "cpu"
    half = _AUTOCAST[mixed_precision]
    weights_dtype = half if zero_stage or sharding else None
    model = _build_on_meta(model_factory)
    units = shard_units(model)  # before the weights take the traced dtype
    _plan_quantised_kernels_for(model, device_type)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _make_fake(model, torch.device(traced_on), weights_dtype)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError(
                "cannot trace the model: it has no trainable parameters; unfreeze some or add "
                "LoRA adapters"
            )
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=device_type == "cuda")
        step = _Step(
            model,
            optimizer,
            seq_len,
            batch_spec or TokenRows(seq_len),
            traced_on,
            autocast=half if sharding or not weights_dtype else None,
            round_to=CUDA_BLOCK_BYTES if device_type == "cuda" else 1,
        )
        static, optimizer_peak, points = step.run(sorted(set(micro_batches)))
        # Activation offload pays only with a GPU: on the CPU the activations are host RAM.
        # Its line is fitted through the two largest sizes, as the plain line's slope is.
        offload_points = step.offload_run(sorted(set(micro_batches))[-2:], static, device_type)
        round_to = CUDA_BLOCK_BYTES if device_type == "cuda" else 1
        adamw_8bit_bytes = adamw_8bit_state_bytes((p.numel() for p in trainable), round_to)
    n_trainable = sum(p.numel() for p in trainable)
    param_dtype_bytes = trainable[0].element_size()
    slope, fixed, residual = fit_line(points)
    if sharding is None:
        placed, host, step_scale = place_traced_states(
            static,
            n_trainable,
            param_dtype_bytes,
            zero_stage,
            offload_optimizer,
            world_size,
            reduce_bucket_elements,
        )
    else:
        whole = {k: static[k] for k in WHOLE_CATEGORIES if k in static}
        states = sharded_states(
            sharding,
            param_count=_unquantised_param_count(model),
            trainable_count=n_trainable,
            units=units,
            world_size=world_size,
            compute_dtype_bytes=2 if half is not None else 4,
            offload_optimizer=offload_optimizer,
            offload_params=offload_params,
            whole=whole,
            buckets=zero3_buckets,
        )
        placed, host = {**states.device, "buffers": static["buffers"]}, states.offloaded
        offloaded_step = offload_params if sharding == "fsdp2" else offload_optimizer
        step_scale = optimizer_step_scale(
            sharding, n_trainable, world_size, static["optimizer"], offloaded_step
        )
    return TracedMemory(
        param_count=_parameter_count(model),
        trainable_count=n_trainable,
        param_dtype_bytes=param_dtype_bytes,
        seq_len=seq_len,
        device_type=device_type,
        traced_on=traced_on,
        static_bytes=placed,
        host_offload_bytes=host,
        activation_bytes_per_token=slope,
        step_fixed_bytes=fixed,
        optimizer_step_bytes=math.ceil((optimizer_peak - sum(static.values())) * step_scale),
        linear_residual_frac=residual,
        points=tuple(points),
        unseen=UnseenTerms.defaults(device_type, world_size, prefetch_depth),
        trace_seconds=time.perf_counter() - started,
        quantised=_quantised_weights(model),
        adamw_8bit_state_bytes=adamw_8bit_bytes,
        offload_points=tuple(offload_points),
        units=dataclasses.replace(units, compute_dtype_bytes=2 if half is not None else 4),
    )


def shard_units(model: nn.Module) -> ShardUnits:
    """How a sharding engine cuts `model`: its transformer blocks are the children of its
    largest ModuleList (what accelerate's transformer-layer wrapping wraps), the rest is root."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    counted = list(model.parameters())  # a tied weight once

    def size(module: nn.Module, trainable: bool = False) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)

    blocks = list(max(lists, key=size)) if lists else []
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = [p for p in counted if id(p) not in in_blocks]
    largest = max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0
    )
    return ShardUnits(
        block_params=max((size(b) for b in blocks), default=0),
        block_trainable=max((size(b, trainable=True) for b in blocks), default=0),
        root_params=sum(p.numel() for p in root),
        root_trainable=sum(p.numel() for p in root if p.requires_grad),
        half_frozen=sum(
            p.numel()
            for p in counted
            if not p.requires_grad and p.is_floating_point() and p.element_size() == 2
        ),
        largest_layer_params=largest,
        head_params=sum(p.numel() for p in getattr(model, "loss_head_parameters", list)()),
    )


def _unquantised_param_count(model: nn.Module) -> int:
    """Parameters outside the packed quantised weights (those stay whole under sharding)."""
    packed = {id(t) for t in _quantised_tensors(model).get("quantised_weights", [])}
    return sum(p.numel() for p in model.parameters() if id(p) not in packed)


def _plan_quantised_kernels_for(model: nn.Module, device_type: str) -> None:
    """Quantised layers' kernels allocate differently on CUDA and on the CPU: a layer with a
    `planned_device_type` (trainer_low_mem/models/quantised_meta.py) allocates as on the device
    planned for, whatever device the fake tensors are on."""
    for module in model.modules():
        if hasattr(module, "planned_device_type"):
            module.planned_device_type = device_type


def _parameter_count(model: nn.Module) -> int:
    """Parameters as the model has them unquantised (a packed 4-bit weight holds two per
    element)."""
    count = sum(p.numel() for p in model.parameters())
    quantised = _quantised_weights(model)
    if quantised is None:
        return count
    packed = _quantised_tensors(model).get("quantised_weights", [])
    return count - sum(t.numel() for t in packed) + quantised.quantised_params


def _quantised_weights(model: nn.Module) -> QuantisedWeights | None:
    """The model's `quantised_weights` record, where a module of it carries one."""
    for module in model.modules():
        record = getattr(module, "quantised_weights", None)
        if isinstance(record, QuantisedWeights):
            return record
    return None


def _check_arguments(
    seq_len, micro_batches, device_type, mixed_precision, zero_stage, offload_optimizer, world_size
) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    sizes = sorted(set(micro_batches))
    if len(sizes) < 2 or sizes[0] < 1:
        raise ConfigError(
            f"micro_batches needs two or more distinct sizes >= 1 to fit a line, got "
            f"{tuple(micro_batches)}"
        )
    if device_type not in ("cuda", "cpu"):
        raise ConfigError(f"device_type must be cuda or cpu, got {device_type!r}")
    if mixed_precision not in _AUTOCAST:
        raise ConfigError(f"mixed_precision must be bf16, fp16 or no, got {mixed_precision!r}")
    if zero_stage not in (0, 1, 2):
        raise ConfigError(f"zero_stage must be 0, 1 or 2, got {zero_stage!r}")
    if offload_optimizer and not zero_stage:
        raise ConfigError("optimizer offload needs ZeRO stage 1 or 2; pass --zero_stage 2")
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")


def _build_on_meta(model_factory: Callable[[], nn.Module]) -> nn.Module:
    try:
        with torch.device("meta"):
            model = model_factory()
    except LowMemError:
        raise
    except Exception as exc:  # noqa: BLE001 (any failure of the caller's code becomes one line)
        raise ConfigError(
            f"cannot trace the model: its factory failed on the meta device "
            f"({type(exc).__name__}: {_first_line(exc)}); {_FACTORY_REMEDY}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"cannot trace the model: its factory returned {type(model).__name__}, not a torch "
            f"nn.Module; {_FACTORY_REMEDY}"
        )
    placed = {t.device.type for t in [*model.parameters(), *model.buffers()]} - {"meta"}
    if placed:
        raise ConfigError(
            f"cannot trace the model: its factory put tensors on {', '.join(sorted(placed))}, "
            f"not on the meta device it runs under; {_FACTORY_REMEDY}"
        )
    return model


def _make_fake(model: nn.Module, device: torch.device, weights_dtype: torch.dtype | None) -> None:
    """Replace every meta parameter and buffer by an uninitialised fake tensor on `device`.

    By assignment, not `model.to()`: `Module.to` cannot convert fake parameters (it swaps
    tensors, which their weak references forbid). Tied weights stay tied.
    """
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (meta, kept alive; fake)

    def fake(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        if id(t) not in made:
            dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
            new = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device)
            if isinstance(t, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            made[id(t)] = (t, new)
        return made[id(t)][1]

    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, fake(param, weights_dtype))
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, fake(buffer, None))


class _LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages while active, and their peak.

    Counts the storages of the `held` tensors and of every op's outputs, each storage once
    (views share it) until it is freed, rounded up to `round_to`; the storages of `ignored`
    tensors are never counted. Much cheaper per op than torch's MemTracker, whose per-module
    bookkeeping makes a 1B model take minutes.
    """

    def __init__(
        self, held: Iterable[torch.Tensor], round_to: int, ignored: Iterable[torch.Tensor] = ()
    ) -> None:
        super().__init__()
        self.round_to, self.live, self.peak = round_to, 0, 0
        self.host_live = self.host_peak = 0  # storages made by `host_copy` (offload copies)
        self._on_host = False
        self._ignored = {id(t.untyped_storage()) for t in ignored}
        self._finalizers: dict[int, weakref.finalize] = {}
        for t in held:
            self._count(t)
        self.start = self.peak = self.live

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key not in self._finalizers and key not in self._ignored:
            nbytes = -(-storage.nbytes() // self.round_to) * self.round_to
            if self._on_host:
                self.host_live += nbytes
                self.host_peak = max(self.host_peak, self.host_live)
            else:
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            free = self._free_host if self._on_host else self._free
            self._finalizers[key] = weakref.finalize(storage, free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        del self._finalizers[key]

    def _free_host(self, key: int, nbytes: int) -> None:
        self.host_live -= nbytes
        del self._finalizers[key]

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` counted as host RAM, as activation offload makes it."""
        self._on_host = True
        try:
            return t.detach().clone()
        finally:
            self._on_host = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._count(leaf)
        return out

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for finalizer in self._finalizers.values():
            finalizer.detach()


class _Step:
    """The training step on fake tensors, its phases measured by `_LiveBytes`."""

    def __init__(
        self, model, optimizer, seq_len, batch_spec, device_type, autocast, round_to
    ) -> None:
        self.model, self.optimizer, self.seq_len = model, optimizer, seq_len
        self.batch_spec = batch_spec
        self.device_type, self.autocast, self.round_to = device_type, autocast, round_to

    def held(self) -> dict[str, list[torch.Tensor]]:
        """Tensors alive across micro-steps, by category."""
        params = list(self.model.parameters())
        quantised = _quantised_tensors(self.model)
        stored = {id(t) for ts in quantised.values() for t in ts}
        states = [
            t
            for state in self.optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        ]
        return {
            "weights": [p for p in params if id(p) not in stored],
            **quantised,
            "buffers": [b for b in self.model.buffers() if id(b) not in stored],
            "gradients": [p.grad for p in params if p.grad is not None],
            "optimizer": states,
        }

    def static_bytes(self) -> dict[str, int]:
        """Bytes of each category of held tensors (a shared storage counted once)."""
        counted: set[int] = set()
        out = {}
        for name, tensors in self.held().items():
            fresh = [t for t in tensors if id(t.untyped_storage()) not in counted]
            with _LiveBytes(fresh, self.round_to) as live:
                out[name] = live.start
            counted.update(id(t.untyped_storage()) for t in tensors)
        return out

    def peak(
        self, phase: Callable[[], object], batch: dict[str, torch.Tensor] | None = None
    ) -> int:
        """Peak live bytes during `phase`, the held tensors included and the batch left out
        (it is one of the prefetcher's buffers, which the plan counts)."""
        held = [t for ts in self.held().values() for t in ts]
        ignored = tuple(batch.values()) if batch is not None else ()
        with _LiveBytes(held, self.round_to, ignored=ignored) as live:
            phase()
        return live.peak

    def batch(self, micro_batch: int) -> dict[str, torch.Tensor]:
        """A micro-batch of the shapes the loader makes for this model."""
        return self.batch_spec.example(micro_batch, self.device_type)

    def micro_step(self, batch: dict[str, torch.Tensor], saved=contextlib.nullcontext) -> None:
        """Forward with the model's own loss (under the `saved()` hooks), and backward."""
        try:
            with (
                torch.autocast(
                    self.device_type, dtype=self.autocast, enabled=self.autocast is not None
                ),
                saved(),
            ):
                out = self.model(**batch)
            loss = getattr(out, "loss", None)
            if not isinstance(loss, torch.Tensor):
                kind = "a tensor" if isinstance(out, torch.Tensor) else type(out).__name__
                raise ConfigError(
                    f"cannot trace the model: model(**batch) returned "
                    f"{kind} without a .loss tensor; wrap it to return its loss"
                )
            loss.backward()
        except LowMemError:
            raise
        except Exception as exc:  # noqa: BLE001 (any failure of the model becomes one line)
            raise ConfigError(
                f"cannot trace the model's training step on fake tensors ({type(exc).__name__}: "
                f"{_first_line(exc)}); plan with the analytic estimate or a GPU probe instead"
            ) from exc

    def run(self, micro_batches: list[int]) -> tuple[dict[str, int], int, list[TracePoint]]:
        """(static bytes by category, optimizer-step peak, one point per micro-batch).

        A first step creates the gradients and the optimizer states. Then, with both resident
        (as in every micro-step but the first of an optimizer step), the optimizer step and one
        micro-step per size, accumulating into the gradients, are measured.
        """
        first = self.batch(micro_batches[0])
        self.micro_step(first)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.micro_step(first)
        static = self.static_bytes()
        optimizer_peak = self.peak(self.optimizer.step)
        points = []
        for m in micro_batches:
            batch = self.batch(m)
            peak = self.peak(lambda batch=batch: self.micro_step(batch), batch)
            points.append(TracePoint(m, m * self.seq_len, peak, peak - sum(static.values())))
        self.optimizer.zero_grad(set_to_none=True)
        return static, optimizer_peak, points

    def offload_run(
        self, micro_batches: list[int], static: dict[str, int], device_type: str
    ) -> list[OffloadPoint]:
        """One micro-step per size with the trainer's activation-offload hooks: the device peak
        without the offloaded activations, and the host bytes they take (none on the CPU)."""
        if device_type != "cuda":
            return []
        self.micro_step(self.batch(micro_batches[0]))  # gradients resident, as in `run`
        held = [t for ts in self.held().values() for t in ts]
        points = []
        for m in micro_batches:
            batch = self.batch(m)
            with _LiveBytes(held, self.round_to, ignored=tuple(batch.values())) as live:
                device = torch.device(self.device_type)
                params = list(self.model.parameters())

                def saved(live=live, device=device, params=params):
                    return offload_saved_activations(
                        params, device, pin_memory=False, host_copy=live.host_copy
                    )

                self.micro_step(batch, saved)
            activations = live.peak - sum(static.values())
            points.append(OffloadPoint(m, m * self.seq_len, live.peak, activations, live.host_peak))
        self.optimizer.zero_grad(set_to_none=True)
        return points


def _quantised_tensors(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Packed weights and quantisation state by category ("quantised_weights", "quant_state"),
    from the layers that store them with a `quantised_tensors()` method; empty for a model
    without quantised layers."""
    out: dict[str, list[torch.Tensor]] = {}
    for module in model.modules():
        if hasattr(module, "quantised_tensors"):
            for category, tensors in module.quantised_tensors().items():
                out.setdefault(category, []).extend(tensors)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"
