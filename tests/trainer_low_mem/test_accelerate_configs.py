"""Specification of accelerate_configs/: every file loads with accelerate's and DeepSpeed's own parsers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config import load_config_from_file
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import ComputeEnvironment

from trainer_low_mem.sanity import check_launch, launch_facts_from_env

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "accelerate_configs"
DS_JSON = CONFIGS / "ds_zero2_offload.json"

# file -> (distributed_type, num_processes, num_machines, mixed_precision from the YAML)
EXPECTED_YAMLS = {
    "single_gpu.yaml": ("NO", 1, 1, "bf16"),
    "multi_gpu_3.yaml": ("MULTI_GPU", 3, 1, "bf16"),
    "zero2_offload_3gpu.yaml": ("DEEPSPEED", 3, 1, None),
    "cpu_3proc.yaml": ("MULTI_GPU", 3, 1, "no"),
    "multi_node_example.yaml": ("MULTI_GPU", 6, 2, "bf16"),
}
AUTO_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def test_the_shipped_files_are_exactly_the_documented_ones():
    shipped = {path.name for path in CONFIGS.iterdir()}
    assert shipped == set(EXPECTED_YAMLS) | {"ds_zero2_offload.json", "README.md"}


@pytest.mark.parametrize("name", sorted(EXPECTED_YAMLS))
def test_yaml_loads_with_accelerates_config_loader(name):
    config = load_config_from_file(str(CONFIGS / name))
    distributed_type, num_processes, num_machines, mixed_precision = EXPECTED_YAMLS[name]
    assert isinstance(config, ClusterConfig)
    assert config.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == (
        distributed_type,
        num_processes,
        num_machines,
    )
    assert config.mixed_precision == mixed_precision


@pytest.mark.parametrize("name", sorted(EXPECTED_YAMLS))
def test_each_config_passes_the_launch_checks_for_the_launch_it_makes(name, monkeypatch):
    """Simulate the environment `accelerate launch --config_file NAME` gives one rank on a 3-GPU node."""
    monkeypatch.chdir(REPO_ROOT)
    distributed_type, num_processes, num_machines, _ = EXPECTED_YAMLS[name]
    env = {"WORLD_SIZE": str(num_processes), "LOCAL_WORLD_SIZE": str(num_processes // num_machines)}
    if distributed_type != "NO":
        env |= {"RANK": "0", "LOCAL_RANK": "0"}
    if distributed_type == "DEEPSPEED":
        env |= {
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(DS_JSON.relative_to(REPO_ROOT)),
        }
    facts = launch_facts_from_env(
        global_batch=96 * num_processes,
        micro_batch_per_gpu=16,
        grad_accum_steps=6,
        seq_len=1024,
        model_max_seq_len=2048,
        accelerate_config_file=CONFIGS / name,
        env=env,
        cuda_device_count=3,
        deepspeed_installed=True,
    )
    assert check_launch(facts) is None


def test_zero2_yaml_points_at_the_json_relative_to_the_project_root():
    raw = yaml.safe_load((CONFIGS / "zero2_offload_3gpu.yaml").read_text())
    assert raw["deepspeed_config"]["deepspeed_config_file"] == "accelerate_configs/ds_zero2_offload.json"
    assert (REPO_ROOT / raw["deepspeed_config"]["deepspeed_config_file"]).is_file()
    # accelerate refuses precision (and these ZeRO fields) in the YAML when a DeepSpeed JSON is used.
    forbidden = {"mixed_precision", "zero_stage", "offload_optimizer_device", "gradient_accumulation_steps"}
    assert forbidden.isdisjoint(raw) and forbidden.isdisjoint(raw["deepspeed_config"])


def test_deepspeed_json_is_zero2_with_pinned_cpu_optimizer_offload_and_auto_sizes():
    config = json.loads(DS_JSON.read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 50_000_000
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    assert all(config[key] == "auto" for key in AUTO_KEYS)


def test_deepspeed_json_passes_deepspeeds_own_config_validation():
    """Fill the "auto" values the way accelerate does at prepare time, then let DeepSpeed parse it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    config = json.loads(DS_JSON.read_text())
    config |= {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 8,
        "train_batch_size": 32,  # x 1 process: no process group here
        "gradient_clipping": 1.0,
    }
    config["bf16"]["enabled"] = True
    config["fp16"]["enabled"] = False
    parsed = DeepSpeedConfig(config)
    assert parsed.zero_optimization_stage == 2
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert parsed.zero_config.offload_optimizer.pin_memory is True
    assert parsed.train_batch_size == 32 and parsed.gradient_clipping == 1.0
    assert parsed.zero_force_ds_cpu_optimizer is False


def test_readme_table_names_every_config():
    readme = (CONFIGS / "README.md").read_text()
    table_rows = [line for line in readme.splitlines() if line.startswith("| `")]
    assert sorted(row.split("`")[1] for row in table_rows) == sorted(EXPECTED_YAMLS)
    assert "`ds_zero2_offload.json`" in readme


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PROBE = """
import os
import sys
from accelerate import PartialState
from trainer_low_mem.sanity import check_launch, detect_cpu_multiprocess, launch_facts_from_env

facts = launch_facts_from_env(global_batch=12, micro_batch_per_gpu=2, grad_accum_steps=None, seq_len=8,
                              model_max_seq_len=8)
check_launch(facts)
report = f"{facts.distributed_type} {facts.world_size} {facts.zero_stage} {facts.offload_optimizer}"
if facts.distributed_type == "DEEPSPEED":  # the facts are the point here; DeepSpeed itself needs no start
    rank = os.environ["RANK"]
else:
    state = PartialState(cpu=detect_cpu_multiprocess())
    rank = state.process_index
    report += f" {state.num_processes} {state.distributed_type.value} {state.backend}"
with open(sys.argv[1] + f"/rank{rank}", "w") as f:
    f.write(report)
"""


def _launch(config_name: str, tmp_path: Path, *extra_args: str) -> dict[str, str]:
    """`accelerate launch --config_file CONFIG` the probe from the project root; {rank file: report}."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config_name)]
    command += [*extra_args, "--main_process_port", str(_free_port()), str(probe), str(tmp_path)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {path.name: path.read_text() for path in tmp_path.glob("rank*")}


@pytest.mark.slow
def test_cpu_3proc_yaml_starts_three_ranks_in_one_gloo_group(tmp_path):
    """The real launcher: three processes, one gloo group, not three independent single-process runs."""
    reports = _launch("cpu_3proc.yaml", tmp_path)
    assert reports == {f"rank{rank}": "MULTI_CPU 3 None False 3 MULTI_CPU gloo" for rank in range(3)}


@pytest.mark.slow
def test_zero2_yaml_launch_reaches_the_trainer_as_zero2_with_cpu_offload(tmp_path):
    """The real launcher hands each rank the DeepSpeed JSON; the facts read from it are stage 2 + offload."""
    reports = _launch("zero2_offload_3gpu.yaml", tmp_path, "--num_processes", "2")
    assert reports == {f"rank{rank}": "DEEPSPEED 2 2 True" for rank in range(2)}
