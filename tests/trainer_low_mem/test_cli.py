"""The `plan` subcommand: the trainer's flag vocabulary, the same from both entry points."""

from __future__ import annotations

import json

import pytest

from lowmem_core.errors import ConfigError
from pipeline.__main__ import main as pipeline_main
from pipeline.dataset import open_dataset
from trainer_low_mem.cli import main as trainer_main

GiB = 1 << 30
FLAGS = [
    "--model_preset",
    "tiny",
    "--max_seq_len",
    "256",
    "--global_batch",
    "48",
    "--world_size",
    "3",
    "--device_budget",
    "2GiB",
    "--host_ram_limit",
    "8GiB",
    "--zero_stage",
    "2",
    "--offload_optimizer=True",
    "--num_cores",
    "8",
    "--json=True",
]


def plan_json(main, argv, capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_both_entry_points_take_the_trainer_flags_and_print_the_same_plan(capsys):
    ours = plan_json(trainer_main, ["plan", *FLAGS], capsys)
    theirs = plan_json(pipeline_main, ["plan", *FLAGS], capsys)
    assert ours == theirs
    assert ours["micro_batch_per_rank"] * ours["grad_accum_steps"] * 3 == 48
    assert (ours["device"], ours["pin_memory"], ours["seq_len"]) == ("cuda", True, 256)
    assert ours["device_budget_bytes"] == 2 * GiB  # GiB is 2^30
    assert ours["host_limit_bytes"] <= int(8 * GiB * 0.9)


def test_byte_sizes_take_decimal_and_binary_units(capsys):
    flags = ["2GB" if f == "2GiB" else f for f in FLAGS]
    d = plan_json(trainer_main, ["plan", *flags], capsys)
    assert d["device_budget_bytes"] == 2 * 10**9


def test_a_given_batch_size_per_gpu_is_the_micro_batch(capsys):
    d = plan_json(trainer_main, ["plan", *FLAGS, "--batch_size_per_gpu", "4"], capsys)
    assert (d["micro_batch_per_rank"], d["grad_accum_steps"]) == (4, 4)


def test_the_dataset_gives_the_vocabulary_and_its_size(capsys, sample_dataset_dir):
    argv = [
        "plan",
        "--model_preset",
        "tiny",
        "--max_seq_len",
        "128",
        "--global_batch",
        "8",
        "--data",
        str(sample_dataset_dir),
        "--json=True",
    ]
    d = plan_json(trainer_main, argv, capsys)
    with open_dataset(sample_dataset_dir) as ds:
        assert d["reasons"]["ultra_low_mem"]["numbers"]["dataset_bytes"] == ds.token_bytes
        assert d["footprint"]["dataset_bytes"] == ds.token_bytes


def test_the_table_and_one_line_errors(capsys):
    argv = ["plan", "--model_preset", "tiny", "--max_seq_len", "128", "--global_batch", "16"]
    assert trainer_main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: global batch 16")
    assert "micro_batch_per_rank" in out and "device_peak_bytes_planned" in out
    assert trainer_main([*argv, "--world_size", "3"]) == ConfigError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "global batch 16 is not divisible by world size 3" in err


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--lora_rank", "8"], "--lora_rank"),
        (["--max_seq_len", "4096"], "--max_seq_len 4096 exceeds preset 'tiny'"),
    ],
)
def test_what_the_analytic_plan_cannot_size_is_refused_in_one_line(capsys, flags, named):
    assert trainer_main(["plan", "--model_preset", "tiny", *flags]) == ConfigError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err
