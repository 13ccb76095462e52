"""How the job is launched, read once into a `Launch`: world size, ranks per node, DeepSpeed ZeRO
stage and optimizer offload, mixed precision.

`train` reads it from the process (`Launch.from_env`: the variables `accelerate launch` and
torchrun set, the accelerate config file, the DeepSpeed JSON, the visible CUDA devices) before
any GPU work; `plan` from its flags (`Launch.from_flags`). The launch sanity checks
(trainer_low_mem/sanity.py), the job builder and the planner all consume this one object, and
`levers()` says how the user changes each planning lever in the command they ran: flags for
`plan`, fields of the accelerate/DeepSpeed config for `train`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lowmem_core.errors import ConfigError
from trainer_low_mem.config import LaunchConfig
from trainer_low_mem.planner.levers import PLAN_FLAG_LEVERS, Levers

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The shipped accelerate config for ZeRO-2 with the optimizer states in host RAM.
ZERO_LAUNCH_CONFIG = "accelerate_configs/zero2_offload_3gpu.yaml"


@dataclass(frozen=True)
class Launch:
    """One job's launch; every field is a plain value, so checks and plans are testable without
    GPUs or a launcher."""

    distributed_type: str
    """accelerate's distributed type: "NO", "MULTI_GPU", "MULTI_CPU" or "DEEPSPEED"."""
    world_size: int
    """Processes in the job (all nodes)."""
    ranks_per_node: int | None
    """Processes sharing one host's RAM; None: the planner's default (min(world size, GPUs))."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage; 0 without DeepSpeed."""
    optimizer_offload: str | None = None
    """Where ZeRO keeps the optimizer states off the GPU: "cpu", "nvme" or None."""
    mixed_precision: str = "no"
    """Autocast precision of forward and backward: "no", "bf16" or "fp16"."""
    deepspeed: bool = False
    """The launch asks for DeepSpeed."""
    deepspeed_installed: bool | None = None
    """deepspeed and transformers import; None when not asked (planning another machine)."""
    num_processes: int | None = None
    """Processes the accelerate config file asks for; None when no file was read."""
    cuda_device_count: int = 0
    """CUDA devices visible to this process (0 when planning from flags)."""
    num_cores: int | None = None
    """CPU cores of the host; None: read from this machine."""
    rank: int = 0
    local_rank: int = 0
    device_map: str | Mapping[str, object] | None = None
    """How the model is placed when loaded (transformers' device_map); None: one device per
    rank."""
    config_file: str | None = None
    """The file that sets ZeRO and offload for `train`; None for `plan`, whose flags set them."""
    host_from_flags: bool = False
    """The flags describe the target machine (`plan`): a given host-RAM limit is the target's,
    not capped by this machine's RAM."""
    config_is_deepspeed_json: bool = False
    """`config_file` is a DeepSpeed JSON (zero_optimization.*), not the accelerate config's
    deepspeed_config section (zero_stage, offload_optimizer_device)."""
    fsdp_version: int | None = None
    """accelerate's FSDP version (1 or 2) when the launch uses FSDP; None otherwise."""
    fsdp_unhonoured: tuple[str, ...] = ()
    """FSDP config settings the trainer's FSDP2 does not follow, as "key: value" (it shards every
    transformer block and reshards after forward; checkpointing is --grad_checkpointing)."""
    param_offload: str | None = None
    """Where sharded parameters rest between uses: "cpu" (FSDP2 fsdp_offload_params, ZeRO-3
    offload_param) or None (on the GPU)."""

    @property
    def sharding_engine(self) -> str | None:
        """The engine that shards the parameters themselves: "fsdp2", "zero3", or None when
        every rank holds the whole model (DDP, ZeRO-1/2)."""
        if self.distributed_type == "FSDP":
            return "fsdp2" if self.fsdp_version == 2 else "fsdp1"
        return "zero3" if self.zero_stage == 3 else None

    @property
    def shards_parameters(self) -> bool:
        """Each rank holds 1/world_size of the parameters (FSDP2 or ZeRO-3)."""
        return self.sharding_engine is not None

    @property
    def offloads_optimizer(self) -> bool:
        """ZeRO keeps the optimizer states off the GPU (DeepSpeed's CPU Adam steps them)."""
        return self.optimizer_offload is not None

    @property
    def offload_to_host_ram(self) -> bool:
        """The offloaded optimizer states live in host RAM (NVMe offload keeps them on disk)."""
        return self.optimizer_offload == "cpu"

    def levers(self, grad_checkpointing: bool) -> Levers:
        """How to change each planning lever in the command this launch came from."""
        if self.config_file is None:
            return PLAN_FLAG_LEVERS.without_checkpointing_hint(grad_checkpointing)
        if not self.deepspeed:
            switch = f"launching with --config_file {ZERO_LAUNCH_CONFIG} (DeepSpeed ZeRO-2"
            return Levers(
                zero_stage=f"{switch})",
                offload_optimizer=f"{switch}, optimizer states in host RAM)",
                drop_offload="",  # nothing is offloaded without DeepSpeed
            ).without_checkpointing_hint(grad_checkpointing)
        if self.config_is_deepspeed_json:
            where = f"the DeepSpeed config ({self.config_file})"
            stage, offload = "zero_optimization.stage", "zero_optimization.offload_optimizer"
            drop = f"remove {offload} from {where}"
            offload += ".device"
        else:
            where = f"the deepspeed_config section of {self.config_file}"
            stage, offload = "zero_stage", "offload_optimizer_device"
            drop = f"offload_optimizer_device: none in {where}"
        return Levers(
            zero_stage=f"{stage}: 2 in {where}",
            offload_optimizer=f"{offload}: cpu in {where}",
            drop_offload=drop,
        ).without_checkpointing_hint(grad_checkpointing)

    @classmethod
    def from_flags(cls, flags: LaunchConfig, mixed_precision: str) -> Launch:
        """The launch `plan --world_size ... --zero_stage ...` describes."""
        if flags.zero_stage:
            distributed_type = "DEEPSPEED"
        elif flags.fsdp:
            distributed_type = "FSDP"
        else:
            distributed_type = "MULTI_GPU" if flags.world_size > 1 else "NO"
        return cls(
            distributed_type=distributed_type,
            world_size=flags.world_size,
            ranks_per_node=flags.ranks_per_node,
            zero_stage=flags.zero_stage,
            optimizer_offload="cpu" if flags.offload_optimizer else None,
            mixed_precision=mixed_precision,
            deepspeed=flags.zero_stage > 0,
            num_cores=flags.num_cores,
            host_from_flags=True,
            fsdp_version=2 if flags.fsdp else None,
            param_offload="cpu" if flags.offload_params else None,
        )

    @classmethod
    def from_env(
        cls,
        mixed_precision: str,
        *,
        device_map: str | Mapping[str, object] | None = None,
        accelerate_config_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        cuda_device_count: int | None = None,
        deepspeed_installed: bool | None = None,
    ) -> Launch:
        """This process's launch, read without touching any GPU.

        From `env` (default: os.environ) as `accelerate launch` and torchrun set it, torch's
        CUDA device count and whether deepspeed imports; the last three parameters override
        those readings (tests pass them). With `accelerate_config_file`, its distributed_type
        and num_processes are what the launch was meant to be, so a job started with plain
        python where a multi-process launch was intended is caught. A DeepSpeed JSON is
        resolved as DeepSpeed resolves it: relative to the working directory.
        """
        env = os.environ if env is None else env
        if cuda_device_count is None:
            import torch  # deferred: reading the launch must stay cheap

            cuda_device_count = torch.cuda.device_count()
        if deepspeed_installed is None:
            deepspeed_installed = all(
                importlib.util.find_spec(name) is not None for name in ("deepspeed", "transformers")
            )
        world_size = _env_int(env, "WORLD_SIZE", 1)
        # torchrun always sets LOCAL_WORLD_SIZE; without it there is no per-node count to check,
        # and assuming 1 never blocks a legitimate multi-node launch.
        local_world_size = _env_int(env, "LOCAL_WORLD_SIZE", 1)
        deepspeed = env_true(env, "ACCELERATE_USE_DEEPSPEED")
        ds_config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        zero_stage = (
            int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
            if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in env
            else None
        )
        offload = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")
        param_offload = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")
        fsdp = env_true(env, "ACCELERATE_USE_FSDP")
        fsdp_version = _env_int(env, "FSDP_VERSION", 1) if fsdp else None
        fsdp_offload = env_true(env, "FSDP_OFFLOAD_PARAMS")
        fsdp_settings = {key: env[name] for key, name in FSDP_UNHONOURED_ENV.items() if name in env}
        num_processes = None
        if accelerate_config_file is not None:
            cluster = load_accelerate_config(accelerate_config_file)
            dist = cluster.distributed_type
            distributed_type = str(getattr(dist, "value", dist))
            num_processes = int(cluster.num_processes)
            section = cluster.deepspeed_config or {}
            deepspeed = deepspeed or distributed_type == "DEEPSPEED"
            ds_config_file = ds_config_file or section.get("deepspeed_config_file")
            if zero_stage is None and "zero_stage" in section:
                zero_stage = int(section["zero_stage"])
            offload = offload or section.get("offload_optimizer_device")
            param_offload = param_offload or section.get("offload_param_device")
            if distributed_type == "FSDP":
                fsdp_section = cluster.fsdp_config or {}
                fsdp_version = int(fsdp_section.get("fsdp_version", fsdp_version or 1))
                fsdp_offload = fsdp_offload or _true(fsdp_section.get("fsdp_offload_params"))
                fsdp_settings = {
                    key: fsdp_section[key] for key in FSDP_UNHONOURED_ENV if key in fsdp_section
                } | fsdp_settings
        elif deepspeed:
            distributed_type = "DEEPSPEED"
        elif env_true(env, "ACCELERATE_USE_FSDP"):  # `accelerate launch` with an FSDP config
            distributed_type = "FSDP"
        elif "LOCAL_RANK" in env:  # started by torchrun, i.e. `accelerate launch --multi_gpu`
            cpu_only = env_true(env, "ACCELERATE_USE_CPU") or cuda_device_count == 0
            distributed_type = "MULTI_CPU" if cpu_only else "MULTI_GPU"
        else:
            distributed_type = "NO"
        if deepspeed and ds_config_file:
            ds_config_file = str(resolve_deepspeed_json(ds_config_file))
            ds_stage, ds_offload, ds_param_offload = read_deepspeed_zero_settings(ds_config_file)
            zero_stage = ds_stage if ds_stage is not None else zero_stage
            offload = ds_offload or offload
            param_offload = ds_param_offload or param_offload
        offload = str(offload).lower() if offload else None
        param_offload = str(param_offload).lower() if param_offload else None
        if distributed_type == "FSDP":
            param_offload = "cpu" if fsdp_offload else None
        elif not (deepspeed and (zero_stage or 0) == 3 and param_offload in ("cpu", "nvme")):
            param_offload = None
        return cls(
            distributed_type=distributed_type,
            world_size=world_size,
            ranks_per_node=local_world_size if "LOCAL_WORLD_SIZE" in env else None,
            # DeepSpeed's own default when the config names no stage is 0.
            zero_stage=(zero_stage or 0) if deepspeed else 0,
            optimizer_offload=offload if deepspeed and offload in ("cpu", "nvme") else None,
            mixed_precision=mixed_precision,
            deepspeed=deepspeed,
            deepspeed_installed=deepspeed_installed,
            num_processes=num_processes,
            cuda_device_count=cuda_device_count,
            rank=_env_int(env, "RANK", 0),
            local_rank=_env_int(env, "LOCAL_RANK", 0) if "LOCAL_WORLD_SIZE" in env else 0,
            device_map=device_map,
            config_file=ds_config_file or _accelerate_config_name(env, accelerate_config_file),
            config_is_deepspeed_json=bool(deepspeed and ds_config_file),
            fsdp_version=fsdp_version if distributed_type == "FSDP" else None,
            param_offload=param_offload,
            fsdp_unhonoured=_unhonoured(fsdp_settings) if distributed_type == "FSDP" else (),
        )

    @property
    def local_world_size(self) -> int:
        return self.ranks_per_node or 1


# FSDP config keys (and the variables `accelerate launch` passes them in) whose non-default
# values the trainer's FSDP2 would not follow, with the value it does follow.
FSDP_UNHONOURED_ENV = {
    "fsdp_activation_checkpointing": "FSDP_ACTIVATION_CHECKPOINTING",
    "fsdp_reshard_after_forward": "FSDP_RESHARD_AFTER_FORWARD",
}
FSDP_FOLLOWED = {"fsdp_activation_checkpointing": False, "fsdp_reshard_after_forward": True}


def _unhonoured(settings: Mapping[str, object]) -> tuple[str, ...]:
    """The FSDP settings given with a value other than the one the trainer follows."""
    return tuple(
        f"{key}: {str(value).lower()}"
        for key, value in settings.items()
        if _true(value) != FSDP_FOLLOWED[key]
    )


def _accelerate_config_name(env: Mapping[str, str], given: str | Path | None) -> str:
    """What `train`'s advice calls the file the user launched with."""
    if given is not None:
        return str(given)
    return env.get("ACCELERATE_CONFIG_FILE") or "your accelerate config (--config_file)"


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


def resolve_deepspeed_json(path: str | Path) -> Path:
    """The DeepSpeed JSON an accelerate config names, as an absolute path: relative to the
    working directory (as DeepSpeed opens it), else to the project root, where the shipped
    accelerate configs name theirs from (`train` passes the resolved path on to accelerate)."""
    path = Path(path)
    for candidate in (path, PROJECT_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"DeepSpeed config {path} does not exist (relative paths are resolved from the working "
        f"directory {Path.cwd()} and from {PROJECT_ROOT}); make deepspeed_config_file in the "
        "accelerate config an absolute path"
    )


def read_deepspeed_zero_settings(
    path: str | Path,
) -> tuple[int | None, str | None, str | None]:
    """(ZeRO stage, optimizer offload device, parameter offload device) from a DeepSpeed JSON;
    None for what it leaves unset. `path` is resolved by `resolve_deepspeed_json`."""
    path = resolve_deepspeed_json(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"DeepSpeed config {path} is not valid JSON ({exc}); fix the file"
        ) from None
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage")
    offload_device = (zero.get("offload_optimizer") or {}).get("device")
    param_device = (zero.get("offload_param") or {}).get("device")
    return (
        int(stage) if stage is not None else None,
        str(offload_device) if offload_device else None,
        str(param_device) if param_device else None,
    )


def detect_cpu_multiprocess(
    env: Mapping[str, str] | None = None, cuda_available: bool | None = None
) -> bool:
    """True when several processes were launched (WORLD_SIZE > 1) on a machine without CUDA.

    Then the trainer must create `Accelerator(cpu=True)` so the processes join one gloo process
    group; otherwise each would train alone and all of them would write one output directory.
    """
    env = os.environ if env is None else env
    if cuda_available is None:
        import torch  # deferred: reading the launch must stay cheap

        cuda_available = torch.cuda.is_available()
    return int(env.get("WORLD_SIZE", "1")) > 1 and not cuda_available


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


def env_true(env: Mapping[str, str], name: str) -> bool:
    """accelerate writes booleans into the environment as "true"/"True"/"1"."""
    return _true(env.get(name, ""))


def _true(value: object) -> bool:
    """A boolean as accelerate writes it into the environment or a config file."""
    return str(value).strip().lower() in ("1", "true", "yes")
