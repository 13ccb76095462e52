"""`bench sft`: both sides train on the same records and label exactly the tokens a reference
tokenisation labels (response + EOS); a disagreement voids the comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench import sft_speed
from bench.config import SftSpeedConfig
from bench.sft_speed import SIDES, SideResult, run_sft_bench, table
from lowmem_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_trains_both_sides_on_the_same_label_tokens(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "sft", "--quick", "--cache-dir", str(tmp_path)]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    ours, hf = report["results"]
    assert (ours["side"], hf["side"]) == SIDES
    assert report["config"]["num_records"] == 200 and report["config"]["steps"] == 5

    from transformers import AutoTokenizer

    inputs = tmp_path / "sft-200r-h64-s0"
    tok = AutoTokenizer.from_pretrained(inputs / "model")
    with (inputs / "train.jsonl").open() as fh:
        responses = [json.loads(line)["response"] for line in fh]
    assert len(responses) == 200
    encoded = tok(responses, add_special_tokens=False)["input_ids"]
    expected = sum(len(ids) + 1 for ids in encoded)  # response tokens + EOS
    assert ours["full_pass_label_tokens"] == hf["full_pass_label_tokens"] == expected

    assert ours["split_samples"] == 0 and hf["split_samples"] is None
    assert ours["positions"] == 5 * 8 * 256  # packed rows of seq_len
    assert 0 < hf["positions"] <= 5 * 8 * 256  # padded to each batch's longest sample
    for r in (ours, hf):
        assert r["steps"] == 5
        assert 0 < r["label_tokens"] < r["positions"] and r["timed_s"] > 0
        assert r["prepare_s"] > 0 and r["peak_pss_bytes"] > 100 * 2**20
    assert set(report["ours_over_hf"]) == {
        "label_tokens_per_s",
        "tokens_per_s",
        "peak_pss_bytes",
        "prepare_s",
    }
    assert "| ours / HF |" in result.stdout
    assert not (tmp_path / "sft-work").exists()


def _fake(side: str, full_pass: int) -> SideResult:
    return SideResult(
        side=side,
        prepare_s=2.0,
        timed_s=4.0,
        steps=5,
        label_tokens=800,
        positions=2000,
        pad_positions=500,
        data_wait_s=0.04,
        full_pass_label_tokens=full_pass,
        split_samples=3,
        process_seconds=10.0,
        cpu_seconds=12.0,
        peak_pss_bytes=400 * 2**20,
        peak_rss_bytes=600 * 2**20,
    )


def test_report_ratios_and_void_comparison(tmp_path, monkeypatch):
    hf = replace(_fake(SIDES[1], 1000), timed_s=8.0, prepare_s=4.0, positions=1000)
    sides = {SIDES[0]: _fake(SIDES[0], 1000), SIDES[1]: hf}
    monkeypatch.setattr(sft_speed, "_inputs", lambda cfg: tmp_path)
    monkeypatch.setattr(sft_speed, "_run_side", lambda side, inputs, cfg, work: sides[side])
    cfg = SftSpeedConfig(quick=True, cache_dir=tmp_path)
    report = run_sft_bench(cfg, progress=lambda line: None)
    assert report["ours_over_hf"] == {
        "label_tokens_per_s": 2.0,
        "tokens_per_s": 4.0,
        "peak_pss_bytes": 1.0,
        "prepare_s": 0.5,
    }
    assert report["results"][0]["padding_frac"] == 0.25
    assert report["results"][0]["data_wait_frac"] == pytest.approx(0.01)
    lines = table(report).splitlines()
    assert len(lines) == 5 and lines[-1].startswith("| ours / HF | 0.50x | 2.00x | 4.00x |")

    sides[SIDES[1]] = _fake(SIDES[1], 990)
    with pytest.raises(ConfigError, match=r"ours labels 1000 tokens and HF 990 .* void"):
        run_sft_bench(cfg, progress=lambda line: None)


def test_config_limits_and_quick_sizes():
    cfg = SftSpeedConfig(quick=True)
    assert (cfg.num_records, cfg.steps, cfg.warmup_steps) == (200, 5, 1)
    assert SftSpeedConfig().seq_len == 256
    with pytest.raises(ConfigError, match="--model-hidden must be a multiple of 8"):
        SftSpeedConfig(model_hidden=60)
    with pytest.raises(ConfigError, match="--workers and --torch-threads must be >= 1"):
        SftSpeedConfig(workers=0)
    with pytest.raises(ConfigError, match="--num-records and --steps must be >= 1"):
        SftSpeedConfig(steps=0)
