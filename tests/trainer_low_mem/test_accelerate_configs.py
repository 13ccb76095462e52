"""accelerate_configs/: every shipped file loads with accelerate's and DeepSpeed's own parsers,
passes the launch checks for the launch it makes, and is documented."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config import load_config_from_file
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import ComputeEnvironment

from trainer_low_mem.launch import Launch
from trainer_low_mem.planner.batch import check_split
from trainer_low_mem.sanity import check_launch

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "accelerate_configs"
YAMLS = sorted(path.name for path in CONFIGS.glob("*.yaml"))
DS_JSONS = sorted(path.name for path in CONFIGS.glob("*.json"))
ZERO_STAGE_OF_JSON = {"ds_zero2_offload.json": 2, "ds_zero3_offload.json": 3}


def _deepspeed_file(config: ClusterConfig) -> str | None:
    return (config.deepspeed_config or {}).get("deepspeed_config_file")


def test_configs_are_shipped():
    assert YAMLS and DS_JSONS


@pytest.mark.parametrize("name", YAMLS)
def test_each_yaml_loads_with_accelerates_loader_as_a_local_launch(name):
    config = load_config_from_file(str(CONFIGS / name))
    assert isinstance(config, ClusterConfig)
    assert config.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert config.num_processes >= 1 and config.num_processes % config.num_machines == 0
    ds_file = _deepspeed_file(config)
    if (
        ds_file is not None
    ):  # DeepSpeed opens it relative to the working directory: the project root
        assert (REPO_ROOT / ds_file).is_file()


@pytest.mark.parametrize("name", YAMLS)
def test_each_yaml_passes_the_launch_checks_for_the_launch_it_makes(name, monkeypatch):
    """The environment `accelerate launch --config_file NAME` gives rank 0 on a 3-GPU node."""
    monkeypatch.chdir(REPO_ROOT)
    config = load_config_from_file(str(CONFIGS / name))
    distributed_type = config.distributed_type.value
    per_node = config.num_processes // config.num_machines
    env = {"WORLD_SIZE": str(config.num_processes), "LOCAL_WORLD_SIZE": str(per_node)}
    if distributed_type != "NO":
        env |= {"RANK": "0", "LOCAL_RANK": "0"}
    if distributed_type == "DEEPSPEED":
        env |= {
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_CONFIG_FILE": _deepspeed_file(config),
        }
    launch = Launch.from_env(
        "no",
        accelerate_config_file=CONFIGS / name,
        env=env,
        cuda_device_count=3,
        deepspeed_installed=True,
    )
    assert check_launch(launch) is None
    assert launch.world_size == config.num_processes
    # 16 rows per GPU x 6 accumulation steps on every process.
    assert check_split(96 * launch.world_size, launch.world_size, 16, 6) is None


@pytest.mark.parametrize("name", DS_JSONS)
@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_deepspeed_json_autos_are_filled_by_accelerate_and_accepted_by_deepspeed(name, precision):
    """What accelerate does at prepare time: fill every "auto" from the trainer's settings, then
    DeepSpeed parses the result as its ZeRO stage with the optimizer on the CPU."""
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    plugin = DeepSpeedPlugin(hf_ds_config=str(CONFIGS / name))
    plugin.set_mixed_precision(precision)
    plugin.deepspeed_config_process(
        must_match=False,
        train_micro_batch_size_per_gpu=4,
        gradient_accumulation_steps=8,
        train_batch_size=32,  # x 1 process: no process group here
        gradient_clipping=1.0,
    )

    def autos(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from autos(value, f"{prefix}{key}.")
            elif value == "auto":
                yield prefix + key

    assert list(autos(plugin.deepspeed_config)) == []
    parsed = DeepSpeedConfig(plugin.deepspeed_config)
    assert (parsed.train_batch_size, parsed.gradient_clipping) == (32, 1.0)
    assert parsed.zero_optimization_stage == ZERO_STAGE_OF_JSON[name]
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert plugin.deepspeed_config["bf16"]["enabled"] is (precision == "bf16")
    assert plugin.deepspeed_config["fp16"]["enabled"] is (precision == "fp16")


def test_zero3_json_gathers_about_one_block_at_a_time():
    """DeepSpeed's defaults (1e9 live parameters, 1e9-element optimizer sub-groups) would hold
    2 GB of gathered bf16 weights and 4 GB of fp32 staging; the shipped values are in the
    README's note."""
    from deepspeed.runtime.config import DeepSpeedConfig

    config = json.loads((CONFIGS / "ds_zero3_offload.json").read_text())
    config |= {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1}
    config |= {"gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    config["bf16"] = config["fp16"] = {"enabled": False}
    zero = DeepSpeedConfig(config).zero_config
    assert (zero.stage, zero.offload_optimizer.device, zero.offload_param.device) == (
        3,
        "cpu",
        "none",
    )
    assert (zero.max_live_parameters, zero.max_reuse_distance) == (300_000_000, 300_000_000)
    assert (zero.prefetch_bucket_size, zero.param_persistence_threshold) == (50_000_000, 100_000)
    assert (zero.sub_group_size, zero.reduce_bucket_size) == (100_000_000, 50_000_000)
    assert zero.gather_16bit_weights_on_model_save is False


def test_readme_table_names_every_shipped_config():
    readme = (CONFIGS / "README.md").read_text()
    table_rows = [line for line in readme.splitlines() if line.startswith("| `")]
    assert sorted(row.split("`")[1] for row in table_rows) == YAMLS
    assert all(f"`{name}`" in readme for name in DS_JSONS)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PROBE = """
import os
import sys
from accelerate import PartialState
from accelerate.utils import DeepSpeedPlugin
from trainer_low_mem.launch import Launch, detect_cpu_multiprocess
from trainer_low_mem.sanity import check_launch

launch = Launch.from_env("no")
check_launch(launch)
report = (
    f"{launch.distributed_type} {launch.world_size} {launch.zero_stage} {launch.optimizer_offload}"
)
if launch.distributed_type == "DEEPSPEED":
    # What Accelerator does first: accelerate refuses a YAML that sets what the JSON owns.
    DeepSpeedPlugin()
    rank = os.environ["RANK"]
else:
    state = PartialState(cpu=detect_cpu_multiprocess())
    rank = state.process_index
    report += f" {state.num_processes} {state.distributed_type.value} {state.backend}"
with open(sys.argv[1] + f"/rank{rank}", "w") as f:
    f.write(report)
"""


def _launch(config_name: str, tmp_path: Path, *extra_args: str) -> dict[str, str]:
    """`accelerate launch --config_file CONFIG` the probe from the project root.

    Returns {rank file: report}."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config_name),
    ]
    command += [*extra_args, "--main_process_port", str(_free_port()), str(probe), str(tmp_path)]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {path.name: path.read_text() for path in tmp_path.glob("rank*")}


@pytest.mark.slow
def test_cpu_3proc_yaml_starts_three_ranks_in_one_gloo_group(tmp_path):
    """The real launcher: three processes in one gloo group, not three single-process runs."""
    reports = _launch("cpu_3proc.yaml", tmp_path)
    assert reports == {f"rank{rank}": "MULTI_CPU 3 0 None 3 MULTI_CPU gloo" for rank in range(3)}


@pytest.mark.slow
def test_zero2_yaml_launch_reaches_the_trainer_as_zero2_with_cpu_offload(tmp_path):
    """The real launcher hands each rank the DeepSpeed JSON, which accelerate accepts with the
    YAML; the launch read from it is stage 2 + CPU offload."""
    reports = _launch("zero2_offload_3gpu.yaml", tmp_path, "--num_processes", "2")
    assert reports == {f"rank{rank}": "DEEPSPEED 2 2 cpu" for rank in range(2)}


@pytest.mark.slow
def test_zero3_yaml_launch_reaches_the_trainer_as_zero3_with_cpu_offload(tmp_path):
    reports = _launch("zero3_offload_3gpu.yaml", tmp_path, "--num_processes", "2")
    assert reports == {f"rank{rank}": "DEEPSPEED 2 3 cpu" for rank in range(2)}


@pytest.mark.parametrize("name", ["fsdp2_3gpu.yaml", "fsdp2_cpu_2proc.yaml"])
def test_fsdp2_yamls_reach_the_trainer_as_fsdp2_without_parameter_offload(name):
    config = load_config_from_file(str(CONFIGS / name))
    env = {"WORLD_SIZE": str(config.num_processes), "LOCAL_WORLD_SIZE": str(config.num_processes)}
    launch = Launch.from_env(
        "no", accelerate_config_file=CONFIGS / name, env=env | {"RANK": "0", "LOCAL_RANK": "0"}
    )
    assert (launch.sharding_engine, launch.param_offload) == ("fsdp2", None)
