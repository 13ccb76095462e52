"""trainer_low_mem.launch: the launch read once, from the process for `train` (the environment
`accelerate launch`/torchrun set, the accelerate and DeepSpeed config files, the visible GPUs) or
from the flags for `plan` (the advice a launch gives: test_launch_levers.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lowmem_core.errors import ConfigError
from trainer_low_mem.config import LaunchConfig
from trainer_low_mem.launch import Launch, detect_cpu_multiprocess
from trainer_low_mem.sanity import check_launch

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "accelerate_configs"
DS_JSON = "accelerate_configs/ds_zero2_offload.json"


def _env_launch(env: dict[str, str], **overrides) -> Launch:
    kwargs = dict(env=env, cuda_device_count=3, deepspeed_installed=True) | overrides
    return Launch.from_env("no", **kwargs)


def _torchrun_env(world_size: int, local_world_size: int | None = None) -> dict[str, str]:
    return {
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(local_world_size or world_size),
        "RANK": "0",
        "LOCAL_RANK": "0",
    }


def _deepspeed_env(world_size: int, config_file: str) -> dict[str, str]:
    return _torchrun_env(world_size) | {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": config_file,
    }


# ---------------------------------------------------------------------------- from the process


def test_plain_python_is_a_single_process_run():
    launch = _env_launch({})
    assert (launch.distributed_type, launch.world_size, launch.local_world_size) == ("NO", 1, 1)
    assert (launch.ranks_per_node, launch.num_processes) == (None, None)
    assert (launch.deepspeed, launch.zero_stage, launch.optimizer_offload) == (False, 0, None)
    assert check_launch(launch) is None


def test_torchrun_with_gpus_is_multi_gpu():
    launch = _env_launch(_torchrun_env(3))
    assert (launch.distributed_type, launch.world_size, launch.ranks_per_node) == (
        "MULTI_GPU",
        3,
        3,
    )
    assert check_launch(launch) is None


def test_torchrun_with_one_process_is_caught():
    launch = _env_launch(_torchrun_env(1))
    assert launch.distributed_type == "MULTI_GPU"
    with pytest.raises(
        ConfigError, match="^accelerate config says MULTI_GPU but num_processes is 1"
    ):
        check_launch(launch)


def test_an_fsdp2_launch_passes_as_fsdp2(tmp_path):
    # accelerate sets ACCELERATE_USE_FSDP for an FSDP config; the trainer shards the model with
    # FSDP2 itself (trainer_low_mem/fsdp.py).
    from_env = _env_launch(_torchrun_env(2) | {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    config = tmp_path / "fsdp.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\n"
        "fsdp_config:\n  fsdp_version: 2\n"
    )
    from_file = _env_launch(_torchrun_env(2), accelerate_config_file=config)
    for launch in (from_env, from_file):
        assert (launch.distributed_type, launch.sharding_engine) == ("FSDP", "fsdp2")
        assert check_launch(launch) is None


def test_an_fsdp1_launch_is_refused_with_the_version_to_set(tmp_path):
    config = tmp_path / "fsdp1.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\n"
        "fsdp_config:\n  fsdp_version: 1\n  fsdp_offload_params: true\n"
    )
    from_file = _env_launch(_torchrun_env(2), accelerate_config_file=config)
    from_env = _env_launch(_torchrun_env(2) | {"ACCELERATE_USE_FSDP": "true"})
    for launch in (from_file, from_env):
        assert (launch.fsdp_version, launch.sharding_engine) == (1, "fsdp1")
        with pytest.raises(ConfigError, match="^the launch config uses FSDP version 1 ") as info:
            check_launch(launch)
        assert "fsdp_version: 2" in str(info.value) and "\n" not in str(info.value)
    assert from_file.param_offload == "cpu" and from_env.param_offload is None


def test_fsdp_settings_the_trainer_would_not_follow_are_refused_in_one_line(tmp_path):
    config = tmp_path / "fsdp2.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\n"
        "fsdp_config:\n  fsdp_version: 2\n  fsdp_activation_checkpointing: true\n"
        "  fsdp_reshard_after_forward: true\n"
    )
    from_file = _env_launch(_torchrun_env(2), accelerate_config_file=config)
    fsdp_env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    from_env = _env_launch(_torchrun_env(2) | fsdp_env | {"FSDP_RESHARD_AFTER_FORWARD": "false"})
    assert from_file.fsdp_unhonoured == ("fsdp_activation_checkpointing: true",)
    assert from_env.fsdp_unhonoured == ("fsdp_reshard_after_forward: false",)
    for launch in (from_file, from_env):
        with pytest.raises(ConfigError, match="^the FSDP config .* sets fsdp_") as info:
            check_launch(launch)
        assert "--grad_checkpointing True" in str(info.value) and "\n" not in str(info.value)
    followed = fsdp_env | {
        "FSDP_RESHARD_AFTER_FORWARD": "true",
        "FSDP_ACTIVATION_CHECKPOINTING": "false",
    }
    assert check_launch(_env_launch(_torchrun_env(2) | followed)) is None


def test_torchrun_without_cuda_is_multi_cpu():
    launch = _env_launch(_torchrun_env(3), cuda_device_count=0)
    assert launch.distributed_type == "MULTI_CPU"
    assert check_launch(launch) is None


def test_deepspeed_launch_reads_stage_and_offload_from_the_json(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # DeepSpeed resolves the relative path from the working directory
    launch = _env_launch(_deepspeed_env(3, DS_JSON))
    assert (launch.distributed_type, launch.deepspeed, launch.zero_stage) == ("DEEPSPEED", True, 2)
    assert launch.optimizer_offload == "cpu"
    assert launch.offloads_optimizer and launch.offload_to_host_ram
    assert launch.config_file == str(REPO_ROOT / DS_JSON)
    assert check_launch(launch) is None


def test_nvme_offload_leaves_the_optimizer_states_off_host_ram(tmp_path):
    ds_json = tmp_path / "ds.json"
    zero = {"stage": 2, "offload_optimizer": {"device": "nvme"}}
    ds_json.write_text(json.dumps({"zero_optimization": zero}))
    launch = _env_launch(_deepspeed_env(3, str(ds_json)))
    assert launch.optimizer_offload == "nvme"
    assert launch.offloads_optimizer and not launch.offload_to_host_ram


def test_deepspeed_launch_from_plugin_env_vars():
    env = _torchrun_env(2) | {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "5",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
    }
    launch = _env_launch(env, deepspeed_installed=False)
    assert (launch.zero_stage, launch.optimizer_offload, launch.deepspeed_installed) == (
        5,
        None,
        False,
    )
    with pytest.raises(ConfigError, match="^ZeRO stage 5 is not a ZeRO stage"):
        check_launch(launch)


def test_missing_deepspeed_json_names_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as exc:
        _env_launch(_deepspeed_env(3, "configs/ds.json"))
    message = str(exc.value)
    assert "configs/ds.json does not exist" in message
    assert str(tmp_path) in message and str(REPO_ROOT) in message


def test_a_shipped_deepspeed_json_is_found_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped configs name it relative to the project root
    launch = _env_launch(_deepspeed_env(3, DS_JSON))
    assert launch.config_file == str((REPO_ROOT / DS_JSON).resolve())
    assert (launch.zero_stage, launch.optimizer_offload) == (2, "cpu")


def test_deepspeed_json_without_a_stage_means_stage_0(tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    launch = _env_launch(_deepspeed_env(3, str(ds_json)))
    assert (launch.zero_stage, launch.optimizer_offload) == (0, "cpu")
    with pytest.raises(ConfigError) as exc:
        check_launch(launch)
    assert str(exc.value) == (
        "optimizer offload needs ZeRO stage 1, 2 or 3 but the stage is 0; use "
        f"zero_optimization.stage: 2 in the DeepSpeed config ({ds_json})"
    )


def test_accelerate_config_run_with_plain_python_is_caught():
    launch = _env_launch({}, accelerate_config_file=CONFIGS / "multi_gpu_3.yaml")
    assert (launch.distributed_type, launch.num_processes, launch.world_size) == (
        "MULTI_GPU",
        3,
        1,
    )
    with pytest.raises(
        ConfigError, match="^the accelerate config asks for 3 processes but 1 are running"
    ):
        check_launch(launch)


def test_missing_accelerate_config_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        _env_launch({}, accelerate_config_file=tmp_path / "nope.yaml")
    assert f"{tmp_path / 'nope.yaml'} does not exist" in str(exc.value)
    assert "accelerate_configs/" in str(exc.value)


def test_device_count_and_deepspeed_presence_are_read_when_not_given():
    launch = Launch.from_env("no", env={})
    assert launch.cuda_device_count == torch.cuda.device_count()
    extra = ("deepspeed", "transformers")  # the `deepspeed` extra
    assert launch.deepspeed_installed == all(importlib.util.find_spec(m) is not None for m in extra)


@pytest.mark.parametrize(
    "env, named",
    [
        ({"RANK": "5", "WORLD_SIZE": "3"}, "RANK=5 with WORLD_SIZE=3"),
        ({"RANK": "-1", "WORLD_SIZE": "3"}, "RANK=-1"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
        (
            {"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "4"},
            "LOCAL_RANK=4",
        ),
        ({"WORLD_SIZE": "three"}, "WORLD_SIZE='three' is not an integer"),
    ],
)
def test_an_inconsistent_launch_environment_fails_at_once_naming_the_variable(env, named):
    with pytest.raises(ConfigError) as info:
        check_launch(_env_launch(env))
    assert named in str(info.value)
    assert "accelerate launch" in str(info.value)


@pytest.mark.parametrize(
    "env, cuda_available, expected",
    [
        ({"WORLD_SIZE": "3"}, False, True),
        ({"WORLD_SIZE": "3"}, True, False),
        ({"WORLD_SIZE": "1"}, False, False),
        ({}, False, False),
    ],
)
def test_detect_cpu_multiprocess(env, cuda_available, expected):
    assert detect_cpu_multiprocess(env, cuda_available=cuda_available) is expected


# ------------------------------------------------------------------------------ from plan flags


def test_plan_flags_describe_the_launch_they_plan_for():
    ddp = Launch.from_flags(LaunchConfig(world_size=4, ranks_per_node=2, num_cores=8), "bf16")
    assert (ddp.distributed_type, ddp.world_size, ddp.ranks_per_node) == ("MULTI_GPU", 4, 2)
    assert (ddp.deepspeed, ddp.zero_stage, ddp.optimizer_offload) == (False, 0, None)
    assert (ddp.mixed_precision, ddp.num_cores, ddp.config_file) == ("bf16", 8, None)
    assert Launch.from_flags(LaunchConfig(), "no").distributed_type == "NO"
    zero = Launch.from_flags(LaunchConfig(world_size=4, zero_stage=2, offload_optimizer=True), "no")
    assert (zero.distributed_type, zero.deepspeed, zero.zero_stage) == ("DEEPSPEED", True, 2)
    assert zero.optimizer_offload == "cpu" and zero.offload_to_host_ram
    assert zero.deepspeed_installed is None  # planning another machine: not asked


def test_the_config_file_train_was_launched_with_is_named_for_its_advice(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    assert _env_launch(_deepspeed_env(3, DS_JSON)).config_file == str(REPO_ROOT / DS_JSON)
    multi_gpu = CONFIGS / "multi_gpu_3.yaml"
    given = _env_launch(_torchrun_env(3), accelerate_config_file=multi_gpu)
    assert given.config_file == str(multi_gpu)
    from_env = _torchrun_env(3) | {"ACCELERATE_CONFIG_FILE": "my.yaml"}
    assert _env_launch(from_env).config_file == "my.yaml"
    assert _env_launch({}).config_file == "your accelerate config (--config_file)"
