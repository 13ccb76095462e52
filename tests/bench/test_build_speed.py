"""`bench build`: both builds run on the same corpus and tokenizer, agree on every token count,
and the report carries time, rate, CPU and peak tree memory for each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.build_speed import SIDES, run_build_bench, table
from bench.config import BuildSpeedConfig
from lowmem_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_compares_both_builds_on_two_sizes(tmp_path):
    cfg = BuildSpeedConfig(quick=True, num_proc=1, cache_dir=tmp_path)
    report = run_build_bench(cfg, progress=lambda line: None)
    results = report["results"]
    assert [(r["side"], round(r["corpus_mb"])) for r in results] == [
        (SIDES[0], 1),
        (SIDES[1], 1),
        (SIDES[0], 3),
        (SIDES[1], 3),
    ]
    for ours, hf in zip(results[::2], results[1::2], strict=True):
        assert ours["tokens"] == hf["tokens"] > 0 and ours["documents"] == hf["documents"]
    for r in results:
        assert r["seconds"] > 0 and r["cpu_seconds"] > 0 and r["peak_pss_bytes"] > 10 * 2**20
        assert 0 < r["peak_uss_bytes"] <= r["peak_rss_bytes"]
    assert set(report["speedup"]) == {"1", "3"}
    assert table(report).count("\n") == 5
    assert not (tmp_path / "work").exists()


def test_cli_flags_and_their_limits(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "bench", "build", "--sizes-mb", "0,3"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --sizes-mb needs sizes > 0, e.g. 30,300; got (0.0, 3.0)"
    )
    assert BuildSpeedConfig(sizes_mb=(30.0, 300.0), quick=True).sizes_mb == (1.0, 3.0)
    with pytest.raises(ConfigError, match="--num-proc must be >= 1"):
        BuildSpeedConfig(num_proc=0)
    assert json.dumps(BuildSpeedConfig().sizes_mb) == "[30.0, 300.0]"
