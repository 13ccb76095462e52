"""`bench throughput`: flags, errors, the JSON document, the table, the checks and the plot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.__main__ import main, parse_args
from bench.config import ThroughputConfig
from bench.measure import Check
from bench.report import RESULT_KEYS

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parse(*args: str) -> ThroughputConfig:
    return parse_args(["throughput", *args])


def test_flags_are_generated_from_the_config():
    cfg = parse(
        "--readers",
        "1,3",
        "--seq-len",
        "64",
        "--batch-size",
        "8",
        "--stage",
        "memory",
        "--json",
        "out.json",
    )
    assert cfg.readers == (1, 3)
    assert (cfg.seq_len, cfg.batch_size, cfg.stage) == (64, 8, "memory")
    assert cfg.json_path == Path("out.json") and cfg.plot_path is None
    assert cfg.stages == ("memory",)
    assert parse().stages == ("loader", "memory", "h2d", "step")


@pytest.mark.parametrize("quick", [["--quick"], ["--quick=True"], ["--quick", "true"]])
def test_quick_shortens_every_stage(quick):
    cfg = parse(*quick, "--synthetic", "100000")
    assert (cfg.seconds, cfg.repeats, cfg.synthetic, cfg.readers) == (0.2, 3, 5000, (1, 4))
    assert cfg.memory_corpus_gb == 0.05 and cfg.step_count == 2 and cfg.step_batch_size == 2


@pytest.mark.parametrize(
    ("args", "key_facts"),
    [
        (["--data", "x", "--synthetic", "5"], ["--data", "--synthetic", "not both"]),
        (["--readers", "0,2"], ["--readers", ">= 1", "(0, 2)"]),
        (["--readers", "one"], ["--readers", "integers", "'one'"]),
        (["--seq-len", "1"], ["--seq-len", ">= 2", "got 1"]),
        (
            ["--data", "/nonexistent/ds", "--stage", "loader"],
            ["/nonexistent/ds does not exist", "python -m pipeline build"],
        ),
    ],
)
def test_bad_flags_give_one_line(args, key_facts, capsys):
    assert main(["throughput", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert all(fact in err[0] for fact in key_facts)


@pytest.mark.parametrize(
    "check, facts",
    [
        (Check("packing mmap vs HF", 34.1, 20.0, True, "x"), ["34.10x", ">= 20x", "PASS"]),
        (Check("USS growth", 40.0, 32.0, False, "MB"), ["40.0 MB", "<= 32 MB", "FAIL"]),
        (Check("data wait", 0.25, 1.0, False, "%"), ["0.25%", "<= 1%", "PASS"]),
    ],
)
def test_check_lines_state_name_value_target_and_verdict(check, facts):
    line = check.line()
    assert line.startswith(check.name) and all(fact in line for fact in facts)
    assert check.passed is line.endswith("PASS")


def test_loader_stage_writes_json_table_checks_and_plot(make_dataset, tmp_path, capsys):
    data = make_dataset(num_docs=400, seed=1, median_len=80)
    json_path, plot_path = tmp_path / "out" / "bench.json", tmp_path / "out" / "bench.png"
    rc = main(
        [
            "throughput",
            "--data",
            str(data),
            "--stage",
            "loader",
            "--seq-len",
            "128",
            "--batch-size",
            "4",
            "--seconds",
            "0.05",
            "--repeats",
            "2",
            "--warmup-seconds",
            "0",
            "--readers",
            "1,2",
            "--ultra-reference-seconds",
            "0.05",
            "--workers",
            "1",
            "--no-progress",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json",
            str(json_path),
            "--plot",
            str(plot_path),
        ]
    )
    assert rc == 0
    doc = json.loads(json_path.read_text())
    assert set(doc) == {
        "schema_version",
        "machine",
        "config",
        "dataset",
        "seconds",
        "results",
        "checks",
        "notes",
    }
    assert {"logical_cores", "usable_cores", "ram_total_bytes", "gpus", "versions"} <= set(
        doc["machine"]
    )
    assert doc["config"]["seq_len"] == 128 and doc["config"]["readers"] == [1, 2]
    assert doc["dataset"]["num_documents"] == 400
    names = [r["name"] for r in doc["results"]]
    expected_ours = [
        f"ours {layout} {mode} r={r}"
        for layout in ("packing", "padding")
        for mode in ("mmap", "ultra_low_mem")
        for r in (1, 2)
    ]
    assert set(expected_ours) <= set(names)
    assert {
        "hf datasets workers=0",
        "hf datasets workers=1",
        "nanoGPT memmap",
        "reference read_table+slice",
        "reference ultra (re-read file per item)",
        "memcpy bound",
    } <= set(names)
    for result in doc["results"]:
        assert set(RESULT_KEYS) <= set(result)
        assert result["stage"] == "loader"
        assert (
            result["tokens_per_s"] > 0
            and result["batches_per_s"] > 0
            and result["peak_uss_bytes"] > 0
        )
        assert len(result["repeat_tokens_per_s"]) == 2
    assert {c["name"] for c in doc["checks"]} == {
        "packing mmap vs HF",
        "packing mmap vs nanoGPT memmap",
        "ultra_low_mem vs mmap (packing)",
    }
    assert plot_path.read_bytes()[:8] == PNG_MAGIC

    out = capsys.readouterr().out
    assert re.search(
        r"^\| case +\| stage +\| tokens/s +\| batches/s +\| vs HF +\| vs memcpy +\| peak USS MB",
        out,
        re.M,
    )
    assert re.search(r"^packing mmap vs HF: \d+\.\d\dx$", out, re.M)
    assert re.search(r"^\| hf datasets workers=0 +\| loader +\| \S+ +\| \S+ +\| 1\.00x ", out, re.M)


@pytest.mark.slow
def test_quick_run_end_to_end_on_the_sample_corpus(tmp_path):
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "throughput",
            "--quick",
            "--no-progress",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json",
            str(tmp_path / "quick.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "quick.json").read_text())
    stages = {r["stage"] for r in doc["results"]}
    assert stages == {"loader", "memory", "step"} | ({"h2d"} if doc["machine"]["gpus"] else set())
    check_names = [c["name"] for c in doc["checks"]]
    assert (
        "ultra_low_mem read-all USS growth, shared index files aside" in check_names
        and "CPU prefetcher data wait, 1 reader" in check_names
    )
    assert re.search(
        r"^CPU prefetcher data wait, 1 reader: \d+\.\d\d%$",
        proc.stdout,
        re.M,
    )
    # Warm (cached corpora); the first run also builds them.
    assert time.perf_counter() - started < 180
