"""Reasons: every decision explained with its numbers, rendered in one table."""

from __future__ import annotations

from trainer_low_mem.planner import Reason

GiB = 1 << 30
TABLE_FIELDS = (
    "micro_batch_per_rank",
    "grad_accum_steps",
    "num_readers",
    "prefetch_depth",
    "pin_memory",
    "pinned_pool_bytes",
    "ultra_low_mem",
    "device_budget_bytes",
    "device_peak_bytes_planned",
    "host_limit_bytes",
    "host_bytes_planned",
)


def test_every_decision_has_a_reason_with_numbers(gpu_plan):
    p = gpu_plan(dataset_bytes=1 * GiB)
    for name in TABLE_FIELDS:
        assert p.reasons[name].what == name
        assert p.reasons[name].text, name
    peak = p.reasons["device_peak_bytes_planned"]
    assert peak.value == p.device_peak_bytes_planned
    assert peak.numbers["micro"] == p.micro_batch_per_rank == 128
    assert peak.numbers["band"] in ("below", "inside")
    assert "GiB" in peak.text
    assert p.reasons["ultra_low_mem"].numbers["dataset_bytes"] == 1 * GiB
    assert "1.00 GiB" in p.reasons["ultra_low_mem"].text


def test_the_peak_reason_says_what_the_next_micro_batch_would_need(gpu_plan):
    p = gpu_plan(device_budget_bytes=4 * GiB)
    numbers = p.reasons["device_peak_bytes_planned"].numbers
    assert p.micro_batch_per_rank == 32 and numbers["next"] == 64
    assert numbers["next_frac"] > 0.92 >= numbers["peak_frac"]
    assert f"micro-batch 64 would need {numbers['next_frac']:.1%}" in (
        p.reasons["device_peak_bytes_planned"].text
    )


def test_the_table_shows_every_setting_its_value_and_reason(gpu_plan):
    p = gpu_plan(dataset_bytes=1 * GiB)
    table = p.table()
    header = table.splitlines()[0]
    assert header.startswith("plan: global batch 384 = micro 128 x accumulation 1 x world 3")
    for name, reason in p.reasons.items():
        assert name in table and reason.text in table
    row = next(line for line in table.splitlines() if line.startswith("grad_accum_steps"))
    assert row.split()[1] == "1"
    assert "notes:" in table and "model_memory: analytic estimate" in table


def test_a_reason_renders_bytes_and_fractions_and_keeps_plain_text_as_written():
    r = Reason(
        "x",
        1,
        "{size_bytes} is {share_frac} of {name}",
        {"size_bytes": 3 * GiB, "share_frac": 0.25, "name": "the budget"},
    )
    assert r.text == str(r) == "3.00 GiB is 25.0% of the budget"
    assert Reason.from_text("x", 1, "a {literal} brace").text == "a {literal} brace"
