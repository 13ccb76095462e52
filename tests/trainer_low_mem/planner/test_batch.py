"""The global batch's split: micro-batch x accumulation x world size, exactly; divisors and the
errors that say what would divide."""

from __future__ import annotations

import pytest

from lowmem_core.errors import ConfigError
from trainer_low_mem.planner.batch import (
    check_micro_batch,
    check_split,
    divisors,
    per_rank_batch,
)


def test_divisors_are_every_even_split_ascending():
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(1) == [1]


def test_per_rank_batch_names_batches_and_world_sizes_that_divide():
    assert per_rank_batch(384, 3) == 128
    with pytest.raises(ConfigError, match=r"global batch 32 .* world size 3.*30 or 33.*2, 4, 8"):
        per_rank_batch(32, 3)
    with pytest.raises(ConfigError, match="world_size must be a positive integer"):
        per_rank_batch(32, 0)


def test_a_micro_batch_must_divide_the_per_rank_batch():
    assert check_micro_batch(4, 24, 3) == 4
    with pytest.raises(ConfigError, match=r"micro-batch 3 does not divide .* 8 .*\[1, 2, 4, 8\]"):
        check_micro_batch(3, 24, 3)


def test_a_split_given_in_full_or_in_part_passes_when_it_is_exact():
    assert check_split(384, 3) is None
    assert check_split(384, 3, micro=16) is None  # accumulation derived: 8
    assert check_split(384, 3, micro=16, accum=8) is None
    assert check_split(384, 3, accum=8) is None  # micro-batch derived: 16


def test_a_global_batch_the_world_size_does_not_divide_is_refused():
    with pytest.raises(ConfigError, match=r"^global batch 100 is not divisible by world size 3"):
        check_split(100, 3, micro=16)


def test_a_micro_batch_that_does_not_divide_the_per_rank_batch_is_refused():
    # 99 rows over 3 ranks: 33 each, which 16 does not divide.
    with pytest.raises(
        ConfigError, match=r"micro-batch 16 .* per-rank batch 33 .*\[1, 3, 11, 33\]"
    ):
        check_split(99, 3, micro=16)
    # A global batch smaller than one micro-step: the divisors of the 2 rows per rank.
    with pytest.raises(ConfigError, match=r"micro-batch 16 .* per-rank batch 2 .*\[1, 2\]$"):
        check_split(6, 3, micro=16)


def test_micro_batch_accumulation_and_world_size_must_multiply_to_the_global_batch():
    with pytest.raises(ConfigError) as info:
        check_split(384, 3, micro=16, accum=2)
    assert str(info.value) == (
        "micro-batch 16 x accumulation 2 x 3 processes = 96 rows, not the global batch 384; "
        "give two of --batch_size_per_gpu, --gradient_accumulation_steps and --global_batch, or "
        "make the three agree"
    )
    with pytest.raises(ConfigError, match=r"accumulation 5 does not divide .* 128 .*\[1, 2, 4"):
        check_split(384, 3, accum=5)


@pytest.mark.parametrize(
    "micro, accum, named",
    [
        (0, None, "micro-batch 0 does not divide"),
        (16, 0, "gradient accumulation must be a positive integer, got 0"),
        (None, -2, "gradient accumulation must be a positive integer, got -2"),
    ],
)
def test_non_positive_micro_batch_or_accumulation_is_refused(micro, accum, named):
    with pytest.raises(ConfigError, match=named):
        check_split(384, 3, micro=micro, accum=accum)
