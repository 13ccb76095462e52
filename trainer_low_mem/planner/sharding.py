"""A rank's model states when the engine shards the parameters: FSDP2 and DeepSpeed ZeRO-3.

N ranks, P parameters (T trainable, H of the frozen ones kept in bf16/fp16, as a LoRA base is),
c = the compute dtype's bytes (2 under bf16/fp16, 4 under --mixed_precision no), B and B_t the
largest transformer block's parameters and trainable ones, R and R_t those outside the blocks
(embeddings, output head, final norm), V the output head's weight (the embedding's, tied).

FSDP2 as the trainer applies it (trainer_low_mem/fsdp.py, as accelerate's `fsdp2_prepare_model`
would): `fully_shard` on each transformer block, then on the root (embeddings, final norm, head),
which stays gathered from forward to the end of backward; MixedPrecisionPolicy(param_dtype c,
reduce_dtype fp32). The trainable parameters are fp32 before sharding (accelerate upcasts them
too), so the sharded parameter (a DTensor's local shard) is fp32, its gradient too:
    weights    (4 (P - H) + 2 H) / N     sharded fp32 parameters (frozen bf16 ones stay bf16)
    gradients  4 T / N                   sharded fp32 gradients (reduce-scattered in fp32)
    optimizer  8 T / N                   AdamW's two fp32 moments of the shard
    gathered_parameters  c (2 B + R)     one block all-gathered, the next one prefetched, and
                                         the root, gathered for the whole forward and backward
                                         (the head's V among R, counted once)
    gathered_gradients   4 B_t           one block's gradients in the reduce dtype (fp32: the
                                         trainer's policy, trainer_low_mem/fsdp.py) as the
                                         reduce-scatter takes them; the fresh unsharded gradient
                                         of a parameter is already in the traced step, which
                                         counts each gradient's new copy before accumulation
With fsdp_offload_params (CPUOffloadPolicy) the sharded weights, gradients and optimizer states
live in pinned host RAM and AdamW steps there; the GPU keeps the gathered working set.

DeepSpeed ZeRO-3 (deepspeed/runtime/zero/stage3.py): every parameter becomes a 16-bit
partition; the optimizer keeps an fp32 master copy, the moments and an fp32 gradient partition:
    weights    c P / N                   16-bit parameter partitions
    gradients  c T / N + 4 T / N         the flat gradient partition buffer and the fp32
                                         gradients Adam steps on (counted whole, as DeepSpeed's
                                         estimator counts them)
    optimizer  12 T / N                  fp32 master weights + moments (8 T / N under "no")
    reduce_bucket        c reduce_bucket_size   (allocated whole under contiguous_gradients)
    gathered_parameters  c (min(stage3_max_live_parameters, B + stage3_prefetch_bucket_size,
                           P - V) + V)   the blocks DeepSpeed fetches and releases, and the
                                         output head's V parameters the chunked loss reads,
                                         gathered for the whole forward and backward
                                         (registered as an external parameter, zero3.py)
offload_optimizer puts the gradient partition buffer (pinned), the fp32 gradients, the master
copy and the moments in host RAM ((c + 16) T / N; DeepSpeed's CPU Adam steps there);
offload_param moves the 16-bit partitions (c P / N) there too. The bucket sizes are those of
the shipped accelerate_configs/ds_zero3_offload.json unless given.
DeepSpeed's own estimator (`estimate_zero3_model_states_mem_needs`) counts 18 B per parameter
over N plus 4 B per parameter of the largest layer: it leaves out the 16-bit gradient partition
and the buckets (tests/trainer_low_mem/planner/test_sharding.py and `bench sizing` compare).

Activations are per micro-batch and do not change with sharding: the trace's line stands. Host
RAM while loading (load_memory.py): under FSDP2 only global rank 0 builds the whole model with
its weights; the other ranks build it on the meta device and receive rank 0's weights into
their shards (trainer_low_mem/fsdp.py, what accelerate's fsdp_cpu_ram_efficient_loading does),
so rank 0's node holds one load copy and no other rank any. Under ZeRO-3 every rank builds the
whole model on its host before DeepSpeed partitions it, as without sharding.
Export (OUTPUT_DIR/final) needs no more device memory than a training step: both engines
gather into rank 0's host RAM, FSDP2 one parameter at a time (fsdp.gathered) and ZeRO-3 one
module's own parameters at a time (zero3.gathered), each freed on the device before the next.
Rank 0's host then holds the whole model in the parameters' dtype (ZeRO-3: c P; FSDP2: its fp32
shards' 4 (P - H) + 2 H), plus a cast copy where the export dtype differs, and the other ranks
nothing. The plan's host line does not count that copy, for any engine (a whole-model rank's
export copies its weights to the host too): it comes after the load copy is freed, but beside
the offloaded states.
Quantised weights (bitsandbytes' packed codes): FSDP2 would leave them whole on every rank
(accelerate keeps them out of `fully_shard`; the trainer refuses QLoRA under FSDP2); ZeRO-3
partitions the codes like any frozen parameter (trainer_low_mem/zero3.py) and keeps their
statistics whole on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from lowmem_core.errors import ConfigError
from trainer_low_mem.planner.footprint import ModelStates
from trainer_low_mem.planner.model_memory import ShardUnits

ENGINES = ("fsdp2", "zero3")
ENGINE_NAMES = {"fsdp2": "FSDP2", "zero3": "ZeRO-3"}
FP32_BYTES = 4
ADAM_MOMENT_BYTES = 8
# accelerate_configs/ds_zero3_offload.json (elements): reduce_bucket_size,
# stage3_prefetch_bucket_size, stage3_max_live_parameters.
ZERO3_REDUCE_BUCKET_ELEMENTS = 50_000_000
ZERO3_PREFETCH_BUCKET_ELEMENTS = 50_000_000
ZERO3_MAX_LIVE_ELEMENTS = 300_000_000
# Kept whole on every rank by both engines (see the module docstring).
WHOLE_CATEGORIES = ("quantised_weights", "quant_state")


@dataclass(frozen=True)
class Zero3Buckets:
    """ZeRO-3's working-set limits, in elements (a DeepSpeed config's stage3_* settings)."""

    reduce_bucket_elements: int = ZERO3_REDUCE_BUCKET_ELEMENTS
    prefetch_bucket_elements: int = ZERO3_PREFETCH_BUCKET_ELEMENTS
    max_live_elements: int = ZERO3_MAX_LIVE_ELEMENTS


def check_engine(sharding: str | None) -> None:
    if sharding is not None and sharding not in ENGINES:
        raise ConfigError(
            f"sharding must be one of {ENGINES} or None, got {sharding!r}; launch with an "
            "accelerate config that uses FSDP (fsdp_version: 2) or DeepSpeed ZeRO stage 3"
        )


def sharded_states(
    engine: str,
    *,
    param_count: int,
    trainable_count: int,
    units: ShardUnits,
    world_size: int,
    compute_dtype_bytes: int,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    whole: Mapping[str, int] | None = None,
    buckets: Zero3Buckets | None = None,
) -> ModelStates:
    """Per-rank bytes of weights, gradients, optimizer states and the gathered working set under
    `engine` ("fsdp2" or "zero3"), and what sits in host RAM (see the module docstring).
    `param_count` excludes quantised weights, which `whole` gives by category."""
    check_engine(engine)
    n, p, t, c = world_size, param_count, trainable_count, compute_dtype_bytes
    whole = {k: v for k, v in (whole or {}).items() if v}
    name = ENGINE_NAMES[engine]
    if engine == "fsdp2":
        states = {
            "weights": math.ceil(
                (FP32_BYTES * (p - units.half_frozen) + 2 * units.half_frozen) / n
            ),
            "gradients": math.ceil(FP32_BYTES * t / n),
            "optimizer": math.ceil(ADAM_MOMENT_BYTES * t / n),
        }
        working = {
            "gathered_parameters": c * (2 * units.block_params + units.root_params),
            "gathered_gradients": FP32_BYTES * units.block_trainable,
        }
        host = sum(states.values()) if offload_params else 0
        device = {**whole, **({} if offload_params else states), **working}
        note = f" ({name} over {n} ranks" + (", sharded states in host RAM)" if host else ")")
        return ModelStates(device, host, note)
    if "quantised_weights" in whole:  # ZeRO-3 partitions the packed codes, not their state
        whole["quantised_weights"] = math.ceil(whole["quantised_weights"] / n)
    b = buckets or Zero3Buckets()
    master = FP32_BYTES if c < FP32_BYTES else 0
    weights = math.ceil(c * p / n)
    gradients = math.ceil(c * t / n) + math.ceil(FP32_BYTES * t / n)
    optimizer = math.ceil((master + ADAM_MOMENT_BYTES) * t / n)
    # The head the chunked loss reads stays gathered through the forward and backward
    # (zero3.gather_loss_head), beside the blocks DeepSpeed fetches and releases.
    head = min(units.head_params, p)
    live = min(b.max_live_elements, units.block_params + b.prefetch_bucket_elements, p - head)
    live += head
    device = {
        **whole,
        "weights": 0 if offload_params else weights,
        "gradients": 0 if offload_optimizer else gradients,
        "optimizer": 0 if offload_optimizer else optimizer,
        "reduce_bucket": c * b.reduce_bucket_elements,
        "gathered_parameters": c * live,
    }
    host = (optimizer + gradients if offload_optimizer else 0) + (weights if offload_params else 0)
    where = [
        w for w, on in (("optimizer", offload_optimizer), ("parameters", offload_params)) if on
    ]
    note = f" ({name} over {n} ranks" + (f", {' and '.join(where)} in host RAM)" if where else ")")
    return ModelStates(device, host, note)


def optimizer_step_scale(
    engine: str, trainable_count: int, world_size: int, traced_optimizer_bytes: int, offload: bool
) -> float:
    """How the traced optimizer step's transient scales: AdamW steps fp32 moments of a 1/N shard
    (on the host when the engine offloads it)."""
    if offload:
        return 0.0
    shard = math.ceil(trainable_count / world_size)
    return shard * ADAM_MOMENT_BYTES / max(traced_optimizer_bytes, 1)
