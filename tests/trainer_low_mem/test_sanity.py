"""trainer_low_mem.sanity: each launch mistake refused in one line that names what was found and
the fix, spelled as the user changes it in the command they ran (`plan` flags, `train` config
files); the CUDA allocator set up before CUDA starts."""

from __future__ import annotations

import dataclasses

import pytest

from lowmem_core.errors import ConfigError
from trainer_low_mem.config import LaunchConfig
from trainer_low_mem.launch import Launch
from trainer_low_mem.sanity import check_launch, set_cuda_alloc_conf

# A sane launch: DDP over 3 GPUs of one node.
DDP_3GPU = Launch(
    distributed_type="MULTI_GPU",
    world_size=3,
    ranks_per_node=3,
    cuda_device_count=3,
    deepspeed_installed=True,
)
ZERO2 = dataclasses.replace(
    DDP_3GPU,
    distributed_type="DEEPSPEED",
    deepspeed=True,
    zero_stage=2,
    optimizer_offload="cpu",
    config_file="ds.json",
)


def _assert_refused(launch: Launch, *key_facts: str) -> None:
    """check_launch refuses `launch` with one line that contains every one of `key_facts`."""
    with pytest.raises(ConfigError) as exc:
        check_launch(launch)
    message = str(exc.value)
    assert "\n" not in message
    for fact in key_facts:
        assert fact in message


def _message(launch: Launch) -> str:
    with pytest.raises(ConfigError) as exc:
        check_launch(launch)
    return str(exc.value)


def test_sane_launches_pass():
    assert check_launch(DDP_3GPU) is None
    single = dataclasses.replace(
        DDP_3GPU, distributed_type="NO", world_size=1, ranks_per_node=1, cuda_device_count=1
    )
    assert check_launch(single) is None
    assert check_launch(ZERO2) is None
    assert check_launch(dataclasses.replace(ZERO2, zero_stage=1)) is None
    assert check_launch(Launch.from_flags(LaunchConfig(world_size=4), "bf16")) is None
    zero2_flags = LaunchConfig(world_size=4, zero_stage=2, offload_optimizer=True)
    assert check_launch(Launch.from_flags(zero2_flags, "bf16")) is None


def test_multi_gpu_with_one_process():
    launch = dataclasses.replace(DDP_3GPU, world_size=1, ranks_per_node=1)
    _assert_refused(
        launch, "MULTI_GPU", "num_processes is 1", "--num_processes 3", "single_gpu.yaml"
    )


def test_multi_gpu_with_one_process_in_the_config_file():
    launch = dataclasses.replace(
        DDP_3GPU, num_processes=1, world_size=1, ranks_per_node=1, cuda_device_count=1
    )
    _assert_refused(
        launch, "MULTI_GPU", "num_processes is 1", "--num_processes N", "single_gpu.yaml"
    )


def test_config_asks_for_more_processes_than_are_running():
    launch = dataclasses.replace(DDP_3GPU, num_processes=3, world_size=1, ranks_per_node=1)
    _assert_refused(
        launch, "asks for 3 processes but 1 are running", "accelerate launch --config_file"
    )


def test_more_processes_per_node_than_gpus():
    launch = dataclasses.replace(DDP_3GPU, world_size=4, ranks_per_node=4)
    _assert_refused(
        launch, "4 processes", "3 CUDA devices", "--num_processes 3", "CUDA_VISIBLE_DEVICES"
    )


def test_more_processes_than_gpus_is_fine_without_cuda():
    cpu = dataclasses.replace(DDP_3GPU, distributed_type="MULTI_CPU", cuda_device_count=0)
    assert check_launch(cpu) is None


@pytest.mark.parametrize(
    "device_map", ["auto", "balanced", "sequential", {"embed": 0, "blocks": 1}]
)
def test_device_map_spreading_the_model_under_ddp(device_map):
    _assert_refused(
        dataclasses.replace(DDP_3GPU, device_map=device_map),
        f"device_map={device_map!r}",
        "3-process",
        "drop device_map",
    )


def test_device_map_on_one_device_or_one_process_is_fine():
    assert check_launch(dataclasses.replace(DDP_3GPU, device_map={"": 0})) is None
    single = dataclasses.replace(
        DDP_3GPU, distributed_type="NO", world_size=1, ranks_per_node=1, device_map="auto"
    )
    assert check_launch(single) is None


def test_zero_config_without_the_deepspeed_extra_names_the_extra_and_the_ddp_config():
    launch = dataclasses.replace(ZERO2, deepspeed_installed=False)
    _assert_refused(launch, "pip install 'lowmem-pipeline[deepspeed]'", "multi_gpu_3.yaml")


# `train` (a DeepSpeed config) and `plan` (flags): the same check, each with its own levers
# (their wording: tests/trainer_low_mem/test_launch_levers.py).
TRAIN_AND_PLAN = {
    "train": lambda **zero: dataclasses.replace(ZERO2, **zero),
    "plan": lambda **zero: Launch.from_flags(
        LaunchConfig(
            world_size=3,
            zero_stage=zero["zero_stage"],
            offload_optimizer=zero.get("optimizer_offload") == "cpu",
        ),
        "no",
    ),
}


@pytest.mark.parametrize("command", TRAIN_AND_PLAN)
@pytest.mark.parametrize("stage", [4, -1])
def test_zero_stage_outside_0_to_3(command, stage):
    launch = TRAIN_AND_PLAN[command](zero_stage=stage)
    levers = launch.levers(grad_checkpointing=False)
    assert _message(launch) == (
        f"ZeRO stage {stage} is not a ZeRO stage (0, 1, 2 or 3); use {levers.zero_stage}"
    )


@pytest.mark.parametrize("command", TRAIN_AND_PLAN)
@pytest.mark.parametrize("offload", ["cpu", None])
def test_zero_stage_3_passes_for_plan_and_train(command, offload):
    """ZeRO-3 trains (trainer_low_mem/zero3.py), with or without the optimizer in host RAM."""
    launch = TRAIN_AND_PLAN[command](zero_stage=3, optimizer_offload=offload)
    assert (launch.sharding_engine, launch.offloads_optimizer) == ("zero3", offload is not None)
    assert check_launch(launch) is None


@pytest.mark.parametrize("command", TRAIN_AND_PLAN)
def test_optimizer_offload_without_zero(command):
    launch = TRAIN_AND_PLAN[command](zero_stage=0, optimizer_offload="cpu")
    assert launch.offloads_optimizer
    levers = launch.levers(grad_checkpointing=False)
    assert _message(launch) == (
        f"optimizer offload needs ZeRO stage 1, 2 or 3 but the stage is 0; use {levers.zero_stage}"
    )


@pytest.mark.parametrize(
    "rank, world, local_rank, ranks_per_node, named",
    [
        (5, 3, 0, 3, "RANK=5 with WORLD_SIZE=3"),
        (-1, 3, 0, 3, "RANK=-1"),
        (0, 0, 0, None, "WORLD_SIZE=0"),
        (0, 3, 4, 3, "LOCAL_RANK=4 with LOCAL_WORLD_SIZE=3"),
    ],
)
def test_an_inconsistent_rank_fails_at_once_naming_the_variable(
    rank, world, local_rank, ranks_per_node, named
):
    launch = dataclasses.replace(
        DDP_3GPU, rank=rank, world_size=world, local_rank=local_rank, ranks_per_node=ranks_per_node
    )
    _assert_refused(launch, named, "accelerate launch")


# ---------------------------------------------------------------------------------- allocator


def test_set_cuda_alloc_conf_sets_expandable_segments():
    env: dict[str, str] = {}
    assert set_cuda_alloc_conf(env) is True
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


@pytest.mark.parametrize("name", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_set_cuda_alloc_conf_keeps_the_users_setting(name):
    env = {name: "max_split_size_mb:128"}
    assert set_cuda_alloc_conf(env) is False
    assert env == {name: "max_split_size_mb:128"}
