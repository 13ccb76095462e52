"""The global batch's split: micro-batch x accumulation x world size, always exactly."""

from __future__ import annotations

from lowmem_core.errors import ConfigError


def divisors(n: int) -> list[int]:
    """The micro-batches that split a per-rank batch of n evenly, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """global_batch / world_size, or a ConfigError naming batches and world sizes that divide."""
    for name, value in (("global_batch", global_batch), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if global_batch % world_size:
        below = global_batch - global_batch % world_size
        options = [x for x in (below, below + world_size) if x > 0]
        worlds = [d for d in divisors(global_batch) if d > 1][:6]
        raise ConfigError(
            f"global batch {global_batch} is not divisible by world size {world_size}: each rank "
            f"must take the same number of sequences; use a global batch of "
            f"{' or '.join(map(str, options))}, or a world size dividing {global_batch} "
            f"({', '.join(map(str, worlds)) or 'only 1'})"
        )
    return global_batch // world_size


def check_micro_batch(micro: int, global_batch: int, world_size: int) -> int:
    """micro itself when it divides the per-rank batch, else a ConfigError listing the divisors."""
    per_rank = per_rank_batch(global_batch, world_size)
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1 or per_rank % micro:
        raise ConfigError(
            f"micro-batch {micro} does not divide the per-rank batch {per_rank} (= global "
            f"{global_batch} / world {world_size}); choose one of {divisors(per_rank)}"
        )
    return micro


def check_split(
    global_batch: int, world_size: int, micro: int | None = None, accum: int | None = None
) -> None:
    """The batch-split rule, checked here and nowhere else: global batch = micro-batch x
    accumulation x world size, with each of them a positive integer. `micro` and `accum` are
    checked when given (by the user, or by a plan)."""
    per_rank = per_rank_batch(global_batch, world_size)
    if micro is not None:
        check_micro_batch(micro, global_batch, world_size)
    if accum is None:
        return
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise ConfigError(f"gradient accumulation must be a positive integer, got {accum!r}")
    if micro is not None and micro * accum != per_rank:
        raise ConfigError(
            f"micro-batch {micro} x accumulation {accum} x {world_size} processes = "
            f"{micro * accum * world_size} rows, not the global batch {global_batch}; give two "
            "of --batch_size_per_gpu, --gradient_accumulation_steps and --global_batch, or make "
            "the three agree"
        )
    if per_rank % accum:
        raise ConfigError(
            f"accumulation {accum} does not divide the per-rank batch {per_rank} (= global "
            f"{global_batch} / world {world_size}); choose one of {divisors(per_rank)}"
        )
