"""trainer_low_mem.sanity: each launch mistake refused in one line that names what was found and
the fix; launch facts read from the environment."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lowmem_core.errors import ConfigError
from trainer_low_mem.sanity import (
    LaunchFacts,
    check_launch,
    detect_cpu_multiprocess,
    launch_facts_from_env,
    set_cuda_alloc_conf,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "accelerate_configs"

# A sane launch: DDP over 3 GPUs, global batch 384 = 16 per GPU x 8 accumulation x 3 processes.
DDP_3GPU = LaunchFacts(
    distributed_type="MULTI_GPU",
    num_processes=None,
    world_size=3,
    local_world_size=3,
    cuda_device_count=3,
    uses_deepspeed=False,
    deepspeed_installed=True,
    device_map=None,
    global_batch=384,
    micro_batch_per_gpu=16,
    grad_accum_steps=8,
    seq_len=1024,
    model_max_seq_len=2048,
    zero_stage=None,
    offload_optimizer=False,
)


def _assert_refused(facts: LaunchFacts, *key_facts: str) -> None:
    """check_launch refuses `facts` with one line that contains every one of `key_facts`."""
    with pytest.raises(ConfigError) as exc:
        check_launch(facts)
    message = str(exc.value)
    assert "\n" not in message
    for fact in key_facts:
        assert fact in message


def _env_facts(env: dict[str, str], **overrides) -> LaunchFacts:
    kwargs = dict(
        global_batch=384,
        micro_batch_per_gpu=16,
        grad_accum_steps=None,
        seq_len=1024,
        model_max_seq_len=2048,
        env=env,
        cuda_device_count=3,
        deepspeed_installed=True,
    )
    kwargs.update(overrides)
    return launch_facts_from_env(**kwargs)


def _torchrun_env(world_size: int, local_world_size: int | None = None) -> dict[str, str]:
    return {
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(local_world_size or world_size),
        "RANK": "0",
        "LOCAL_RANK": "0",
    }


# ------------------------------------------------------------------------------------ check_launch


def test_sane_launches_pass():
    assert check_launch(DDP_3GPU) is None
    single = dataclasses.replace(
        DDP_3GPU,
        distributed_type="NO",
        world_size=1,
        local_world_size=1,
        global_batch=128,
        cuda_device_count=1,
    )
    assert check_launch(single) is None
    zero2 = dataclasses.replace(
        DDP_3GPU,
        distributed_type="DEEPSPEED",
        uses_deepspeed=True,
        zero_stage=2,
        offload_optimizer=True,
    )
    assert check_launch(zero2) is None
    derived_accumulation = dataclasses.replace(DDP_3GPU, grad_accum_steps=None)
    assert check_launch(derived_accumulation) is None


def test_multi_gpu_with_one_process():
    facts = dataclasses.replace(DDP_3GPU, world_size=1, local_world_size=1, global_batch=None)
    _assert_refused(
        facts, "MULTI_GPU", "num_processes is 1", "--num_processes 3", "single_gpu.yaml"
    )


def test_multi_gpu_with_one_process_in_the_config_file():
    facts = dataclasses.replace(
        DDP_3GPU,
        num_processes=1,
        world_size=1,
        local_world_size=1,
        cuda_device_count=1,
        global_batch=None,
    )
    _assert_refused(
        facts, "MULTI_GPU", "num_processes is 1", "--num_processes N", "single_gpu.yaml"
    )


def test_config_asks_for_more_processes_than_are_running():
    facts = dataclasses.replace(
        DDP_3GPU, num_processes=3, world_size=1, local_world_size=1, global_batch=None
    )
    _assert_refused(
        facts, "asks for 3 processes but 1 are running", "accelerate launch --config_file"
    )


def test_more_processes_per_node_than_gpus():
    facts = dataclasses.replace(DDP_3GPU, world_size=4, local_world_size=4, global_batch=None)
    _assert_refused(
        facts, "4 processes", "3 CUDA devices", "--num_processes 3", "CUDA_VISIBLE_DEVICES"
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
        DDP_3GPU,
        distributed_type="NO",
        world_size=1,
        local_world_size=1,
        global_batch=None,
        device_map="auto",
    )
    assert check_launch(single) is None


def test_global_batch_not_divisible_by_processes_times_micro_batch():
    _assert_refused(
        dataclasses.replace(DDP_3GPU, global_batch=100, grad_accum_steps=None),
        "global batch 100",
        "3 x 16 = 48",
        "--global_batch to a multiple of 48 (e.g. 96)",
    )


def test_global_batch_smaller_than_one_micro_step_suggests_one_micro_step():
    _assert_refused(
        dataclasses.replace(DDP_3GPU, global_batch=8, grad_accum_steps=None),
        "global batch 8",
        "a multiple of 48 (e.g. 48)",
    )


def test_batch_accumulation_and_processes_disagree_with_global_batch():
    _assert_refused(
        dataclasses.replace(DDP_3GPU, grad_accum_steps=2), "16 x 2 x 3 = 96", "global_batch is 384"
    )


def test_non_positive_micro_batch():
    _assert_refused(
        dataclasses.replace(DDP_3GPU, micro_batch_per_gpu=0), "batch_size_per_gpu", "got 0"
    )


def test_zero_config_without_the_deepspeed_extra_names_the_extra_and_the_ddp_config():
    facts = dataclasses.replace(
        DDP_3GPU,
        distributed_type="DEEPSPEED",
        uses_deepspeed=True,
        deepspeed_installed=False,
        zero_stage=2,
    )
    _assert_refused(facts, "pip install 'lowmem-pipeline[deepspeed]'", "multi_gpu_3.yaml")


def test_sequence_longer_than_the_model_accepts():
    _assert_refused(
        dataclasses.replace(DDP_3GPU, seq_len=4096), "seq_len 4096", "--max_seq_len to at most 2048"
    )


@pytest.mark.parametrize("stage", [4, -1])
def test_zero_stage_outside_0_to_3(stage):
    facts = dataclasses.replace(
        DDP_3GPU, distributed_type="DEEPSPEED", uses_deepspeed=True, zero_stage=stage
    )
    _assert_refused(facts, f"zero_optimization.stage is {stage}", "0, 1, 2 or 3")


def test_optimizer_offload_without_zero():
    facts = dataclasses.replace(
        DDP_3GPU,
        distributed_type="DEEPSPEED",
        uses_deepspeed=True,
        zero_stage=0,
        offload_optimizer=True,
    )
    _assert_refused(facts, "offloads the optimizer", "stage is 0", "set the stage to 2")


# -------------------------------------------------------------------- facts from the environment


def test_plain_python_is_a_single_process_run():
    facts = _env_facts({}, global_batch=128)
    assert (facts.distributed_type, facts.world_size, facts.local_world_size) == ("NO", 1, 1)
    assert facts.num_processes is None
    assert facts.uses_deepspeed is False and facts.zero_stage is None
    assert check_launch(facts) is None


def test_torchrun_with_gpus_is_multi_gpu():
    facts = _env_facts(_torchrun_env(3))
    assert (facts.distributed_type, facts.world_size, facts.local_world_size) == ("MULTI_GPU", 3, 3)
    assert check_launch(facts) is None


def test_torchrun_with_one_process_is_caught():
    facts = _env_facts(_torchrun_env(1), global_batch=None)
    assert facts.distributed_type == "MULTI_GPU"
    with pytest.raises(
        ConfigError, match="^accelerate config says MULTI_GPU but num_processes is 1"
    ):
        check_launch(facts)


def test_torchrun_without_cuda_is_multi_cpu():
    facts = _env_facts(_torchrun_env(3), cuda_device_count=0)
    assert facts.distributed_type == "MULTI_CPU"
    assert check_launch(facts) is None


def test_deepspeed_launch_reads_stage_and_offload_from_the_json(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # DeepSpeed resolves the relative path from the working directory
    env = _torchrun_env(3) | {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": "accelerate_configs/ds_zero2_offload.json",
    }
    facts = _env_facts(env)
    assert (
        facts.distributed_type,
        facts.uses_deepspeed,
        facts.zero_stage,
        facts.offload_optimizer,
    ) == (
        "DEEPSPEED",
        True,
        2,
        True,
    )
    assert check_launch(facts) is None


def test_deepspeed_launch_from_plugin_env_vars():
    env = _torchrun_env(2) | {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "5",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
    }
    facts = _env_facts(env, deepspeed_installed=False)
    assert (facts.zero_stage, facts.offload_optimizer, facts.deepspeed_installed) == (
        5,
        False,
        False,
    )
    with pytest.raises(ConfigError, match="^DeepSpeed zero_optimization.stage is 5"):
        check_launch(facts)


def test_missing_deepspeed_json_names_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = _torchrun_env(3) | {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": "accelerate_configs/ds_zero2_offload.json",
    }
    with pytest.raises(ConfigError) as exc:
        _env_facts(env)
    message = str(exc.value)
    assert "accelerate_configs/ds_zero2_offload.json does not exist" in message
    assert str(tmp_path) in message and "project root" in message


def test_deepspeed_json_without_a_stage_means_stage_0(tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    env = _torchrun_env(3) | {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json),
    }
    facts = _env_facts(env)
    assert (facts.zero_stage, facts.offload_optimizer) == (0, True)
    with pytest.raises(ConfigError, match="^the DeepSpeed config offloads the optimizer but"):
        check_launch(facts)


def test_accelerate_config_run_with_plain_python_is_caught():
    facts = _env_facts({}, accelerate_config_file=CONFIGS / "multi_gpu_3.yaml", global_batch=None)
    assert (facts.distributed_type, facts.num_processes, facts.world_size) == ("MULTI_GPU", 3, 1)
    with pytest.raises(
        ConfigError, match="^the accelerate config asks for 3 processes but 1 are running"
    ):
        check_launch(facts)


def test_missing_accelerate_config_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        _env_facts({}, accelerate_config_file=tmp_path / "nope.yaml")
    assert f"{tmp_path / 'nope.yaml'} does not exist" in str(exc.value)
    assert "accelerate_configs/" in str(exc.value)


def test_device_count_and_deepspeed_presence_are_read_when_not_given():
    facts = launch_facts_from_env(
        global_batch=None,
        micro_batch_per_gpu=1,
        grad_accum_steps=None,
        seq_len=8,
        model_max_seq_len=8,
        env={},
    )
    import importlib.util

    import torch

    assert facts.cuda_device_count == torch.cuda.device_count()
    extra = ("deepspeed", "transformers")  # the `deepspeed` extra
    assert facts.deepspeed_installed == all(importlib.util.find_spec(m) is not None for m in extra)


# ------------------------------------------------------------------ allocator and CPU multi-process


def test_set_cuda_alloc_conf_sets_expandable_segments():
    env: dict[str, str] = {}
    assert set_cuda_alloc_conf(env) is True
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


@pytest.mark.parametrize("name", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_set_cuda_alloc_conf_keeps_the_users_setting(name):
    env = {name: "max_split_size_mb:128"}
    assert set_cuda_alloc_conf(env) is False
    assert env == {name: "max_split_size_mb:128"}


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
        check_launch(_env_facts(env, global_batch=None, micro_batch_per_gpu=1))
    assert named in str(info.value)
    assert "accelerate launch" in str(info.value)
