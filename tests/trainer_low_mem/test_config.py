"""The job config and its command line: seed-compatible flat flags, validation, byte sizes.

The byte-size parser itself is tested in tests/lowmem_core/test_units.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowmem_core.errors import ConfigError
from trainer_low_mem.cli import main, parse_job_config
from trainer_low_mem.config import DEFAULT_GLOBAL_BATCH_ROWS, JobConfig


def test_seed_flags_parse_flat_with_underscores():
    c = parse_job_config(
        [
            "--data",
            "corpus",
            "--model_preset",
            "tiny",
            "--is_keep_training=True",
            "--batch_size_per_gpu",
            "16",
            "--gradient_accumulation_steps=8",
            "--max_seq_len",
            "256",
            "--global_batch",
            "384",
            "--max_steps",
            "50",
            "--epochs",
            "2.5",
            "--output_dir",
            "out",
            "--host_ram_limit",
            "24GB",
            "--auto_plan=False",
            "--log_every",
            "5",
            "--save_every",
            "20",
            "--log_with",
            "tensorboard",
            "--seed",
            "7",
            "--lr",
            "0.001",
            "--warmup_steps",
            "3",
            "--mixed_precision",
            "bf16",
            "--grad_checkpointing=True",
            "--num_readers",
            "2",
            "--packing",
            "False",
        ]
    )
    assert c.data.data == Path("corpus") and c.data.max_seq_len == 256 and c.data.packing is False
    assert c.data.num_readers == 2
    assert c.model.model_preset == "tiny" and c.model.grad_checkpointing is True
    assert c.checkpoint.is_keep_training is True and c.checkpoint.output_dir == Path("out")
    assert c.checkpoint.save_every == 20
    t = c.training
    assert (t.batch_size_per_gpu, t.gradient_accumulation_steps, t.global_batch) == (16, 8, 384)
    assert (t.max_steps, t.epochs, t.seed, t.mixed_precision) == (50, 2.5, 7, "bf16")
    assert c.memory.host_ram_limit_bytes == 24_000_000_000 and c.memory.auto_plan is False
    assert (c.log.log_every, c.log.log_with) == (5, "tensorboard")
    assert (c.optim.lr, c.optim.warmup_steps) == (0.001, 3)


def test_defaults():
    c = parse_job_config([])
    assert c.checkpoint.output_dir == Path("model_save")
    assert c.memory.auto_plan is True and c.checkpoint.is_keep_training is False
    assert c.memory.host_ram_limit_bytes is None


def test_resume_alias():
    assert parse_job_config(["--resume", "True"]).checkpoint.is_keep_training is True


def test_prefixed_flag_names_are_rejected():
    with pytest.raises(ConfigError, match=r"Unrecognized options: --training\.max_steps"):
        parse_job_config(["--training.max_steps", "5"])


@pytest.mark.parametrize(
    "text, expected", [("24GB", 24 * 10**9), ("16GiB", 16 * 2**30), ("1048576", 1048576)]
)
def test_host_ram_limit_takes_decimal_and_binary_units(text, expected):
    assert parse_job_config(["--host_ram_limit", text]).memory.host_ram_limit_bytes == expected


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--max_seq_len", "0"], "--max_seq_len"),
        (["--global_batch", "-4"], "--global_batch"),
        (["--lr", "0"], "--lr"),
        (["--warmup_steps", "-1"], "--warmup_steps"),
        (["--log_every", "0"], "--log_every"),
        (["--save_every", "-1"], "--save_every"),
        (["--host_ram_limit", "plenty"], "plenty"),
        (["--auto_plan=False"], "--batch_size_per_gpu"),
    ],
)
def test_validation_names_the_field(argv, field):
    with pytest.raises(ConfigError, match=field):
        parse_job_config(argv)


def test_global_batch_resolution():
    assert parse_job_config(["--global_batch", "48"]).resolve_global_batch(3) == 48
    c = parse_job_config(["--batch_size_per_gpu", "16", "--gradient_accumulation_steps", "8"])
    assert c.resolve_global_batch(3) == 384  # the seed's 16 x 8 x 3
    c = parse_job_config(["--auto_plan=False", "--batch_size_per_gpu", "4"])
    assert c.resolve_global_batch(2) == 8
    assert parse_job_config([]).resolve_global_batch(3) == DEFAULT_GLOBAL_BATCH_ROWS


def test_dict_round_trip():
    c = parse_job_config(["--data", "d", "--max_steps", "9", "--host_ram_limit", "2GiB"])
    again = JobConfig.from_dict(c.to_dict())
    assert again == c
    assert c.flat_dict()["max_steps"] == 9 and c.flat_dict()["data"] == "d"


def test_from_dict_rejects_unknown_keys():
    d = JobConfig().to_dict()
    d["training"]["max_stepz"] = 3
    with pytest.raises(ConfigError, match="max_stepz"):
        JobConfig.from_dict(d)


def test_cli_rejects_unknown_subcommand(capsys):
    assert main(["fit"]) == ConfigError.exit_code
    assert "unknown subcommand 'fit'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--max_grad_norm", "nan"], "--max_grad_norm"),
        (["--weight_decay", "inf"], "--weight_decay"),
        (["--epochs", "nan"], "--epochs"),
        (["--seed", str(10**20)], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--from_scratch", "True"], "--from_scratch needs --model"),
        (["--lora_rank", "0"], "--lora_rank"),
        (["--lora_rank", "4", "--lora_dropout", "1.0"], "--lora_dropout"),
        (["--load_in_4bit", "True"], "--load_in_4bit"),
        (["--eval_every", "5"], "--eval_every needs --eval_data"),
        (["--export_every", "-1"], "--export_every"),
    ],
)
def test_non_finite_and_inconsistent_flags_are_refused_naming_the_flag(flags, named):
    with pytest.raises(ConfigError) as info:
        parse_job_config(flags)
    assert named in str(info.value)


def test_own_model_flags_parse_into_the_model_section():
    config = parse_job_config(
        [
            "--model",
            "models/llama",
            "--lora_rank",
            "8",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--eval_data",
            "data/eval",
            "--eval_every",
            "50",
            "--export_every",
            "100",
        ]
    )
    assert config.model.model == Path("models/llama")
    assert config.model.lora_target_modules == ["q_proj", "v_proj"]
    assert (config.eval.eval_data, config.eval.eval_every) == (Path("data/eval"), 50)
    assert config.checkpoint.export_every == 100
    assert JobConfig.from_dict(config.to_dict()) == config
