"""`bench gpu`: the verdicts on given figures, the CPU run's rows and JSON, the skip line."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from bench import gpu_check
from bench.__main__ import main, parse_args
from bench.config import GpuCheckConfig
from bench.gpu_check import CHECKS, Check, Context, Row
from lowmem_core.errors import ConfigError

CUDA_CHECKS = [c.name for c in CHECKS if c.needs_cuda]


@pytest.fixture
def cpu_context(tmp_path, sample_dataset_dir) -> Context:
    return Context(torch.device("cpu"), sample_dataset_dir, tmp_path)


def test_pinned_slower_than_pageable_fails():
    assert gpu_check.h2d_verdict(pageable_bytes_per_s=12e9, pinned_bytes_per_s=6e9) == "fail"
    assert gpu_check.h2d_verdict(pageable_bytes_per_s=6e9, pinned_bytes_per_s=24e9) == "pass"
    assert gpu_check.h2d_verdict(pageable_bytes_per_s=6e9, pinned_bytes_per_s=6e9) == "pass"


def test_plan_verdict_holds_the_peak_to_ten_percent_and_reserved_to_the_plan():
    assert gpu_check.PEAK_TOLERANCE == 0.10
    assert gpu_check.plan_verdict(planned_bytes=1090, real_bytes=1000) == "pass"
    assert gpu_check.plan_verdict(planned_bytes=1110, real_bytes=1000) == "fail"
    assert gpu_check.plan_verdict(planned_bytes=890, real_bytes=1000) == "fail"
    assert gpu_check.plan_verdict(1000, 1000, planned_device_bytes=1500, reserved_bytes=1400) == (
        "pass"
    )
    assert gpu_check.plan_verdict(1000, 1000, planned_device_bytes=1500, reserved_bytes=1600) == (
        "fail"
    )


def test_relative_miss_of_a_zero_or_nan_reference_is_infinite():
    assert gpu_check.relative_miss(110.0, 100.0) == pytest.approx(0.10)
    assert gpu_check.relative_miss(1.0, 0.0) == math.inf
    assert gpu_check.relative_miss(math.nan, 1.0) == math.inf
    assert gpu_check.relative_miss(1.0, math.inf) == math.inf


def test_backoff_verdict_wants_half_the_micro_batch_twice_the_accumulation():
    assert gpu_check.backoff_verdict((4, 1), (2, 2), global_batch_kept=True) == "pass"
    assert gpu_check.backoff_verdict((4, 1), (4, 1), global_batch_kept=True) == "fail"
    assert gpu_check.backoff_verdict((4, 1), (2, 1), global_batch_kept=True) == "fail"
    assert gpu_check.backoff_verdict((4, 1), (2, 2), global_batch_kept=False) == "fail"


def test_data_wait_and_rate_verdicts():
    assert gpu_check.at_most_verdict(0.049, gpu_check.DATA_WAIT_TARGET_FRAC) == "pass"
    assert gpu_check.at_most_verdict(0.051, gpu_check.DATA_WAIT_TARGET_FRAC) == "fail"
    assert gpu_check.at_least_verdict(0.79, gpu_check.PREFETCH_VS_HOST_TARGET) == "fail"


def test_without_cuda_each_cuda_check_is_skipped_and_named_in_one_line(cpu_context):
    rows = [gpu_check.run_check(c, cpu_context) for c in CHECKS if c.needs_cuda]
    assert [r.verdict for r in rows] == ["skipped: needs CUDA"] * len(CUDA_CHECKS)
    line = gpu_check.skip_line(rows)
    assert "\n" not in line
    assert line == (
        f"no CUDA device: skipped {len(CUDA_CHECKS)} checks that need one: "
        + ", ".join(CUDA_CHECKS)
    )
    assert set(CUDA_CHECKS) == {
        "H2D pinned vs pageable",
        "plan vs real: ~0.5B Llama",
        "forced CUDA OOM",
        "packed == unpacked: HF Llama, flash-attention",
    }
    assert gpu_check.skip_line([Row("x", {"a": 1}, "", "pass")]) is None


def test_a_check_that_raises_is_a_failed_row_named_after_the_check(cpu_context):
    def broken(ctx: Context) -> Row:
        raise RuntimeError("kernel exploded\nsecond line")

    row = gpu_check.run_check(Check("broken", broken), cpu_context)
    assert (row.name, row.verdict) == ("broken", "fail")
    assert row.figures == {"error": "RuntimeError: kernel exploded"}


def test_packing_check_fails_when_packed_documents_see_each_other():
    from trainer_low_mem.model import build_model

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    masked = build_model("tiny", document_masking=True).eval()
    packed, alone = gpu_check.packed_and_unpacked_loss(masked, 259, cpu)
    assert gpu_check.relative_miss(packed, alone) <= gpu_check.PACKED_TOLERANCE_FP32
    unmasked = build_model("tiny", document_masking=False).eval()
    unmasked.load_state_dict(masked.state_dict())
    packed, alone = gpu_check.packed_and_unpacked_loss(unmasked, 259, cpu)
    assert gpu_check.relative_miss(packed, alone) > gpu_check.PACKED_TOLERANCE_FP32


def test_plan_vs_real_on_cpu_agrees_for_the_tiny_preset(cpu_context):
    row = gpu_check.check_plan_preset(cpu_context)
    assert row.verdict == "pass", row
    assert row.figures["model"] == "preset tiny"
    assert row.figures["ratio"] == pytest.approx(1.0, abs=gpu_check.PEAK_TOLERANCE)


def test_hf_llama_packing_check_passes_on_cpu(cpu_context):
    row = gpu_check.check_packed_hf_sdpa(cpu_context)
    assert row.verdict == "pass", row
    assert row.figures["relative_diff"] <= gpu_check.PACKED_TOLERANCE_FP32


def test_oom_backoff_through_the_trainer(cpu_context, monkeypatch):
    from trainer_low_mem import oom

    monkeypatch.delenv(oom.INJECT_OOM_ENV, raising=False)
    row = gpu_check.check_oom_backoff(cpu_context)
    assert row.verdict == "pass", row
    assert (row.figures["micro_batch"], row.figures["accumulation"]) == ("4 -> 2", "1 -> 2")
    assert len(row.figures["backoffs"]) == 1
    assert oom.INJECT_OOM_ENV not in os.environ  # restored


def test_device_budget_flag_parses_and_a_bad_one_is_one_line():
    cfg = parse_args(["gpu", "--device_budget", "20GiB", "--json", "out.json"])
    assert isinstance(cfg, GpuCheckConfig)
    assert cfg.device_budget_bytes == 20 * 2**30
    assert str(cfg.json_path) == "out.json"
    with pytest.raises(ConfigError, match="--device_budget"):
        GpuCheckConfig(device_budget="20 gigs")


def test_run_writes_every_row_and_the_skip_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    chosen = tuple(c for c in CHECKS if c.needs_cuda or c.run is gpu_check.check_packed_builtin)
    out = tmp_path / "gpu.json"
    cfg = GpuCheckConfig(cache_dir=tmp_path / "cache", json_path=out)
    assert gpu_check.run_gpu_check(cfg, chosen) == 0
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["rows"]] == [c.name for c in chosen]
    assert doc["skipped"] == gpu_check.skip_line(
        [Row(n, {}, "", "skipped: needs CUDA") for n in CUDA_CHECKS]
    )
    assert doc["failed"] == []
    printed = capsys.readouterr().out
    assert doc["skipped"] in printed
    assert "| packed == unpacked: built-in, SDPA | packed_loss_sum" in printed


@pytest.mark.slow
def test_bench_gpu_json_on_cpu_has_every_check_with_a_figure_or_a_skip_reason(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the sample dataset is cached under ./.bench
    out = tmp_path / "gpu.json"
    code = main(["gpu", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["rows"]] == [c.name for c in CHECKS]
    for row in doc["rows"]:
        assert row["figures"] or row["verdict"].startswith("skipped: "), row
        assert row["verdict"] in ("pass", "fail", "info") or row["verdict"].startswith("skipped: ")
    for name in CUDA_CHECKS:
        assert name in doc["skipped"]
    assert code == (1 if doc["failed"] else 0)
    assert doc["device"] == "cpu"
    assert doc["skipped"] in capsys.readouterr().out


def test_plan_vs_real_without_memtracker_runs_the_steps_and_says_info(cpu_context):
    flags = ["--model_preset", "tiny", "--mixed_precision", "bf16"]
    row = gpu_check.plan_vs_real(cpu_context, "preset tiny", flags, 2, 64, memtracker=False)
    assert row.verdict == "info"
    assert len(row.figures["step_losses"]) == 4  # 2 warm-up + 2 timed steps
    assert all(math.isfinite(x) for x in row.figures["step_losses"])
    assert row.figures["planned_peak_mib"] > 0
