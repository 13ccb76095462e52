"""`bench plan`'s sharded cases: the planner's FSDP2 rank against two real gloo ranks."""

from __future__ import annotations

import pytest

from bench.plan_check import PEAK_TOLERANCE, SLOPE_TOLERANCE
from bench.sharded_check import WORLD_SIZE, sharded_cases


def test_the_quick_run_keeps_one_sharded_case_named_for_its_engine_and_ranks():
    quick = sharded_cases(quick=True)
    assert [c.name for c in quick] == [f"hf-llama L=256 fsdp2 x{WORLD_SIZE}"]
    names = [c.name for c in sharded_cases(quick=False)]
    assert len(names) == len(set(names))  # ranks find their case again by name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_tiny_preset_sharded_over_two_ranks_is_planned_within_the_targets():
    from bench.sharded_check import check_sharded_case

    case = next(c for c in sharded_cases(quick=False) if c.name.startswith("tiny L=256"))
    rows, slope = check_sharded_case(case)
    assert [r.micro_batch for r in rows] == list(case.case.real_micro_batches)
    for row in rows:
        assert abs(row.ratio - 1.0) <= PEAK_TOLERANCE, row
    assert abs(slope.ratio - 1.0) <= SLOPE_TOLERANCE, slope
