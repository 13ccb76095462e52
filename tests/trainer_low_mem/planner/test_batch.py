"""The global batch's split: divisors and the errors that say what would divide."""

from __future__ import annotations

import pytest

from lowmem_core.errors import ConfigError
from trainer_low_mem.planner.batch import check_micro_batch, divisors, per_rank_batch


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
