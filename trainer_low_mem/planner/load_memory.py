"""Host RAM that loading a model costs each process, as the planner counts it.

A process that trains on a GPU builds its model on the host first, then moves it to its device.
Weights the trainer keeps in fp32 (full fine-tuning's master weights, a LoRA base under
--mixed_precision no, the adapters): `from_pretrained` reads the folder's stored weights (bf16
for the users' models) and casts them: the fp32 copy, 4 bytes per parameter, plus the
stored-dtype buffers the allocator still holds at the peak. `bench load` measures the peak
anonymous memory of each process above its reading before the load (Qwen3-style bf16 folders,
1, 2 and 3 processes loading at once, the same in each process whatever their number): 2.96 GiB
at 0.63B parameters (5.01 bytes per parameter), 745 MiB at 0.13B (about 200 MiB of it code and
buffers of the first load, which the planner's process base covers).

A LoRA run's frozen base kept in bf16/fp16 (trainer_low_mem/models: `base_dtype`) and stored so
in the folder is not cast to an fp32 copy: most of its tensors stay views of the memory-mapped
file, whose pages are page cache shared by every process that maps it (and reclaimable), not
private memory. `bench load` ("trainer-lora-bf16": the trainer's own rank-16 LoRA build, every
weight then read once) measures 654 MiB private per process at 0.63B parameters (1.07 bytes per
parameter; 666 MiB each with 2 processes) and 302 MiB at 0.13B: about 0.7 bytes per parameter
plus about 210 MiB of code and buffers (peft's import among them) that the process base covers.
So the planner counts a half-precision parameter at 1 byte and an fp32 one (the adapters) at 5.
A bf16 base read from an fp32 folder would be a private 2-byte copy: the users' folders are bf16,
so that is not what a plan counts.

Under FSDP2 only global rank 0 loads the weights (trainer_low_mem/fsdp.py: the other ranks build
the model on the meta device and receive rank 0's weights into their shards, one tensor at a
time), so rank 0's node holds one load copy and the other ranks none: `loading_ranks`. The
planner sizes rank 0's node, the fullest. ZeRO-3 and whole-model ranks each load it, and so do
FSDP2 ranks with fsdp_offload_params: their shards rest in host RAM, where a CUDA job's NCCL
group cannot broadcast into them.
"""

from __future__ import annotations

# Peak private host bytes per fp32 parameter while a process loads its model (see above).
LOAD_PRIVATE_BYTES_PER_PARAM = 5
# Peak private host bytes per parameter kept in the folder's half-precision dtype (see above).
MAPPED_LOAD_PRIVATE_BYTES_PER_PARAM = 1


def rank0_loads_alone(sharding: str | None, offload_params: bool) -> bool:
    """Whether global rank 0 alone reads the weights (FSDP2 with its shards on the device), the
    trainer's rule and the planner's (see above)."""
    return sharding == "fsdp2" and not offload_params


def loading_ranks(sharding: str | None, ranks_per_node: int, offload_params: bool = False) -> int:
    """How many of the fullest node's ranks hold the load copy."""
    return 1 if rank0_loads_alone(sharding, offload_params) else ranks_per_node


def load_private_bytes(param_count: int, mapped_count: int = 0) -> int:
    """Private host bytes one process peaks at while it loads a model of `param_count`
    parameters to train it on a GPU, `mapped_count` of them kept in the folder's half-precision
    dtype (mostly views of the mapped file)."""
    fp32_count = param_count - mapped_count
    return (
        fp32_count * LOAD_PRIVATE_BYTES_PER_PARAM
        + mapped_count * MAPPED_LOAD_PRIVATE_BYTES_PER_PARAM
    )
