"""Launch sanity checks, run before any GPU work: catch accelerate/DeepSpeed mistakes early.

`check_launch(launch)` takes the `Launch` (trainer_low_mem/launch.py: read from the process for
`train`, from the flags for `plan`) and raises `ConfigError` with one line naming the problem and
the fix, the fix spelled as the user changes it in the command they ran.

Also here, because it too must happen before CUDA starts: `set_cuda_alloc_conf()`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from lowmem_core.errors import ConfigError
from trainer_low_mem.launch import Launch

ZERO_STAGES = (0, 1, 2, 3)
# device_map values that spread one model over every visible GPU (transformers/accelerate names).
SPREADING_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
CUDA_ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def check_launch(facts: Launch) -> None:
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
    levers = facts.levers(grad_checkpointing=False)
    if facts.zero_stage not in ZERO_STAGES:
        raise ConfigError(
            f"ZeRO stage {facts.zero_stage} is not a ZeRO stage (0, 1, 2 or 3); use "
            f"{levers.zero_stage}"
        )
    if facts.sharding_engine == "fsdp1":
        raise ConfigError(
            f"the launch config uses FSDP version {facts.fsdp_version} "
            f"({facts.config_file or 'FSDP_VERSION'}); this trainer runs FSDP2 only: set "
            "fsdp_version: 2 in the accelerate config's fsdp_config (or --fsdp_version 2)"
        )
    if facts.sharding_engine == "fsdp2" and facts.fsdp_unhonoured:
        # Followed silently, a plan (and its checkpointing lever) would describe another run.
        raise ConfigError(
            f"the FSDP config ({facts.config_file or 'accelerate launch flags'}) sets "
            f"{', '.join(facts.fsdp_unhonoured)}, which this trainer's FSDP2 does not follow (it "
            "reshards every block after forward; checkpointing is --grad_checkpointing): set "
            "fsdp_activation_checkpointing: false and fsdp_reshard_after_forward: true, and pass "
            "--grad_checkpointing True for checkpointing"
        )
    if facts.sharding_engine == "fsdp2" and facts.mixed_precision == "fp16":
        # FSDP2 runs without accelerate's optimizer wrapper here, so no loss scaling.
        raise ConfigError(
            "FSDP2 trains in bf16 or fp32 here (fp16 would need loss scaling): launch with "
            "--mixed_precision bf16, or --mixed_precision no on GPUs without bf16"
        )
    if facts.deepspeed and facts.deepspeed_installed is False:
        raise ConfigError(
            "the launch config uses DeepSpeed ZeRO but the `deepspeed` extra is not installed; "
            "pip install 'lowmem-pipeline[deepspeed]', or launch with "
            "accelerate_configs/multi_gpu_3.yaml (plain DDP)"
        )
    if facts.offloads_optimizer and facts.zero_stage == 0:
        raise ConfigError(
            f"optimizer offload needs ZeRO stage 1, 2 or 3 but the stage is 0; use "
            f"{levers.zero_stage}"
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
    if 0 < facts.cuda_device_count < facts.local_world_size:
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


def _spreads_over_devices(device_map: str | Mapping[str, object] | None) -> bool:
    """Whether a device_map places parts of one model on different devices."""
    if device_map is None:
        return False
    if isinstance(device_map, str):
        return device_map in SPREADING_DEVICE_MAPS
    return len({str(device) for device in device_map.values()}) > 1


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
