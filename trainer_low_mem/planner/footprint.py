"""A rank's memory as straight lines in the micro-batch m (sequences of seq_len tokens):

    device peak(m) = device_fixed_bytes + m * device_bytes_per_sequence
    host bytes(m)  = host_fixed_bytes   + m * host_bytes_per_sequence   (the whole node)

`Footprint` holds the per-rank figures the lines are made from, so a plan can be re-derived for
another micro-batch, prefetch depth, reader count or reader mode without the model at hand; it
is saved with the plan. `place_model_states` puts weights, gradients and optimizer states on the
device or the host under ZeRO and CPU offload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lowmem_core.memory import format_bytes
from pipeline.cost import BATCH_BYTES_PER_TOKEN, READER_SCRATCH_BYTES_PER_TOKEN, READER_THREAD_BYTES
from trainer_low_mem.planner.model_memory import ModelMemory
from trainer_low_mem.planner.optimizer_states import adamw_8bit_state_bytes

# ZeRO CPU offload runs Adam on the host over an fp32 gradient partition next to the states.
OFFLOAD_GRAD_BYTES_PER_PARAM = 4


@dataclass(frozen=True)
class ModelStates:
    """Per-rank bytes of weights, gradients and optimizer states, and where they live."""

    device: dict[str, int]  # on the device, by kind (weights, gradients, optimizer, ...)
    offloaded: int  # in host RAM: offloaded optimizer states and their fp32 gradients
    note: str  # the placement, for the explanation

    @property
    def device_bytes(self) -> int:
        return sum(self.device.values())

    def describe(self) -> str:
        parts = " + ".join(f"{kind} {format_bytes(n)}" for kind, n in self.device.items())
        return parts + self.note


def place_model_states(
    model: ModelMemory,
    world_size: int,
    zero_stage: int,
    offload: bool,
    placement: str | None = None,
) -> ModelStates:
    """Weights stay whole on every rank; ZeRO-1 shards optimizer states, ZeRO-2 gradients too.
    `placement` names a parameter-sharding engine's placement, already in `model`."""
    if model.static_device_bytes is not None:  # a trace (or sharding.py) placed them itself
        placement = placement or f"ZeRO-{zero_stage}"
        return ModelStates(
            dict(model.static_device_bytes),
            model.host_offload_bytes,
            f" ({model.source}: {placement} placement applied by it)",
        )
    params, trainable, pb = model.param_count, model.trainable, model.param_dtype_bytes
    shard = math.ceil(trainable / world_size)
    if zero_stage >= 2:
        buckets = 2 * model.d_model * model.d_model * pb if model.d_model else 0
        grads = shard * pb + buckets  # this rank's partition + the reduce buckets
    else:
        grads = trainable * pb
    optimizer = (shard if zero_stage >= 1 else trainable) * model.optimizer_bytes_per_param
    offloaded = shard * (model.optimizer_bytes_per_param + OFFLOAD_GRAD_BYTES_PER_PARAM)
    note = f" (ZeRO-{zero_stage} over {world_size} ranks)" if zero_stage else ""
    note += " (optimizer offloaded to host)" if offload else ""
    device = {"weights": params * pb, "gradients": grads, "optimizer": 0 if offload else optimizer}
    return ModelStates(device, offloaded if offload else 0, note)


def with_optimizer(states: ModelStates, model: ModelMemory, optimizer: str) -> ModelStates:
    """`states` with the device optimizer states of `optimizer`: bitsandbytes' AdamW8bit keeps
    uint8 moments and per-block fp32 maxima where AdamW keeps fp32 moments (no ZeRO: the
    planner refuses 8-bit states under DeepSpeed)."""
    if optimizer != "adamw_8bit":
        return states
    eight_bit = model.adamw_8bit_state_bytes
    if eight_bit is None:
        eight_bit = adamw_8bit_state_bytes([model.trainable])
    device = {**states.device, "optimizer": eight_bit}
    return ModelStates(device, states.offloaded, states.note + " (8-bit AdamW states)")


@dataclass(frozen=True)
class Lines:
    """The memory lines of one data-path setting, and the budget the device line must fit."""

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
class Footprint:
    """Per-rank figures a plan is sized from (see the module docstring)."""

    device: str  # "cuda", or "cpu" when the model trains in host RAM
    seq_len: int
    ranks_per_node: int
    host_limit_bytes: int  # per node, with the safety margin taken off
    budget_bytes: int | None  # GPU: per-rank budget; CPU: cap on the rank's share (None: none)
    model_device_bytes: int  # weights, gradients, device optimizer states, step transients
    activation_bytes_per_token: int
    process_bytes: int  # per process in host RAM: interpreter and libraries
    offloaded_bytes: int  # per rank in host RAM: offloaded optimizer states
    cuda_reserve_bytes: int  # CUDA context, workspaces, allocator fragmentation
    dataset_bytes: int  # tokens of the dataset, in the page cache unless ultra-low-mem; 0: unknown
    target_frac: tuple[float, float]  # the band a chosen micro-batch's device peak aims at
    states: str = ""  # weights, gradients and optimizer states and their placement, in words
    step_fixed_bytes: int = 0  # part of model_device_bytes: the step's fixed transients
    source: str = "analytic"  # of the activation figure
    index_bytes: int = 0  # the node's shared epoch index and offsets (page cache), once per node
    optimizer: str = "adamw"  # "adamw", "adamw_8bit", or "deepspeed_cpu_adam" under ZeRO offload
    offload_activations: bool = False  # saved activations wait in pinned host RAM
    host_activation_bytes_per_token: int = 0  # those, per token of one micro-batch
    grad_checkpointing: bool = False  # as given: it decides activation_bytes_per_token
    zero_stage: int = 0  # DeepSpeed ZeRO stage (8-bit AdamW runs without DeepSpeed only)
    # GPU: per process in host RAM, the model's copy while it loads (load_memory.py). It is
    # freed when the model moves to its GPU (the trainer's `.to(device)`, or DeepSpeed's engine
    # before it builds its optimizer), before any offloaded optimizer state exists: a rank holds
    # the larger of the two, not both.
    load_bytes: int = 0
    # How many of the node's ranks hold that copy (load_memory.loading_ranks; None: all of them).
    load_ranks: int | None = None
    sharding: str | None = None  # the engine sharding the parameters ("fsdp2", "zero3")
    offload_optimizer: bool = False  # the engine's optimizer states in host RAM (ZeRO offload)
    offload_params: bool = False  # sharded parameters rest in host RAM between uses

    @property
    def load_or_offloaded_bytes(self) -> int:
        """Per rank that loads, in host RAM: the larger of the load copy and the offloaded
        states."""
        return max(self.load_bytes, self.offloaded_bytes)

    @property
    def host_model_bytes(self) -> int:
        """The node's ranks' load copies or offloaded states: a loading rank holds the larger of
        the two, the others (under FSDP2) the offloaded states only."""
        ranks = self.ranks_per_node
        loading = ranks if self.load_ranks is None else min(self.load_ranks, ranks)
        return loading * self.load_or_offloaded_bytes + (ranks - loading) * self.offloaded_bytes

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    def mapped_dataset_bytes(self, ultra_low_mem: bool) -> int:
        """Dataset bytes held in the page cache: none when read with pread (ultra-low-mem)."""
        return 0 if ultra_low_mem else self.dataset_bytes

    def pool_bytes(self, micro: int, depth: int) -> int:
        """One rank's prefetch pool: (depth + 1) batch buffer sets of micro x seq_len tokens."""
        return (depth + 1) * micro * self.seq_len * BATCH_BYTES_PER_TOKEN

    def lines(self, depth: int, readers: int, ultra_low_mem: bool) -> Lines:
        """The plan's memory lines under this data-path setting."""
        seq, ranks = self.seq_len, self.ranks_per_node
        dataset = self.mapped_dataset_bytes(ultra_low_mem)
        activations_per_seq = self.activation_bytes_per_token * seq
        pool_per_seq = self.pool_bytes(1, depth)
        data_path_per_seq = pool_per_seq + readers * READER_SCRATCH_BYTES_PER_TOKEN * seq
        # One micro-batch's offloaded activations are live at a time (forward to its backward).
        host_activations_per_seq = self.host_activation_bytes_per_token * seq
        process = self.process_bytes + readers * READER_THREAD_BYTES
        if self.on_gpu:
            device_fixed = self.model_device_bytes + self.cuda_reserve_bytes
            host_fixed = ranks * process + self.host_model_bytes + dataset + self.index_bytes
            # The device also holds the prefetcher's copies of the pool's batches.
            return Lines(
                self.budget_bytes or 0,
                device_fixed,
                activations_per_seq + pool_per_seq,
                host_fixed,
                ranks * (data_path_per_seq + host_activations_per_seq),
            )
        # CPU training: model, states and activations live in host RAM beside the data path.
        device_fixed = self.model_device_bytes + process
        per_seq = activations_per_seq + host_activations_per_seq + data_path_per_seq
        shared = dataset + self.index_bytes
        share = (self.host_limit_bytes - shared) // ranks
        budget = share if self.budget_bytes is None else min(share, self.budget_bytes)
        return Lines(budget, device_fixed, per_seq, ranks * device_fixed + shared, ranks * per_seq)
