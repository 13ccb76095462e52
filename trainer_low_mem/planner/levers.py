"""The memory levers a plan may turn on, in what order, and how the user turns each one.

`lever_options` lists the (optimizer, activation offload) options a plan tries, cheapest first
(`LEVER_ORDER` says why), with what the user fixed left fixed; `lever_reasons` explains the
one taken. `Levers` spells each lever as the command the user ran takes it: `plan` takes flags,
`train` takes its ZeRO settings from the accelerate/DeepSpeed config file
(trainer_low_mem/launch.py builds those). A lever already on is not advised again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lowmem_core.errors import ConfigError
from trainer_low_mem.planner.explain import Reason
from trainer_low_mem.planner.footprint import ModelStates
from trainer_low_mem.planner.model_memory import ModelMemory

Option = tuple[str, bool]  # (optimizer, activation offload)
LEVER_ORDER = (
    "levers go on only when nothing fits without them, cheapest first: 8-bit AdamW states "
    "(2 bytes per trained parameter instead of 8; the update reads less memory, at the cost of "
    "blockwise-quantised moments), then activation offload (bit-identical, but each "
    "micro-batch copies its saved activations to host RAM and back), then both; gradient "
    "checkpointing (a second forward in backward) is --grad_checkpointing as given"
)


@dataclass(frozen=True)
class Levers:
    zero_stage: str
    """Turns on ZeRO-2 (gradients and optimizer states partitioned over the ranks)."""
    offload_optimizer: str
    """Moves the optimizer states to host RAM."""
    drop_offload: str
    """Keeps the optimizer states on the GPU again."""
    grad_checkpointing: str | None = "--grad_checkpointing=True"
    """Recomputes activations in backward; None when it is already on."""
    shorter_rows: str = "a shorter --max_seq_len"
    host_ram: str = "raise --host_ram_limit, or run fewer ranks per node"
    optimizer_8bit: str = "--optimizer adamw_8bit"
    """8-bit AdamW states (not under DeepSpeed)."""
    offload_activations: str = "--offload_activations on"
    """Saved activations in pinned host RAM (with a GPU)."""
    offload_params: str = (
        "fsdp_offload_params: true (FSDP2) or offload_param device: cpu (ZeRO-3) in the "
        "accelerate config"
    )
    """Rests the sharded parameters in host RAM between uses (FSDP2 or ZeRO-3)."""
    fsdp: str = "launching with --config_file accelerate_configs/fsdp2_3gpu.yaml (FSDP2)"
    """Shards the parameters too (FSDP2)."""
    zero3: str = (
        "launching with --config_file accelerate_configs/zero3_offload_3gpu.yaml (ZeRO-3, "
        "optimizer states in host RAM)"
    )
    """Shards the parameters too (ZeRO-3), the optimizer states in host RAM."""

    def without_checkpointing_hint(self, grad_checkpointing_on: bool) -> Levers:
        if not grad_checkpointing_on:
            return self
        return dataclasses.replace(self, grad_checkpointing=None)


PLAN_FLAG_LEVERS = Levers(
    zero_stage="--zero_stage 2",
    offload_optimizer="--offload_optimizer=True (with --zero_stage 1, 2 or 3)",
    drop_offload="drop --offload_optimizer",
    offload_params="--offload_params=True",
    fsdp="--fsdp=True",
    zero3="--zero_stage 3 --offload_optimizer=True",
)


def lever_options(
    optimizer: str,
    offload: str,
    model: ModelMemory,
    on_gpu: bool,
    zero_stage: int,
    zero_offload: bool,
    engine: str = "DeepSpeed",
) -> list[Option]:
    """The options a plan tries, in `LEVER_ORDER`; a lever the user fixed stays fixed.

    8-bit states are refused under DeepSpeed: ZeRO takes bitsandbytes' optimizer only with
    `zero_allow_untested_optimizer` and steps it on flattened fp32 partitions (not tested here),
    and with optimizer offload its CPU Adam keeps the states in host RAM anyway. Offload is
    tried by "auto" only on a GPU (on the CPU the activations are in host RAM already) and
    where the estimate counts it. `engine` names what owns the optimizer when `zero_stage` is
    set: "DeepSpeed", or a parameter-sharding engine ("FSDP2"), planned as stage 3.
    """
    if optimizer not in ("auto", "adamw", "adamw_8bit"):
        raise ConfigError(f"--optimizer must be auto, adamw or adamw_8bit, got {optimizer!r}")
    if offload not in ("auto", "on", "off"):
        raise ConfigError(f"--offload_activations must be auto, on or off, got {offload!r}")
    if optimizer == "adamw_8bit" and zero_offload:
        raise ConfigError(
            "--optimizer adamw_8bit cannot run with ZeRO optimizer offload: DeepSpeed's CPU Adam "
            "steps the states in host RAM; drop --optimizer adamw_8bit or the optimizer offload"
        )
    if optimizer == "adamw_8bit" and zero_stage and engine != "DeepSpeed":
        raise ConfigError(
            f"--optimizer adamw_8bit is not planned under {engine}: bitsandbytes' 8-bit AdamW "
            "steps plain tensors, not the engine's sharded parameters; drop --optimizer "
            "adamw_8bit or launch without parameter sharding"
        )
    if optimizer == "adamw_8bit" and zero_stage:
        raise ConfigError(
            "--optimizer adamw_8bit runs without DeepSpeed only: ZeRO takes bitsandbytes' 8-bit "
            "AdamW only as an untested optimizer stepped on its flattened partitions; drop "
            "--optimizer adamw_8bit or launch without DeepSpeed"
        )
    optimizers = {"adamw": ["adamw"], "adamw_8bit": ["adamw_8bit"]}.get(
        optimizer, ["adamw"] if zero_stage else ["adamw", "adamw_8bit"]
    )
    counted = model.offload_device_bytes_per_token is not None
    offloads = {"off": [False], "on": [True]}.get(
        offload, [False, True] if on_gpu and counted else [False]
    )
    return [(o, f) for f in offloads for o in optimizers]


def lever_reasons(
    taken: Option,
    refused: list[tuple[Option, str]],
    given: tuple[str, str, bool],
    on_gpu: bool,
    zero: tuple[int, bool],
    model: ModelMemory,
    states: tuple[ModelStates, ModelStates],
    engine: str = "DeepSpeed",
) -> dict[str, Reason]:
    """Why the plan runs with `taken`: the options tried before it and why each did not fit.

    `given`: --optimizer, --offload_activations, --grad_checkpointing; `zero`: the ZeRO stage
    and whether it offloads the optimizer; `states`: the model states as placed with fp32 AdamW
    and with the optimizer taken; `engine`: what owns the optimizer under `zero`'s stage.
    """
    optimizer, offload = taken
    opt_given, offload_given, checkpointing = given
    stage, zero_offload = zero
    adamw, chosen = states
    tried = "; ".join(f"{o}{' + offload' if f else ''}: {why}" for (o, f), why in refused)
    numbers = {
        "adamw_bytes": adamw.device.get("optimizer", 0),
        "chosen_bytes": chosen.device.get("optimizer", 0),
        "tried": tried,
    }
    if zero_offload:
        why = "DeepSpeed's CPU Adam: ZeRO keeps the optimizer states in host RAM"
    elif opt_given != "auto":
        why = "given (--optimizer {given}): states {chosen_bytes} on the device"
    elif optimizer == "adamw_8bit":
        why = "8-bit states {chosen_bytes} instead of fp32 {adamw_bytes}: without them {tried}"
    elif stage:
        why = f"fp32 states: 8-bit AdamW does not run under {engine}"
    else:
        why = "fp32 states {adamw_bytes} fit: 8-bit states not needed"
    reasons = {"optimizer": Reason("optimizer", optimizer, why, {**numbers, "given": opt_given})}
    host = {
        "host_per_token": model.offload_host_bytes_per_token,
        "device_per_token": model.offload_device_bytes_per_token,
        "tried": tried,
    }
    if offload_given != "auto":
        why = "given (--offload_activations {given})"
        if offload and on_gpu:
            why += ": {host_per_token} B/token of pinned host RAM, one micro-batch at a time"
    elif offload:
        why = (
            "saved activations wait in pinned host RAM ({host_per_token} B/token, device "
            "{device_per_token} B/token left): without it {tried}"
        )
    elif not on_gpu:
        why = "no GPU: the activations are in host RAM already"
    elif model.offload_device_bytes_per_token is None:
        why = "the {source} estimate does not count it"
    else:
        why = "not needed: the activations fit on the device"
    reasons["offload_activations"] = Reason(
        "offload_activations",
        offload,
        why,
        {**host, "given": offload_given, "source": model.source},
    )
    reasons["grad_checkpointing"] = Reason(
        "grad_checkpointing",
        checkpointing,
        "{on}: given (--grad_checkpointing)",
        {"on": checkpointing},
    )
    reasons["lever_order"] = Reason("lever_order", "cheapest first", LEVER_ORDER)
    return reasons
