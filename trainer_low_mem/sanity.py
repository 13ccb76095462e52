"""Launch sanity checks, run before any GPU work: catch accelerate/DeepSpeed mistakes early.

`check_launch(facts)` takes plain facts about the launch (so it is testable without GPUs) and
raises `ConfigError` with one line naming the problem and the fix. `launch_facts_from_env(...)`
gathers those facts from the real process: the environment `accelerate launch`/torchrun set
(WORLD_SIZE, LOCAL_WORLD_SIZE, LOCAL_RANK, ACCELERATE_*), the visible CUDA devices, whether
deepspeed imports, and optionally the accelerate config file itself.

Also here, because they too must happen before CUDA starts: `set_cuda_alloc_conf()` and
`detect_cpu_multiprocess()`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from lowmem_core.errors import ConfigError

ZERO_STAGES = (0, 1, 2, 3)
# device_map values that spread one model over every visible GPU (transformers/accelerate names).
SPREADING_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
CUDA_ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"


@dataclass(frozen=True)
class LaunchFacts:
    """What `check_launch` needs to know about a launch; every field is a plain value."""

    distributed_type: str
    """accelerate's distributed type: "NO", "MULTI_GPU", "MULTI_CPU" or "DEEPSPEED"."""
    num_processes: int | None
    """Processes the accelerate config asks for (all nodes); None when no config file was read."""
    world_size: int
    """Processes actually running in this job (all nodes)."""
    local_world_size: int
    """Processes running on this node."""
    cuda_device_count: int
    """CUDA devices visible to this process; 0 without CUDA."""
    uses_deepspeed: bool
    """The launch asks for DeepSpeed (ZeRO)."""
    deepspeed_installed: bool
    """The `deepspeed` extra is installed: deepspeed, and transformers (accelerate's DeepSpeed
    integration imports it)."""
    device_map: str | Mapping[str, object] | None
    """How the model is placed when loaded (transformers' device_map); None for the usual one
    device per rank."""
    global_batch: int | None
    """Rows per optimizer step over all ranks; None when it is derived from the other two."""
    micro_batch_per_gpu: int
    """Rows per forward pass on one rank."""
    grad_accum_steps: int | None
    """Micro-batches per optimizer step; None when it is derived from the global batch."""
    seq_len: int
    """Tokens per row."""
    model_max_seq_len: int
    """The longest row the model accepts."""
    zero_stage: int | None
    """ZeRO stage from the DeepSpeed config; None without DeepSpeed."""
    offload_optimizer: bool
    """The DeepSpeed config offloads optimizer states (to CPU or NVMe)."""
    rank: int = 0
    """This process's rank over all nodes (RANK)."""
    local_rank: int = 0
    """This process's rank on its node (LOCAL_RANK)."""


def check_launch(facts: LaunchFacts) -> None:
    """Raise ConfigError for the first problem found in `facts`; return None when the launch is
    sane."""
    world = facts.world_size
    if world < 1 or not 0 <= facts.rank < world:
        raise ConfigError(
            f"RANK={facts.rank} with WORLD_SIZE={world}: a rank must be in [0, WORLD_SIZE); the "
            "launcher's environment is inconsistent: start the job with `accelerate launch` or "
            "torchrun, or unset RANK/WORLD_SIZE for one process"
        )
    if facts.local_world_size < 1 or not 0 <= facts.local_rank < facts.local_world_size:
        raise ConfigError(
            f"LOCAL_RANK={facts.local_rank} with LOCAL_WORLD_SIZE={facts.local_world_size}: a "
            "local rank must be in [0, LOCAL_WORLD_SIZE); start the job with `accelerate launch` "
            "or torchrun"
        )
    if facts.zero_stage is not None and facts.zero_stage not in ZERO_STAGES:
        raise ConfigError(
            f"DeepSpeed zero_optimization.stage is {facts.zero_stage}, which is not a ZeRO stage; "
            "set it to 0, 1, 2 or 3 (accelerate_configs/ds_zero2_offload.json uses 2)"
        )
    if facts.uses_deepspeed and not facts.deepspeed_installed:
        raise ConfigError(
            "the launch config uses DeepSpeed ZeRO but the `deepspeed` extra is not installed; "
            "pip install 'lowmem-pipeline[deepspeed]', or launch with "
            "accelerate_configs/multi_gpu_3.yaml (plain DDP)"
        )
    if facts.offload_optimizer and facts.zero_stage == 0:
        raise ConfigError(
            "the DeepSpeed config offloads the optimizer but zero_optimization.stage is 0, and "
            "offload needs ZeRO stage 1, 2 or 3; set the stage to 2 as in "
            "accelerate_configs/ds_zero2_offload.json"
        )
    requested = facts.num_processes if facts.num_processes is not None else world
    if facts.distributed_type == "MULTI_GPU" and requested == 1:
        n_hint = facts.cuda_device_count if facts.cuda_device_count > 1 else "N"
        raise ConfigError(
            "accelerate config says MULTI_GPU but num_processes is 1, so one of "
            f"{facts.cuda_device_count} visible GPUs trains and the rest idle; launch with "
            f"--num_processes {n_hint} (one per GPU) or use accelerate_configs/single_gpu.yaml"
        )
    if facts.num_processes is not None and facts.num_processes != world:
        raise ConfigError(
            f"the accelerate config asks for {facts.num_processes} processes but {world} are "
            "running; start the job with "
            "`accelerate launch --config_file CONFIG train_low_mem.py train ...`, "
            "not with plain python"
        )
    if facts.cuda_device_count > 0 and facts.local_world_size > facts.cuda_device_count:
        raise ConfigError(
            f"{facts.local_world_size} processes on this node but only {facts.cuda_device_count} "
            "CUDA devices are visible, so several model copies would share a GPU; launch with "
            f"--num_processes {facts.cuda_device_count} per node or make more GPUs visible "
            "(CUDA_VISIBLE_DEVICES)"
        )
    if world > 1 and _spreads_over_devices(facts.device_map):
        raise ConfigError(
            f"the model is placed with device_map={facts.device_map!r} under {world}-process data "
            "parallelism: one model split over all GPUs while each rank also holds a copy; drop "
            "device_map so each rank trains one full copy on its own GPU"
        )
    if facts.seq_len > facts.model_max_seq_len:
        raise ConfigError(
            f"seq_len {facts.seq_len} exceeds the model's max_seq_len {facts.model_max_seq_len}; "
            f"lower --max_seq_len to at most {facts.model_max_seq_len} or choose a model with "
            "longer context"
        )
    _check_batch(facts)


def _spreads_over_devices(device_map: str | Mapping[str, object] | None) -> bool:
    """Whether a device_map places parts of one model on different devices."""
    if device_map is None:
        return False
    if isinstance(device_map, str):
        return device_map in SPREADING_DEVICE_MAPS
    return len({str(device) for device in device_map.values()}) > 1


def _check_batch(facts: LaunchFacts) -> None:
    """The global batch must split into equal whole micro-batches on every rank."""
    world, micro, accum, global_batch = (
        facts.world_size,
        facts.micro_batch_per_gpu,
        facts.grad_accum_steps,
        facts.global_batch,
    )
    if micro < 1:
        raise ConfigError(f"batch_size_per_gpu must be at least 1, got {micro}")
    if accum is not None and accum < 1:
        raise ConfigError(f"gradient_accumulation_steps must be at least 1, got {accum}")
    if global_batch is None:
        return
    rows_per_micro_step = world * micro
    if global_batch % rows_per_micro_step != 0:
        nearest = max(
            rows_per_micro_step, round(global_batch / rows_per_micro_step) * rows_per_micro_step
        )
        raise ConfigError(
            f"global batch {global_batch} is not divisible by processes x batch_size_per_gpu = "
            f"{world} x {micro} = {rows_per_micro_step}; set --global_batch to a multiple of "
            f"{rows_per_micro_step} (e.g. {nearest}) or change --batch_size_per_gpu"
        )
    if accum is not None and rows_per_micro_step * accum != global_batch:
        raise ConfigError(
            f"batch_size_per_gpu x gradient_accumulation_steps x processes = {micro} x {accum} x "
            f"{world} = {rows_per_micro_step * accum} but global_batch is {global_batch}; give "
            "only two of the three (the third is derived) or make them agree"
        )


def launch_facts_from_env(
    *,
    global_batch: int | None,
    micro_batch_per_gpu: int,
    grad_accum_steps: int | None,
    seq_len: int,
    model_max_seq_len: int,
    device_map: str | Mapping[str, object] | None = None,
    accelerate_config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    cuda_device_count: int | None = None,
    deepspeed_installed: bool | None = None,
) -> LaunchFacts:
    """Collect `LaunchFacts` for this process without touching any GPU.

    The batch/sequence arguments come from the trainer's config. The rest is read from `env`
    (default: os.environ) as set by `accelerate launch` and torchrun, from torch's CUDA device
    count and from whether deepspeed imports; the last three parameters override those readings
    (tests pass them). When `accelerate_config_file` is given, its distributed_type and
    num_processes are what the launch was meant to be, so a job started with plain python where
    a multi-process launch was intended is caught.

    A DeepSpeed JSON named by ACCELERATE_DEEPSPEED_CONFIG_FILE (or by the accelerate config) is
    resolved like DeepSpeed resolves it: relative to the current working directory.
    """
    env = os.environ if env is None else env
    if cuda_device_count is None:
        import torch  # deferred: importing the sanity checks must stay cheap

        cuda_device_count = torch.cuda.device_count()
    if deepspeed_installed is None:
        deepspeed_installed = all(
            importlib.util.find_spec(name) is not None for name in ("deepspeed", "transformers")
        )

    world_size = _env_int(env, "WORLD_SIZE", 1)
    # torchrun always sets LOCAL_WORLD_SIZE; without it there is no per-node count to check, and
    # assuming 1 never blocks a legitimate multi-node launch.
    local_world_size = _env_int(env, "LOCAL_WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", 0) if "LOCAL_WORLD_SIZE" in env else 0
    uses_deepspeed = _env_true(env, "ACCELERATE_USE_DEEPSPEED")
    ds_config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    zero_stage = (
        int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
        if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in env
        else None
    )
    offload_device = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")

    num_processes: int | None = None
    if accelerate_config_file is not None:
        cluster = load_accelerate_config(accelerate_config_file)
        distributed_type = str(getattr(cluster.distributed_type, "value", cluster.distributed_type))
        num_processes = int(cluster.num_processes)
        deepspeed_section = cluster.deepspeed_config or {}
        uses_deepspeed = uses_deepspeed or distributed_type == "DEEPSPEED"
        ds_config_file = ds_config_file or deepspeed_section.get("deepspeed_config_file")
        if zero_stage is None and "zero_stage" in deepspeed_section:
            zero_stage = int(deepspeed_section["zero_stage"])
        offload_device = offload_device or deepspeed_section.get("offload_optimizer_device")
    elif uses_deepspeed:
        distributed_type = "DEEPSPEED"
    elif "LOCAL_RANK" in env:  # started by torchrun, i.e. `accelerate launch --multi_gpu`
        cpu_only = _env_true(env, "ACCELERATE_USE_CPU") or cuda_device_count == 0
        distributed_type = "MULTI_CPU" if cpu_only else "MULTI_GPU"
    else:
        distributed_type = "NO"

    if uses_deepspeed and ds_config_file:
        ds_zero_stage, ds_offload_device = read_deepspeed_zero_settings(ds_config_file)
        zero_stage = ds_zero_stage if ds_zero_stage is not None else zero_stage
        offload_device = ds_offload_device or offload_device
    if uses_deepspeed and zero_stage is None:
        zero_stage = 0  # DeepSpeed's own default when the config names no stage

    return LaunchFacts(
        distributed_type=distributed_type,
        num_processes=num_processes,
        world_size=world_size,
        local_world_size=local_world_size,
        rank=rank,
        local_rank=local_rank,
        cuda_device_count=cuda_device_count,
        uses_deepspeed=uses_deepspeed,
        deepspeed_installed=deepspeed_installed,
        device_map=device_map,
        global_batch=global_batch,
        micro_batch_per_gpu=micro_batch_per_gpu,
        grad_accum_steps=grad_accum_steps,
        seq_len=seq_len,
        model_max_seq_len=model_max_seq_len,
        zero_stage=zero_stage,
        offload_optimizer=str(offload_device).lower() in ("cpu", "nvme"),
    )


def load_accelerate_config(path: str | Path):
    """Parse an accelerate config YAML/JSON with accelerate's own loader (ClusterConfig)."""
    from accelerate.commands.config import load_config_from_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"accelerate config {path} does not exist; pass one of the files in accelerate_configs/"
        )
    try:
        return load_config_from_file(str(path))
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"accelerate config {path} is not a valid accelerate config ({exc}); "
            "start from a file in accelerate_configs/ or regenerate it with `accelerate config`"
        ) from None


def read_deepspeed_zero_settings(path: str | Path) -> tuple[int | None, str | None]:
    """(ZeRO stage, optimizer offload device) from a DeepSpeed JSON; None for what it leaves unset.

    A relative path is taken relative to the current working directory, as DeepSpeed does.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"DeepSpeed config {path} does not exist (relative paths are resolved from the working "
            f"directory {Path.cwd()}); launch from the project root or make deepspeed_config_file "
            "an absolute path"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"DeepSpeed config {path} is not valid JSON ({exc}); fix the file"
        ) from None
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage")
    offload_device = (zero.get("offload_optimizer") or {}).get("device")
    return (int(stage) if stage is not None else None), (
        str(offload_device) if offload_device else None
    )


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={value!r} is not an integer; the launcher sets it: "
            f"start the job with `accelerate launch` or torchrun, or unset {name}"
        ) from None


def _env_true(env: Mapping[str, str], name: str) -> bool:
    """accelerate writes booleans into the environment as "true"/"True"/"1"."""
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


def set_cuda_alloc_conf(env: MutableMapping[str, str] | None = None) -> bool:
    """Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the user set up the allocator.

    Expandable segments let the caching allocator grow blocks in place instead of fragmenting
    reserved memory, which matters when the micro-batch changes after an OOM backoff. The
    allocator reads the variable when CUDA initialises, so call this before any CUDA work.
    Returns True when it set the variable, False when the user had set it (or PYTORCH_ALLOC_CONF).
    """
    env = os.environ if env is None else env
    if any(name in env for name in CUDA_ALLOC_CONF_VARS):
        return False
    env["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    return True


def detect_cpu_multiprocess(
    env: Mapping[str, str] | None = None, cuda_available: bool | None = None
) -> bool:
    """True when several processes were launched (WORLD_SIZE > 1) on a machine without CUDA.

    Then the trainer must create `Accelerator(cpu=True)` so the processes join one gloo process
    group; otherwise each would train alone and all of them would write one output directory.
    """
    env = os.environ if env is None else env
    if cuda_available is None:
        import torch  # deferred: importing the sanity checks must stay cheap

        cuda_available = torch.cuda.is_available()
    return int(env.get("WORLD_SIZE", "1")) > 1 and not cuda_available
