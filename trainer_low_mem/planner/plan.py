"""`Plan`: the sizes a run uses, each with its reason, saved with the checkpoint.

A plan is never edited field by field: the derive methods (`with_micro_batch`, `backoff`,
`with_prefetch_depth`, `with_ultra_low_mem`, `with_num_readers`) recompute every field that
follows from the changed one, and its reason, from the plan's `Footprint`; a plan whose fields
disagree with its footprint is refused at construction, so a saved plan is never stale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lowmem_core.errors import ConfigError, MemoryLimitError
from lowmem_core.memory import format_bytes
from trainer_low_mem.planner.batch import check_micro_batch, divisors
from trainer_low_mem.planner.explain import Reason, dependent_reasons, render_table
from trainer_low_mem.planner.footprint import Footprint

# Saved plans of earlier versions used GPU-specific names for what is host RAM on a CPU run.
LEGACY_NAMES = {
    "micro_batch_per_gpu": "micro_batch_per_rank",
    "gpu_budget_bytes": "device_budget_bytes",
    "gpu_peak_bytes_planned": "device_peak_bytes_planned",
}
_REPLAN = "re-plan with `train_low_mem.py plan ...`"


@dataclass(frozen=True)
class Plan:
    """Everything the data path and the trainer size from the machine, each with its reason."""

    micro_batch_per_rank: int
    grad_accum_steps: int
    world_size: int
    global_batch: int  # sequences of seq_len tokens per optimizer step, over all ranks
    seq_len: int
    num_readers: int
    prefetch_depth: int
    pinned_pool_bytes: int  # per rank; 0 when pin_memory is off
    pin_memory: bool
    ultra_low_mem: bool
    device_budget_bytes: int  # per rank; without a GPU, this rank's share of host RAM
    device_peak_bytes_planned: int  # per rank
    host_limit_bytes: int  # per node
    host_bytes_planned: int  # per node
    device: str  # "cuda", or "cpu" when training runs in host RAM
    ranks_per_node: int
    device_fixed_bytes: int  # device peak at micro-batch 0 (see footprint.py)
    device_bytes_per_sequence: int
    host_fixed_bytes: int  # host bytes at micro-batch 0
    host_bytes_per_sequence: int
    optimizer: str = "adamw"  # "adamw" or "adamw_8bit" (bitsandbytes), as the trainer builds it
    offload_activations: bool = False  # saved activations wait in (pinned) host RAM
    footprint: Footprint | None = None  # None only in plans saved before footprints existed
    reasons: dict[str, Reason] = field(default_factory=dict)
    loss_chunk_tokens: int | None = None  # positions per loss chunk; None in older saved plans

    def __post_init__(self) -> None:
        micro, accum, world = self.micro_batch_per_rank, self.grad_accum_steps, self.world_size
        product = micro * accum * world
        if min(micro, accum, world) < 1 or product != self.global_batch:
            raise ConfigError(
                f"plan breaks the global batch: micro {micro} x accumulation {accum} x world "
                f"{world} = {product}, not {self.global_batch}"
            )
        if self.footprint is None:
            return
        expected = _footprint_fields(
            self.footprint, micro, self.prefetch_depth, self.num_readers, self.ultra_low_mem
        )
        stale = {k: v for k, v in expected.items() if getattr(self, k) != v}
        if stale:
            name, value = next(iter(stale.items()))
            raise ConfigError(
                f"plan field {name} is {getattr(self, name)} but its footprint gives {value}"
                f"{f' (and {len(stale) - 1} more)' if len(stale) > 1 else ''}; derive plans "
                "with Plan.with_*() instead of editing fields, or " + _REPLAN
            )

    @classmethod
    def settle(
        cls,
        fp: Footprint,
        *,
        global_batch: int,
        world_size: int,
        micro: int,
        depth: int,
        readers: int,
        ultra_low_mem: bool,
        reasons: dict[str, Reason],
    ) -> Plan:
        """The plan at these settings: every dependent field and its reason from `fp`.

        `reasons` explains the settings themselves (micro-batch, readers, depth, reader mode,
        limits); the reasons of the fields that follow from them are rebuilt here.
        """
        check_micro_batch(micro, global_batch, world_size)
        base = cls(
            micro_batch_per_rank=micro,
            grad_accum_steps=global_batch // (world_size * micro),
            world_size=world_size,
            global_batch=global_batch,
            num_readers=readers,
            prefetch_depth=depth,
            ultra_low_mem=ultra_low_mem,
            footprint=fp,
            **_footprint_fields(fp, micro, depth, readers, ultra_low_mem),
        )
        lines = fp.lines(depth, readers, ultra_low_mem)
        return dataclasses.replace(base, reasons={**reasons, **dependent_reasons(base, fp, lines)})

    @property
    def per_rank_batch(self) -> int:
        """Sequences each rank processes per optimizer step."""
        return self.global_batch // self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def table(self) -> str:
        """The plan as an aligned three-column table: setting, value, reason."""
        return render_table(self)

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; each reason also carries its rendered `text`."""
        d = dataclasses.asdict(self)
        d["reasons"] = {
            k: {**dataclasses.asdict(r), "text": r.text} for k, r in self.reasons.items()
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Inverse of `to_dict`; also reads plans saved with the earlier GPU-specific names."""
        d = {LEGACY_NAMES.get(k, k): v for k, v in d.items()}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = {
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        unknown, missing = sorted(set(d) - set(fields)), sorted(required - set(d))
        if unknown or missing:
            raise ConfigError(
                f"not a Plan dict (missing: {', '.join(missing) or 'none'}; unknown: "
                f"{', '.join(unknown) or 'none'}); it was written by another version: {_REPLAN}"
            )
        reasons = {}
        try:
            for name, r in (d.get("reasons") or {}).items():
                name = LEGACY_NAMES.get(name, name)
                if isinstance(r, str):
                    reasons[name] = Reason.from_text(name, d.get(name), r)
                else:
                    reasons[name] = Reason(r["what"], r["value"], r["why"], dict(r["numbers"]))
            fp = d.get("footprint")
            if fp is not None:
                fp = Footprint(**{**fp, "target_frac": tuple(fp["target_frac"])})
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"not a Plan dict (a reason or the footprint is malformed: {exc!r}); {_REPLAN}"
            ) from None
        return cls(**{**d, "footprint": fp, "reasons": reasons})

    # -- derived plans ----------------------------------------------------------------------
    def with_micro_batch(self, micro: int, why: str) -> Plan:
        """Another micro-batch, accumulation adjusted so the global batch is unchanged."""
        check_micro_batch(micro, self.global_batch, self.world_size)
        return self._derive(
            Reason(
                "micro_batch_per_rank",
                micro,
                "{micro} (was {old}): {why}",
                {"micro": micro, "old": self.micro_batch_per_rank, "why": why},
            ),
            micro=micro,
        )

    def backoff(self) -> Plan:
        """After an out-of-memory error: the largest valid micro-batch at most half this one."""
        if self.micro_batch_per_rank == 1:
            raise MemoryLimitError(
                f"out of memory at micro-batch 1 (planned peak "
                f"{format_bytes(self.device_peak_bytes_planned)} of "
                f"{format_bytes(self.device_budget_bytes)}); {self.memory_advice()}"
            )
        half = self.micro_batch_per_rank // 2
        micro = max(m for m in divisors(self.per_rank_batch) if m <= half)
        return self.with_micro_batch(micro, "halved after running out of memory")

    def memory_advice(self) -> str:
        """What to try after running out of memory, naming only the levers this plan is
        without (8-bit states not under DeepSpeed or FSDP2, activation offload only with a GPU,
        the engine's own offloads where they are off)."""
        fp = self.footprint
        off = [] if fp is not None and fp.grad_checkpointing else ["--grad_checkpointing=True"]
        if self.optimizer == "adamw" and (fp is None or not fp.zero_stage):
            off.append("--optimizer adamw_8bit")
        if not self.offload_activations and self.device == "cuda":
            off.append("--offload_activations on")
        off += _engine_offloads_off(fp)
        shorter = "a shorter --max_seq_len"
        return f"try {', '.join(off)}, or {shorter}" if off else f"try {shorter}"

    def with_prefetch_depth(self, depth: int, why: str) -> Plan:
        """Another prefetch depth: pinned pool, device copies and host bytes follow."""
        _require_count("prefetch depth", depth)
        return self._derive(
            Reason(
                "prefetch_depth",
                depth,
                "{depth} (was {old}): {why}",
                {"depth": depth, "old": self.prefetch_depth, "why": why},
            ),
            depth=depth,
        )

    def with_num_readers(self, readers: int, why: str) -> Plan:
        """Another reader-thread count: their scratch and stacks follow."""
        _require_count("reader count", readers)
        return self._derive(
            Reason("num_readers", readers, "{readers}: {why}", {"readers": readers, "why": why}),
            readers=readers,
        )

    def with_ultra_low_mem(self, why: str) -> Plan:
        """Read with pread instead of a memory map: the dataset leaves the page cache."""
        return self._derive(
            Reason("ultra_low_mem", True, "switched on: {why}", {"why": why}), ultra_low_mem=True
        )

    def _derive(self, reason: Reason, **changes: Any) -> Plan:
        if self.footprint is None:
            raise ConfigError(
                f"this plan was saved without its memory footprint, so it cannot be re-derived "
                f"({reason.what}); {_REPLAN}"
            )
        settings = dict(
            micro=self.micro_batch_per_rank,
            depth=self.prefetch_depth,
            readers=self.num_readers,
            ultra_low_mem=self.ultra_low_mem,
        )
        settings.update(changes)
        derived = Plan.settle(
            self.footprint,
            global_batch=self.global_batch,
            world_size=self.world_size,
            reasons={**self.reasons, reason.what: reason},
            **settings,
        )
        # The model already runs with this chunk; nothing the derive methods change moves it.
        return dataclasses.replace(derived, loss_chunk_tokens=self.loss_chunk_tokens)


def _footprint_fields(
    fp: Footprint, micro: int, depth: int, readers: int, ultra_low_mem: bool
) -> dict[str, Any]:
    """The fields the footprint fixes at these settings, as `Plan.__post_init__` checks them."""
    lines = fp.lines(depth, readers, ultra_low_mem)
    return {
        "seq_len": fp.seq_len,
        "device": fp.device,
        "ranks_per_node": fp.ranks_per_node,
        "host_limit_bytes": fp.host_limit_bytes,
        "pin_memory": fp.on_gpu,
        "pinned_pool_bytes": fp.pool_bytes(micro, depth) if fp.on_gpu else 0,
        "device_budget_bytes": lines.budget_bytes,
        "device_peak_bytes_planned": lines.device_peak(micro),
        "host_bytes_planned": lines.host_bytes(micro),
        "device_fixed_bytes": lines.device_fixed_bytes,
        "device_bytes_per_sequence": lines.device_bytes_per_sequence,
        "host_fixed_bytes": lines.host_fixed_bytes,
        "host_bytes_per_sequence": lines.host_bytes_per_sequence,
        "optimizer": fp.optimizer,
        "offload_activations": fp.offload_activations,
    }


def _engine_offloads_off(fp: Footprint | None) -> list[str]:
    """The engine's host-RAM offloads the plan's launch has off, as the accelerate/DeepSpeed
    config turns them on (a plan saved before footprints existed: ZeRO-2's, as then)."""
    sharding = None if fp is None else fp.sharding
    if sharding == "zero3":
        return [
            f"ZeRO-3 {what} offload ({key}: cpu in the DeepSpeed config)"
            for what, key, on in (
                ("optimizer", "offload_optimizer.device", fp.offload_optimizer),
                ("parameter", "offload_param.device", fp.offload_params),
            )
            if not on
        ]
    if sharding == "fsdp2":
        return [] if fp.offload_params else ["FSDP2 parameter offload (fsdp_offload_params: true)"]
    if fp is not None and fp.zero_stage >= 2 and fp.offload_optimizer:
        return []
    return ["ZeRO-2 with optimizer offload"]


def _require_count(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
