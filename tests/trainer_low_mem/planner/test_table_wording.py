"""The plan table reads right: each unit printed once, and the estimate the plan uses named."""

from __future__ import annotations

import re

import pytest

from trainer_low_mem.cli import main as trainer_main

GiB = 1 << 30
DOUBLED_UNIT = re.compile(r"\b(B|KiB|MiB|GiB|TiB) (B|KiB|MiB|GiB|TiB)\b")


@pytest.mark.parametrize("device_budget_bytes", [20 * GiB, None], ids=["gpu", "cpu"])
def test_every_reason_prints_its_unit_once(gpu_plan, device_budget_bytes):
    device = "cuda" if device_budget_bytes else "cpu"
    p = gpu_plan(device_budget_bytes=device_budget_bytes, device=device, dataset_bytes=GiB)
    for name, reason in p.reasons.items():
        assert not DOUBLED_UNIT.search(reason.text), (name, reason.text)
    if device == "cuda":
        assert reason_text(p, "pinned_pool_bytes").endswith("x 512 tokens x 24 B")


def reason_text(plan, name: str) -> str:
    return plan.reasons[name].text


def test_the_table_says_the_plan_uses_the_analytic_count_when_nothing_was_traced(gpu_plan):
    table = gpu_plan().table()
    assert "the plan uses the analytic estimate" in table
    assert "cross-check" not in table


def test_the_table_says_the_plan_uses_the_trace_and_what_the_cross_check_compares(capsys):
    argv = ["plan", "--model_preset", "tiny", "--max_seq_len", "128", "--global_batch", "8"]
    assert trainer_main(argv) == 0
    table = capsys.readouterr().out
    assert "analytic cross-check" in table
    assert (
        "the plan uses the trace estimate; the analytic cross-check is the analytic count's "
        "activation bytes per token and their ratio to the trace's, shown for comparison only"
    ) in table
