"""`plan(...)`: from the machine's limits and the model's memory, an explained `Plan`.

It picks the micro-batch per rank (global batch kept fixed: micro x accumulation x world size
== global batch), reader threads, prefetch depth, the pinned pool and ultra-low-mem mode. The
micro-batch is the largest divisor of the per-rank batch whose device peak stays inside the top
of the target band; data-path settings are tried from best to leanest until the host fits too.
docs/ARCHITECTURE.md ("How the planner decides") gives the formulas.
"""

from __future__ import annotations

import dataclasses

from lowmem_core.errors import ConfigError, MemoryLimitError
from lowmem_core.memory import DEFAULT_HOST_SAFETY_FRAC, HostMemory, format_bytes
from trainer_low_mem.planner.batch import check_micro_batch, divisors, per_rank_batch
from trainer_low_mem.planner.explain import Reason
from trainer_low_mem.planner.footprint import (
    Footprint,
    ModelStates,
    place_model_states,
    with_optimizer,
)
from trainer_low_mem.planner.levers import (
    PLAN_FLAG_LEVERS,
    Levers,
    Option,
    lever_options,
    lever_reasons,
)
from trainer_low_mem.planner.load_memory import load_private_bytes, loading_ranks
from trainer_low_mem.planner.machine import cores, detect_devices, host_limit
from trainer_low_mem.planner.model_memory import ModelMemory
from trainer_low_mem.planner.plan import Plan
from trainer_low_mem.planner.sharding import ENGINE_NAMES, check_engine, sharded_states

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_CUDA_RESERVE_BYTES = 768 * MiB  # CUDA context, cuBLAS workspaces, fragmentation
DEFAULT_PROCESS_BASE_BYTES = 1 * GiB  # Python + torch (+ CUDA runtime) resident per process
DEFAULT_MAX_READERS = 4
DEFAULT_TARGET_FRAC = (0.85, 0.92)

Setting = tuple[int, int, bool]  # (prefetch depth, readers, ultra_low_mem)


def plan(
    *,
    global_batch: int,
    seq_len: int,
    world_size: int,
    model: ModelMemory,
    zero_stage: int = 0,
    offload_optimizer: bool = False,
    host_ram_limit_bytes: int | None = None,
    device_budget_bytes: int | None = None,
    device: str | None = None,
    num_gpus_visible: int | None = None,
    num_cores: int | None = None,
    dataset_bytes: int | None = None,
    index_bytes: int | None = None,
    micro_batch_per_rank: int | None = None,
    target_frac: tuple[float, float] = DEFAULT_TARGET_FRAC,
    ranks_per_node: int | None = None,
    host: HostMemory | None = None,
    host_from_flags: bool = False,
    host_safety_frac: float = DEFAULT_HOST_SAFETY_FRAC,
    cuda_reserve_bytes: int = DEFAULT_CUDA_RESERVE_BYTES,
    process_base_bytes: int = DEFAULT_PROCESS_BASE_BYTES,
    max_readers: int = DEFAULT_MAX_READERS,
    levers: Levers = PLAN_FLAG_LEVERS,
    optimizer: str = "adamw",
    offload_activations: str = "off",
    grad_checkpointing: bool = False,
    sharding: str | None = None,
    offload_params: bool = False,
) -> Plan:
    """Size a run; see the module docstring.

    Inputs left as None are read from this machine: GPUs and their free memory (NVML), cores
    (affinity and cgroup cpu.max), host RAM (psutil and the cgroup memory limit, via `host`).
    `host_from_flags`: the flags describe the target machine (`plan`), so a given
    `host_ram_limit_bytes` is its limit as given (less the margin), not capped by this machine's
    RAM; `train` runs here and leaves it False.
    `optimizer` ("auto", "adamw", "adamw_8bit") and `offload_activations` ("auto", "on",
    "off") are the levers as given: an "auto" one is turned on only when the plan does not fit
    without it, in the cost order of `LEVER_ORDER` (planner/levers.py); `grad_checkpointing`
    is recorded as given (it already shaped `model`'s activations). `sharding` ("fsdp2",
    "zero3") says the engine shards the parameters: `model` holds its states placed so
    (estimate.py, sharding.py, with the shards in host RAM under `offload_params`) and 8-bit
    AdamW is not planned under it.
    `device` None means CUDA when a device budget is given or a GPU is visible. Raises
    ConfigError for impossible shapes and MemoryLimitError when nothing fits, with the numbers
    and advice that names each lever as `levers` spells it.
    """
    per_rank = per_rank_batch(global_batch, world_size)
    _check_settings(seq_len, zero_stage, offload_optimizer, target_frac, max_readers, sharding)
    if sharding and model.static_device_bytes is None:
        raise ConfigError(
            f"a {sharding} plan needs the model states placed by the sharding engine; "
            "estimate them with estimate_model_memory(..., sharding=...)"
        )
    # Under sharding the engine owns the optimizer as ZeRO does: the levers treat it as stage 3.
    stage = 3 if sharding else zero_stage
    if micro_batch_per_rank is not None:
        check_micro_batch(micro_batch_per_rank, global_batch, world_size)
    devices = detect_devices(
        world_size, device_budget_bytes, num_gpus_visible, ranks_per_node, device
    )
    on_gpu, ranks = devices.on_gpu, devices.ranks_per_node
    limit = host_limit(host_ram_limit_bytes, host_safety_frac, host, host_from_flags)
    host_limit_bytes, reasons = limit.value, {"host_limit_bytes": limit}
    readers0, depth0 = _readers_and_depth(
        *cores(num_cores, host_from_flags), ranks, max_readers, reasons
    )
    placement = f"{ENGINE_NAMES[sharding]} over {world_size} ranks" if sharding else None
    placed = place_model_states(
        model, world_size, zero_stage, offload_optimizer and on_gpu, placement
    )
    engine = ENGINE_NAMES[sharding] if sharding == "fsdp2" else "DeepSpeed"
    options = lever_options(
        optimizer, offload_activations, model, on_gpu, stage, offload_optimizer, engine
    )

    def footprint(option: Option) -> tuple[Footprint, ModelStates]:
        opt, offload = option
        states = with_optimizer(placed, model, opt)
        per_token, host_per_token = model.activation_bytes_per_token, 0
        if offload and model.offload_device_bytes_per_token is not None:
            per_token = model.offload_device_bytes_per_token
            host_per_token = model.offload_host_bytes_per_token
        elif offload:  # not counted by the estimate: every activation may reach the host
            host_per_token = per_token
        fp = Footprint(
            device=devices.device,
            seq_len=seq_len,
            ranks_per_node=ranks,
            host_limit_bytes=host_limit_bytes,
            budget_bytes=devices.budget_bytes,
            model_device_bytes=states.device_bytes + model.step_fixed_bytes,
            activation_bytes_per_token=per_token,
            process_bytes=process_base_bytes,
            load_bytes=_host_model_bytes(model) if on_gpu else 0,
            load_ranks=loading_ranks(sharding, ranks, offload_params),
            offloaded_bytes=states.offloaded,
            cuda_reserve_bytes=cuda_reserve_bytes if on_gpu else 0,
            dataset_bytes=dataset_bytes or 0,
            target_frac=(float(target_frac[0]), float(target_frac[1])),
            states=states.describe(),
            step_fixed_bytes=model.step_fixed_bytes,
            source=model.source,
            index_bytes=index_bytes or 0,
            optimizer=opt,
            offload_activations=offload,
            host_activation_bytes_per_token=host_per_token,
            grad_checkpointing=grad_checkpointing,
            zero_stage=stage,
            sharding=sharding,
            offload_optimizer=offload_optimizer and on_gpu,
            offload_params=offload_params and on_gpu,
        )
        return fp, states

    # Data-path settings from best to leanest: memory-mapped, ultra-low-mem, depth 1, one reader.
    settings: list[Setting] = [(depth0, readers0, False)]
    if dataset_bytes:
        settings.append((depth0, readers0, True))
    if depth0 > 1:
        settings.append((1, readers0, bool(dataset_bytes)))
    if readers0 > 1:
        settings.append((1, 1, bool(dataset_bytes)))
    # Levers from cheapest (see LEVER_ORDER): the first option under which a micro-batch fits.
    refused: list[tuple[Option, str]] = []
    for option in options:
        fp, states = footprint(option)
        chosen, micro, failures = _choose(fp, settings, divisors(per_rank), micro_batch_per_rank)
        if chosen is not None:
            break
        refused.append((option, failures[0]))
    if chosen is None:
        sharded = None
        if sharding is None and failures[0].startswith("GPU"):
            sharded = _sharded_advice(
                model, fp, settings, (world_size, per_rank), micro_batch_per_rank, levers
            )
        raise MemoryLimitError(
            _nothing_fits(
                failures, fp, states, stage, offload_optimizer, world_size, levers, option, sharded
            )
        )
    given = (optimizer, offload_activations, grad_checkpointing)
    zero = (stage, offload_optimizer and on_gpu)
    reasons.update(
        lever_reasons(option, refused, given, on_gpu, zero, model, (placed, states), engine)
    )
    depth, readers, ultra = chosen

    reasons["micro_batch_per_rank"] = _micro_reason(micro, micro_batch_per_rank, per_rank, fp)
    why = f" to fit ({failures[-1]})" if failures else ""
    if readers != readers0:
        _append(reasons, "num_readers", readers, f"; lowered to {readers}{why}")
    if depth != depth0:
        _append(reasons, "prefetch_depth", depth, f"; lowered from {depth0} to {depth}{why}")
    reasons["pin_memory"] = Reason(
        "pin_memory",
        on_gpu,
        (
            "CUDA: page-locked buffers copy asynchronously at full PCIe rate"
            if on_gpu
            else "no GPU: nothing to copy to, pinned memory would only lock RAM"
        ),
    )
    reasons["ultra_low_mem"] = _ultra_reason(ultra, dataset_bytes, host_limit_bytes)
    if on_gpu:
        reasons["device_budget_bytes"] = Reason(
            "device_budget_bytes", devices.budget_bytes, devices.budget_why
        )
    reasons["model_memory"] = Reason(
        "model_memory",
        model.source,
        "{source} estimate: {params} parameters ({trainable} trainable), activations "
        "{act_bytes}/token, step transients {step_bytes}",
        {
            "source": model.source,
            "params": f"{model.param_count:,}",
            "trainable": f"{model.trainable:,}",
            "act_bytes": model.activation_bytes_per_token,
            "step_bytes": model.step_fixed_bytes,
        },
    )
    return Plan.settle(
        fp,
        global_batch=global_batch,
        world_size=world_size,
        micro=micro,
        depth=depth,
        readers=readers,
        ultra_low_mem=ultra,
        reasons=reasons,
    )


def _check_settings(
    seq_len: int,
    zero_stage: int,
    offload: bool,
    target_frac: tuple[float, float],
    max_readers: int,
    sharding: str | None,
) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    check_engine(sharding)
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if (zero_stage == 3) != (sharding == "zero3"):
        raise ConfigError(
            f"ZeRO stage {zero_stage} with sharding {sharding!r}: stage 3 shards the parameters "
            "and is planned with sharding='zero3' (the launch's sharding_engine), and only it"
        )
    if offload and zero_stage == 0:
        raise ConfigError(
            "optimizer offload needs ZeRO stage 1 or 2; pass --zero_stage 2 with "
            "--offload_optimizer=True"
        )
    lo, hi = target_frac
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"target_frac must satisfy 0 < low <= high <= 1, got {target_frac}")
    if max_readers < 1:
        raise ConfigError(f"max_readers must be >= 1, got {max_readers}")


def _readers_and_depth(
    cores: int, cores_from: str, ranks: int, max_readers: int, reasons: dict[str, Reason]
) -> tuple[int, int]:
    """One reader per core a rank has, one core kept for the loop; depth keeps each busy.
    `cores_from` names the count and where it came from."""
    if cores < 1:
        raise ConfigError(f"num_cores must be >= 1, got {cores}")
    per_rank = max(1, cores // ranks)
    readers = min(max_readers, max(1, per_rank - 1))
    why = cores_from + " / {ranks} rank(s) = {per_rank} per rank, one kept for the training loop"
    if per_rank - 1 > max_readers:
        why += ", capped at {max_readers} (a [B, L] fill takes well under a millisecond)"
    reasons["num_readers"] = Reason(
        "num_readers",
        readers,
        why + " -> {readers}",
        {
            "cores": cores,
            "ranks": ranks,
            "per_rank": per_rank,
            "max_readers": max_readers,
            "readers": readers,
        },
    )
    depth = max(2, readers)
    reasons["prefetch_depth"] = Reason(
        "prefetch_depth",
        depth,
        "max(2, readers): every reader has a batch in flight and one is always ready",
    )
    return readers, depth


def _append(reasons: dict[str, Reason], name: str, value: int, text: str) -> None:
    r = reasons[name]
    reasons[name] = Reason(
        name, value, r.why + text.replace("{", "{{").replace("}", "}}"), r.numbers
    )


def _choose(
    fp: Footprint, settings: list[Setting], candidates: list[int], micro_given: int | None
) -> tuple[Setting | None, int, list[str]]:
    """The first data-path setting under which a micro-batch fits the device and the host.

    Returns (setting, micro-batch, why each earlier setting failed); setting is None when none
    fits. A given micro-batch must fit the whole budget, a chosen one the band's top.
    """
    failures: list[str] = []

    def failed(message: str) -> None:
        if message not in failures:  # leaner data paths rarely change a device verdict
            failures.append(message)

    if micro_given is not None:
        candidates = [micro_given]
    for depth, readers, ultra in settings:
        lines = fp.lines(depth, readers, ultra)
        top = (
            lines.budget_bytes
            if micro_given is not None
            else int(fp.target_frac[1] * lines.budget_bytes)
        )
        fits = [m for m in candidates if lines.device_peak(m) <= top]
        if fp.host_activation_bytes_per_token and micro_given is None:
            # Offloaded activations grow the host line with the micro-batch too.
            fits = [m for m in fits if lines.host_bytes(m) <= fp.host_limit_bytes] or fits[:1]
        if not fits:
            m = candidates[0]
            failed(
                f"{'GPU' if fp.on_gpu else 'host'} at micro-batch {m}: peak "
                f"{format_bytes(lines.device_peak(m))} > {format_bytes(top)}"
            )
            continue
        micro = max(fits)
        if lines.host_bytes(micro) > fp.host_limit_bytes:
            failed(
                f"host at depth {depth}, {readers} reader(s), ultra_low_mem {ultra}: "
                f"{format_bytes(lines.host_bytes(micro))} > limit "
                f"{format_bytes(fp.host_limit_bytes)}"
            )
            continue
        return (depth, readers, ultra), micro, failures
    return None, 0, failures


def _micro_reason(micro: int, given: int | None, per_rank: int, fp: Footprint) -> Reason:
    numbers = {"per_rank": per_rank, "top_frac": fp.target_frac[1]}
    if given is not None:
        why = "given (--batch_size_per_gpu); it must fit the whole budget"
    elif micro == per_rank:
        why = (
            "the whole per-rank batch {per_rank} fits under {top_frac} of the budget: "
            "no accumulation needed"
        )
    else:
        why = (
            "largest divisor of the per-rank batch {per_rank} with peak <= {top_frac} of the budget"
        )
    return Reason("micro_batch_per_rank", micro, why, numbers)


def _ultra_reason(ultra: bool, dataset_bytes: int | None, limit_bytes: int) -> Reason:
    numbers = {"dataset_bytes": dataset_bytes, "limit_bytes": limit_bytes}
    if dataset_bytes is None:
        why = "dataset size not given: memory-mapped (its page cache is shared and reclaimable)"
    elif ultra:
        why = (
            "dataset {dataset_bytes} does not fit beside the rest under the host limit "
            "{limit_bytes}: pread + drop from page cache keeps resident memory flat"
        )
    else:
        why = (
            "dataset {dataset_bytes} fits in the page cache beside the rest: memory-mapped, "
            "shared by all ranks"
        )
    return Reason("ultra_low_mem", ultra, why, numbers)


def _nothing_fits(
    failures: list[str],
    fp: Footprint,
    states: ModelStates,
    zero_stage: int,
    offload: bool,
    world_size: int,
    levers: Levers,
    option: Option,
    sharded: str | None = None,
) -> str:
    """The refusal under the last option tried, advising only levers that were off in it and
    that this launch accepts (8-bit states: not under DeepSpeed; activation offload: on a GPU);
    `sharded`: the parameter-sharding launch under which the plan fits, first."""
    hints = [sharded] if sharded else []
    device_bound = failures[0].startswith("GPU")
    eight_bit, offloaded = option[0] == "adamw_8bit", option[1]
    checkpointing = None if fp.grad_checkpointing else levers.grad_checkpointing
    activation_cuts = " or ".join(x for x in (checkpointing, levers.shorter_rows) if x is not None)
    if not eight_bit and zero_stage == 0 and (device_bound or not fp.on_gpu):
        hints.append(f"{levers.optimizer_8bit} stores the optimizer states in 8 bits")
    if device_bound:
        if not offloaded:
            hints.append(f"{levers.offload_activations} keeps saved activations in host RAM")
        if zero_stage < 2 and world_size > 1:
            hints.append(f"{levers.zero_stage} partitions gradients and optimizer states")
        optimizer = states.device.get("optimizer", 0)
        # FSDP2 has no optimizer offload of its own: its parameter offload takes the states too.
        if not offload and optimizer and fp.sharding != "fsdp2":
            hints.append(
                f"{levers.offload_optimizer} moves {format_bytes(optimizer)} of optimizer "
                "states to host RAM"
            )
        if fp.sharding and not fp.offload_params:
            moved = states.device.get("weights", 0)
            if fp.sharding == "fsdp2":
                moved += states.device.get("gradients", 0) + optimizer
            hints.append(f"{levers.offload_params} moves {format_bytes(moved)} to host RAM")
        hints.append(f"{activation_cuts} cuts activations")
    else:
        if fp.host_activation_bytes_per_token:
            # The GPU fitted only by offloading activations, and their host copy is too big.
            hints.append(f"{activation_cuts} cuts the activations offloaded to host RAM")
        if states.offloaded:
            hints.append(
                f"the offloaded optimizer takes "
                f"{format_bytes(fp.ranks_per_node * states.offloaded)}: "
                f"{levers.drop_offload} if the GPU can hold it"
            )
        hints.append(levers.host_ram)
    tried = failures if len(failures) <= 2 else [failures[0], f"... {failures[-1]}"]
    per_seq = fp.activation_bytes_per_token * fp.seq_len
    return (
        f"no plan fits ({'; '.join(tried)}). Static memory per rank: {states.describe()}; "
        f"activations {format_bytes(per_seq)} per sequence; host limit "
        f"{format_bytes(fp.host_limit_bytes)}. "
        f"Try: {'; '.join(hints)}"
    )


def _sharded_advice(
    model: ModelMemory,
    fp: Footprint,
    settings: list[Setting],
    batch: tuple[int, int],
    micro_given: int | None,
    levers: Levers,
) -> str | None:
    """The first parameter-sharding launch (FSDP2, then ZeRO-3 with the optimizer in host RAM)
    under which this job fits, as advice; None when neither does, the launch has one rank, or
    the weights are quantised (FSDP2 refuses them, ZeRO-3 is not planned with them).
    `batch`: (world size, per-rank batch)."""
    world, per_rank = batch
    static = model.static_device_bytes or {}
    if model.units is None or world < 2 or not fp.on_gpu or "quantised_weights" in static:
        return None
    for engine, offload, lever in (("fsdp2", False, levers.fsdp), ("zero3", True, levers.zero3)):
        states = sharded_states(
            engine,
            param_count=model.param_count,
            trainable_count=model.trainable,
            units=model.units,
            world_size=world,
            compute_dtype_bytes=model.units.compute_dtype_bytes,
            offload_optimizer=offload,
        )
        trial = dataclasses.replace(
            fp,
            model_device_bytes=states.device_bytes + model.step_fixed_bytes,
            offloaded_bytes=states.offloaded,
            optimizer="adamw",
            load_ranks=loading_ranks(engine, fp.ranks_per_node),
        )
        chosen, micro, _ = _choose(trial, settings, divisors(per_rank), micro_given)
        if chosen is not None:
            return (
                f"{lever} shards the parameters too: model states "
                f"{format_bytes(states.device_bytes)} per rank, micro-batch {micro} fits"
            )
    return None


def _host_model_bytes(model: ModelMemory) -> int:
    """The model's copy in host RAM while a process builds it (see ModelMemory)."""
    if model.host_model_bytes is not None:
        return model.host_model_bytes
    return load_private_bytes(model.param_count)
