"""`bench sft`: our trainer and TRL's SFTTrainer train one pass over the same records and label
exactly the tokens a reference tokenisation labels (response + EOS); the ratios, medians and
target verdicts follow from the figures; without TRL the TRL side is skipped with one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import sft_speed, trl_side
from bench.config import SftSpeedConfig
from bench.sft_speed import StepClock, compare, encode_record, run_sft_bench, table
from lowmem_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
QWEN3 = REPO.parent / "shared" / "tokenizers" / "qwen3"


@pytest.mark.slow
def test_quick_run_trains_both_sides_on_the_same_label_tokens(tmp_path):
    pytest.importorskip("trl")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "sft", "--quick", "--cache-dir", str(tmp_path)]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["trl_skipped"] is None
    ours, trl = report["runs"]
    assert (ours["side"], trl["side"]) == ("ours", "trl")
    assert (ours["tuning"], ours["seq_len"]) == ("lora", 256)

    from transformers import AutoTokenizer

    (inputs,) = tmp_path.glob("sft-trl-*")
    (records,) = inputs.glob("train-L256-*.jsonl")
    tok = AutoTokenizer.from_pretrained(inputs / "model")
    with records.open() as fh:
        responses = [json.loads(line)["response"] for line in fh]
    encoded = tok(responses, add_special_tokens=False)["input_ids"]
    expected = sum(len(ids) + 1 for ids in encoded)  # response tokens + EOS
    assert ours["pass_label_tokens"] == trl["pass_label_tokens"] == expected

    for r in (ours, trl):
        assert r["steps"] >= 2 and r["timed_steps"] == r["steps"] - 1
        assert 0 < r["timed_label_tokens"] < r["pass_label_tokens"]
        assert r["timed_s"] > 0 and r["timed_cpu_s"] > 0 and r["label_tokens_per_s"] > 0
        assert r["torch_peak_bytes"] > 0 and r["peak_rss_self_bytes"] > 100 * 2**20
    (row,) = report["comparisons"]
    assert set(row["ours_over_trl"]) == {
        "label_tokens_per_s",
        "cpu_s_per_label_token",
        "peak_rss_self_bytes",
        "peak_pss_tree_bytes",
        "torch_peak_bytes",
    }
    assert math.isfinite(row["ours"]["eval_loss"]) and math.isfinite(row["trl"]["eval_loss"])
    assert row["targets"]["rss"] is None  # rows of 256: the RSS target is for 2048
    assert "| lora | 256 |" in result.stdout
    assert not (tmp_path / "sft-work").exists() and not (tmp_path / "sft-saved").exists()


@pytest.mark.slow  # importing transformers alone takes 10-35 s on a loaded 2-core machine
def test_encode_record_labels_the_response_and_eos():
    if not (QWEN3 / "tokenizer.json").is_file():
        pytest.skip("../shared/tokenizers/qwen3 is absent (a fresh clone)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(QWEN3)
    record = {"prompt": "Tell me about Kalo.\n", "response": "Kalo is a quiet town."}
    ids, labels = encode_record(tok, record)
    prompt = tok(record["prompt"])["input_ids"]
    response = tok(record["response"], add_special_tokens=False)["input_ids"]
    assert ids == prompt + response + [tok.eos_token_id]
    assert labels == [-100] * len(prompt) + response + [tok.eos_token_id]


def test_step_clock_times_the_steps_after_the_warmup():
    clock = StepClock()
    for tokens in (100, 80, 60):
        clock.end_step(tokens)
    clock.add_label_tokens(30)
    clock.add_label_tokens(10)
    clock.end_step()  # counted by add_label_tokens, as the TRL side does
    s = clock.summary(warmup_steps=1)
    assert (s["steps"], s["timed_steps"]) == (4, 3)
    assert (s["timed_label_tokens"], s["pass_label_tokens"]) == (180, 280)
    assert s["timed_s"] == pytest.approx(clock.ends_s[-1] - clock.ends_s[0])
    assert s["torch_peak_bytes"] is None  # begin_step(1, ...) never ran
    with pytest.raises(ConfigError, match=r"took 4 optimizer step\(s\), not more than"):
        clock.summary(warmup_steps=4)


def _run(side: str, seq_len: int, repeat: int, **figures) -> dict:
    run = {
        "side": side,
        "tuning": "lora",
        "seq_len": seq_len,
        "repeat": repeat,
        "label_tokens_per_s": 100.0,
        "cpu_s_per_label_token": 0.02,
        "peak_rss_self_bytes": 1000 * 2**20,
        "peak_pss_tree_bytes": 900 * 2**20,
        "torch_peak_bytes": 400 * 2**20,
        "steps": 3,
        "pass_label_tokens": 5000,
    }
    return {**run, **figures}


def test_ratios_are_medians_of_the_repeats_and_targets_follow_them():
    runs = [
        _run("ours", 512, 0, label_tokens_per_s=300.0, peak_rss_self_bytes=500 * 2**20),
        _run("trl", 512, 0),
        _run("ours", 512, 1, label_tokens_per_s=150.0, peak_rss_self_bytes=500 * 2**20),
        _run("trl", 512, 1, label_tokens_per_s=50.0),
        _run("ours", 512, 2, label_tokens_per_s=100.0, peak_rss_self_bytes=500 * 2**20),
        _run("trl", 512, 2, label_tokens_per_s=80.0),
        _run("ours", 2048, 0, label_tokens_per_s=150.0, peak_rss_self_bytes=700 * 2**20),
        _run("trl", 2048, 0),
    ]
    losses = {"lora/512": {"ours": 9.30, "trl": 9.25}, "lora/2048": {"ours": 9.5, "trl": 9.0}}
    short, long = compare(runs, losses)
    # Pairs (ours / TRL): 3.0, 3.0, 1.25 -> median 3.0; the sides' own medians: 150 and 80.
    assert short["ours_over_trl"]["label_tokens_per_s"] == 3.0
    assert (short["ours"]["label_tokens_per_s"], short["trl"]["label_tokens_per_s"]) == (150, 80)
    assert short["ours_over_trl"]["peak_rss_self_bytes"] == 0.5
    assert short["repeats"] == 3 and short["ours"]["eval_loss"] == 9.30
    assert short["targets"] == {"speed": True, "rss": None, "eval_loss": True}
    assert long["ours_over_trl"]["label_tokens_per_s"] == 1.5
    assert long["ours_over_trl"]["peak_rss_self_bytes"] == 0.7
    assert long["targets"] == {"speed": False, "rss": False, "eval_loss": False}

    lines = table({"comparisons": [short, long]}).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith(
        "| lora | 512 | 150 \\| 80 | 3.00x | 20.00 \\| 20.00 | 500 \\| 1,000 |"
    )
    assert lines[2].endswith("| 9.300 \\| 9.250 | 5,000 | 3 \\| 3 | met, n/a, met |")
    assert lines[3].endswith("| NOT met, NOT met, NOT met |")


def test_unequal_label_tokens_void_the_comparison():
    runs = [_run("ours", 512, 0), _run("trl", 512, 0, pass_label_tokens=4990)]
    with pytest.raises(ConfigError, match=r"\[4990, 5000\] label tokens .* void"):
        compare(runs, {})


def test_trl_side_is_skipped_with_one_line_when_trl_is_not_importable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    assert "trl is not importable" in trl_side.trl_missing()
    sides = []
    monkeypatch.setattr(sft_speed, "_inputs", lambda cfg: tmp_path)
    monkeypatch.setattr(sft_speed, "_records", lambda inputs, cfg, seq_len: tmp_path / "r.jsonl")

    def run_side(side, case, cfg, work, save):
        sides.append(side)
        return _run(side, case["seq_len"], 0, tuning=case["tuning"])

    monkeypatch.setattr(sft_speed, "_run_side", run_side)
    monkeypatch.setattr(
        sft_speed, "_evaluate", lambda inputs, models, cfg: {"eval_loss": {"ours": 9.0}}
    )
    lines, partial = [], []
    cfg = SftSpeedConfig(tuning=("full",), seq_lens=(512, 1024), repeats=2, cache_dir=tmp_path)
    report = run_sft_bench(cfg, lines.append, partial.append)
    assert sides == ["ours"] * 4
    skipped = [line for line in lines if "TRL side skipped" in line]
    assert len(skipped) == 1 and "pip install 'lowmem-pipeline[trl]'" in skipped[0]
    assert report["trl_skipped"] is not None
    # The report so far after each configuration: a long run cut short keeps what it finished.
    assert [(len(r["comparisons"]), r["complete"]) for r in partial] == [(1, False), (2, True)]
    row = report["comparisons"][0]
    assert "trl" not in row and "ours_over_trl" not in row and row["ours"]["eval_loss"] == 9.0
    assert (
        table(report)
        .splitlines()[2]
        .startswith("| full | 512 | 100 |  | 20.00 | 1,000 |  | 900 | 400 | 9.000 |")
    )


def test_config_limits_and_quick_sizes():
    cfg = SftSpeedConfig(quick=True)
    assert (cfg.tuning, cfg.seq_lens, cfg.steps, cfg.repeats) == (("lora",), (256,), 2, 1)
    default = SftSpeedConfig()
    assert (default.tuning, default.seq_lens) == (("lora", "full"), (512, 2048))
    assert sft_speed.micro_batch_rows(default, 512) == 2
    assert sft_speed.micro_batch_rows(default, 2048) == 1
    with pytest.raises(ConfigError, match="--steps must exceed --warmup-steps"):
        SftSpeedConfig(steps=1, warmup_steps=1)
    with pytest.raises(ConfigError, match="--model-hidden must be a multiple of 8"):
        SftSpeedConfig(model_hidden=60)
    with pytest.raises(ConfigError, match="--micro-batch-tokens, --grad-accum, --repeats"):
        SftSpeedConfig(repeats=0)
