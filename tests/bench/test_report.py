"""`bench throughput`'s console report: measured figures only; targets and verdicts stay in the
JSON document our benchmarking docs read."""

from __future__ import annotations

import json

import pytest

from bench import report, throughput
from bench.config import ThroughputConfig
from bench.measure import CaseResult, Check
from bench.throughput import RunOutcome


def _outcome(dataset, checks: list[Check]) -> RunOutcome:
    result = CaseResult(
        name="ours packing mmap r=1",
        stage="loader",
        tokens_per_s=1e6,
        batches_per_s=10.0,
        peak_uss_bytes=1 << 20,
    )
    return RunOutcome(dataset, [result], checks, [], 1.0)


@pytest.mark.parametrize(
    "check, figure",
    [
        # A busy machine: the ratio falls under its target.
        (Check("packing mmap vs HF", 10.78, 20.0, True, "x"), "packing mmap vs HF: 10.78x"),
        (Check("USS growth", 40.0, 32.0, False, "MB"), "USS growth: 40.0 MB"),
        (Check("data wait", 0.25, 1.0, False, "%"), "data wait: 0.25%"),
    ],
)
def test_the_report_prints_figures_not_targets_and_keeps_them_in_the_json(
    check, figure, make_dataset, tmp_path, monkeypatch, capsys
):
    data = make_dataset(num_docs=50)
    monkeypatch.setattr(throughput, "run", lambda cfg: _outcome(data, [check]))
    json_path = tmp_path / "bench.json"
    cfg = ThroughputConfig(data=data, stage="loader", progress=False, json_path=json_path)
    assert report.run_and_report(cfg) == 0
    out = capsys.readouterr().out
    assert figure in out.splitlines()
    for word in ("target", "PASS", "FAIL"):
        assert word not in out
    (saved,) = json.loads(json_path.read_text())["checks"]
    assert (saved["target"], saved["passed"]) == (check.target, check.passed)
    assert saved["line"] == check.line()
