"""The advice a launch gives names what the user can change in the command they ran: `plan`'s
flags, or the fields of the DeepSpeed config `train` was launched with."""

from __future__ import annotations

from pathlib import Path

from trainer_low_mem.config import LaunchConfig
from trainer_low_mem.launch import ZERO_LAUNCH_CONFIG, Launch

CONFIGS = Path(__file__).resolve().parents[2] / "accelerate_configs"


def _from_env(env: dict[str, str]) -> Launch:
    return Launch.from_env("no", env=env, cuda_device_count=3, deepspeed_installed=True)


def test_plan_advises_its_own_flags():
    levers = Launch.from_flags(LaunchConfig(world_size=3), "bf16").levers(False)
    assert levers.zero_stage == "--zero_stage 2"
    assert levers.offload_optimizer.startswith("--offload_optimizer=True")
    assert levers.grad_checkpointing == "--grad_checkpointing=True"


def test_train_under_deepspeed_advises_the_fields_of_its_config():
    ds_json = str(CONFIGS / "ds_zero2_offload.json")
    env = {
        "WORLD_SIZE": "3",
        "LOCAL_WORLD_SIZE": "3",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": ds_json,
    }
    launch = _from_env(env)
    assert (launch.zero_stage, launch.optimizer_offload) == (2, "cpu")
    levers = launch.levers(grad_checkpointing=True)
    assert levers.zero_stage == f"zero_optimization.stage: 2 in the DeepSpeed config ({ds_json})"
    assert "--" not in levers.zero_stage + levers.offload_optimizer + levers.drop_offload
    assert levers.grad_checkpointing is None  # already on: not advised again


def test_train_under_ddp_points_at_a_deepspeed_config():
    env = {"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}
    levers = _from_env(env).levers(grad_checkpointing=False)
    assert (
        levers.zero_stage == f"launching with --config_file {ZERO_LAUNCH_CONFIG} (DeepSpeed ZeRO-2)"
    )
    assert levers.grad_checkpointing == "--grad_checkpointing=True"


def test_train_with_zero_set_in_the_accelerate_config_advises_its_keys(tmp_path):
    env = {
        "WORLD_SIZE": "3",
        "LOCAL_WORLD_SIZE": "3",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1",
        "ACCELERATE_CONFIG_FILE": "zero1.yaml",
    }
    levers = _from_env(env).levers(grad_checkpointing=False)
    assert levers.zero_stage == "zero_stage: 2 in the deepspeed_config section of zero1.yaml"
    assert levers.offload_optimizer.startswith("offload_optimizer_device: cpu in")
