"""Host RAM that loading a model costs each process, as the planner counts it.

A process that trains on a GPU builds its model on the host first, in fp32 (the trainer's master
weights), then moves it to its device. `from_pretrained` reads the folder's stored weights (bf16
for the users' models) and casts them: the fp32 copy, 4 bytes per parameter, plus the stored-dtype
buffers the allocator still holds at the peak. `bench load` measures the peak anonymous memory of
each process above its reading before the load (Qwen3-style bf16 folders, 1, 2 and 3 processes
loading at once, the same in each process whatever their number): 2.96 GiB at 0.63B parameters
(5.01 bytes per parameter), 745 MiB at 0.13B (about 200 MiB of it code and buffers of the first
load, which the planner's process base covers). The file's own pages are page cache, shared by
the processes that map it and reclaimable, and are not counted here. A frozen base kept in its
stored dtype would cost about 90 MiB per process whatever its size (its tensors stay views of the
mapped file), but the trainer keeps every weight in fp32, so that is not what a plan counts.
"""

from __future__ import annotations

# Peak private host bytes per parameter while a process loads its model (see above).
LOAD_PRIVATE_BYTES_PER_PARAM = 5


def load_private_bytes(param_count: int) -> int:
    """Private host bytes one process peaks at while it loads a model of `param_count`
    parameters to train it on a GPU."""
    return param_count * LOAD_PRIVATE_BYTES_PER_PARAM
