"""Why a plan is what it is: one `Reason` per setting, with the numbers behind it, and `table()`.

A reason is a record (what, value, why, numbers): `why` is a sentence with `{name}`
placeholders filled from `numbers`, so the figures stay machine-readable in the saved plan and
read as text in the table. Numbers named `*_bytes` print as binary sizes, `*_frac` as percents.
The reasons of fields that follow from others (accumulation, pinned pool, memory peaks) are
rebuilt by `dependent_reasons` whenever a plan is derived, so they never go stale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lowmem_core.memory import format_bytes
from pipeline.cost import BATCH_BYTES_PER_TOKEN
from trainer_low_mem.planner.batch import divisors
from trainer_low_mem.planner.footprint import Footprint, Lines
from trainer_low_mem.planner.model_memory import QuantisedWeights

if TYPE_CHECKING:
    from trainer_low_mem.planner.plan import Plan

BYTE_FIELDS = (
    "pinned_pool_bytes",
    "device_budget_bytes",
    "device_peak_bytes_planned",
    "host_limit_bytes",
    "host_bytes_planned",
)
TABLE_ORDER = (
    "optimizer",
    "offload_activations",
    "micro_batch_per_rank",
    "grad_accum_steps",
    "num_readers",
    "prefetch_depth",
    "pin_memory",
    "pinned_pool_bytes",
    "ultra_low_mem",
    "device_budget_bytes",
    "device_peak_bytes_planned",
    "host_limit_bytes",
    "host_bytes_planned",
    "loss_chunk_tokens",
)


@dataclass(frozen=True)
class Reason:
    """Why one setting has its value: the rule in words and the figures it used."""

    what: str  # the plan field (or a note's name)
    value: Any
    why: str  # a sentence with {name} placeholders for `numbers`
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.why.format_map({k: _render(k, v) for k, v in self.numbers.items()})

    def __str__(self) -> str:
        return self.text

    @classmethod
    def from_text(cls, what: str, value: Any, text: str) -> Reason:
        """A reason saved as plain text (plans written before reasons had numbers)."""
        return cls(what, value, text.replace("{", "{{").replace("}", "}}"))


def _render(name: str, value: Any) -> str:
    if name.endswith("_bytes") and (value is None or isinstance(value, int)):
        return format_bytes(value)
    if name.endswith("_frac") and isinstance(value, float):
        return f"{value:.1%}"
    return str(value)


def frac(part: int, whole: int) -> float:
    """part / whole as a float (0.0 for an empty whole), for `*_frac` numbers."""
    return part / whole if whole > 0 else 0.0


def quantised_weights_wording(
    static_bytes: Mapping[str, int], quantised: QuantisedWeights
) -> tuple[str, dict[str, Any]]:
    """What a quantised model's weights cost, as a `why` fragment and its numbers: the packed
    linear layers, their quantisation state, the layers left unquantised, and the transient of
    dequantising one layer for its matmuls (already inside the step's peaks)."""
    numbers = {
        "quant_mode": quantised.mode,
        "quant_layers": len(quantised.linear_shapes),
        "quant_params": f"{quantised.quantised_params:,}",
        "quantised_weights_bytes": static_bytes.get("quantised_weights", 0),
        "quant_state_bytes": static_bytes.get("quant_state", 0),
        "unquantised_bytes": static_bytes.get("weights", 0),
        "dequant_bytes": quantised.dequant_transient_bytes,
    }
    why = (
        "{quant_mode} weights: {quant_layers} linear layers ({quant_params} parameters) packed "
        "in {quantised_weights_bytes} + quantisation state {quant_state_bytes}; embeddings, "
        "output head, norms and adapters unquantised {unquantised_bytes}; each quantised layer "
        "dequantised for its matmuls, a transient of up to {dequant_bytes}"
    )
    return why, numbers


def dependent_reasons(plan: Plan, fp: Footprint, lines: Lines) -> dict[str, Reason]:
    """The reasons of every field that follows from micro-batch, depth, readers and reader mode."""
    micro, depth = plan.micro_batch_per_rank, plan.prefetch_depth
    mapped = fp.mapped_dataset_bytes(plan.ultra_low_mem)
    reasons = {
        "grad_accum_steps": Reason(
            "grad_accum_steps",
            plan.grad_accum_steps,
            "{accum} = global {global_batch} / (world {world} x micro {micro}); "
            "global batch unchanged",
            {
                "accum": plan.grad_accum_steps,
                "global_batch": plan.global_batch,
                "world": plan.world_size,
                "micro": micro,
            },
        ),
        "device_peak_bytes_planned": _peak_reason(plan, fp, lines),
        "host_bytes_planned": _host_reason(plan, fp, mapped),
    }
    pool = {
        "depth": depth,
        "micro": micro,
        "seq_len": fp.seq_len,
        "token_bytes": BATCH_BYTES_PER_TOKEN,
        "pool_bytes": fp.pool_bytes(micro, depth),
    }
    if fp.on_gpu:
        why = "(depth {depth} + 1) buffer sets x {micro} x {seq_len} tokens x {token_bytes}"
    else:
        why = "0: no GPU to copy to (a pageable pool of {pool_bytes} instead)"
    reasons["pinned_pool_bytes"] = Reason("pinned_pool_bytes", plan.pinned_pool_bytes, why, pool)
    if not fp.on_gpu:
        why = "no GPU: this rank's share of host RAM, ({host_limit_bytes}"
        why += " - mapped dataset {dataset_bytes})" if mapped else ")"
        why += " / {ranks} rank(s)"
        why += ", capped at the given {cap_bytes}" if fp.budget_bytes is not None else ""
        reasons["device_budget_bytes"] = Reason(
            "device_budget_bytes",
            lines.budget_bytes,
            why,
            {
                "host_limit_bytes": fp.host_limit_bytes,
                "dataset_bytes": mapped,
                "ranks": fp.ranks_per_node,
                "cap_bytes": fp.budget_bytes,
            },
        )
    return reasons


def _peak_reason(plan: Plan, fp: Footprint, lines: Lines) -> Reason:
    micro = plan.micro_batch_per_rank
    peak, budget = lines.device_peak(micro), lines.budget_bytes
    lo, hi = fp.target_frac
    band = (
        "inside"
        if lo * budget <= peak <= hi * budget
        else ("above" if peak > hi * budget else "below")
    )
    numbers: dict[str, Any] = {
        "states": fp.states,
        "act_bytes": fp.activation_bytes_per_token,
        "source": fp.source,
        "micro": micro,
        "seq_len": fp.seq_len,
        "step_bytes": fp.step_fixed_bytes,
        "peak_frac": frac(peak, budget),
        "budget_bytes": budget,
        "band": band,
        "lo_frac": float(lo),
        "hi_frac": float(hi),
    }
    why = (
        "{states} + activations {act_bytes}/token ({source}) x {micro} x {seq_len} + step "
        "transients {step_bytes}"
    )
    if fp.on_gpu:
        numbers["copies_bytes"] = fp.pool_bytes(micro, plan.prefetch_depth)
        numbers["reserve_bytes"] = fp.cuda_reserve_bytes
        why += " + prefetch copies {copies_bytes} + CUDA reserve {reserve_bytes}"
    else:
        why += " + process and data path (training in host RAM)"
    why += " = {peak_frac} of the budget {budget_bytes}, {band} the {lo_frac}-{hi_frac} band"
    larger = [m for m in divisors(plan.per_rank_batch) if m > micro]
    if larger:
        numbers.update(next=larger[0], next_frac=frac(lines.device_peak(larger[0]), budget))
        why += "; micro-batch {next} would need {next_frac}"
    return Reason("device_peak_bytes_planned", peak, why, numbers)


def _host_reason(plan: Plan, fp: Footprint, mapped: int) -> Reason:
    numbers: dict[str, Any] = {
        "host_bytes": plan.host_bytes_planned,
        "host_frac": frac(plan.host_bytes_planned, fp.host_limit_bytes),
        "dataset_bytes": mapped,
        "ranks": fp.ranks_per_node,
        "process_bytes": fp.process_bytes,
        "offloaded_bytes": fp.offloaded_bytes,
        "load_bytes": fp.load_bytes,
        "readers": plan.num_readers,
        "index_bytes": fp.index_bytes,
    }
    why = "{host_bytes} = {host_frac} of the limit: "
    why += "mapped dataset {dataset_bytes} + " if mapped else ""
    why += "epoch index (shared, page cache) {index_bytes} + " if fp.index_bytes else ""
    why += "{ranks} rank(s) x (process {process_bytes}"
    one_loads = fp.load_ranks is not None and fp.load_ranks < fp.ranks_per_node
    if fp.load_bytes and one_loads:
        # FSDP2: rank 0 alone loads; the others' shards are filled from it (load_memory.py).
        numbers["load_excess_bytes"] = max(fp.load_bytes - fp.offloaded_bytes, 0)
        if fp.offloaded_bytes:
            why += " + offloaded optimizer {offloaded_bytes}"
    elif fp.load_bytes and fp.offloaded_bytes:
        # The load copy is freed before the offloaded states exist (Footprint.load_bytes).
        why += " + the larger of model load {load_bytes} and offloaded optimizer {offloaded_bytes}"
    elif fp.load_bytes:
        why += " + model load {load_bytes}"
    elif fp.offloaded_bytes:
        why += " + offloaded optimizer {offloaded_bytes}"
    if fp.host_activation_bytes_per_token:
        numbers["saved_bytes"] = (
            fp.host_activation_bytes_per_token * fp.seq_len * plan.micro_batch_per_rank
        )
        why += " + offloaded activations of one micro-batch {saved_bytes}"
    why += "" if fp.on_gpu else " + training state"
    why += " + prefetch pool + {readers} reader(s))"
    if fp.load_bytes and one_loads:
        why += " + rank 0's model load {load_bytes}"
        why += " beyond its offloaded states: {load_excess_bytes}" if fp.offloaded_bytes else ""
        why += " (FSDP2: the other ranks load nothing)"
    return Reason("host_bytes_planned", plan.host_bytes_planned, why, numbers)


def render_table(plan: Plan) -> str:
    """The plan as a header line and an aligned table: setting, value, reason; then notes."""
    rows = [("setting", "value", "reason")]
    for name in TABLE_ORDER:
        value = getattr(plan, name)
        shown = format_bytes(value) if name in BYTE_FIELDS else str(value)
        reason = plan.reasons.get(name)
        rows.append((name, shown, reason.text if reason is not None else ""))
    width0 = max(len(r[0]) for r in rows)
    width1 = max(len(r[1]) for r in rows)
    header = (
        f"plan: global batch {plan.global_batch} = micro {plan.micro_batch_per_rank} x "
        f"accumulation {plan.grad_accum_steps} x world {plan.world_size}; seq_len "
        f"{plan.seq_len} ({plan.tokens_per_step:,} tokens per step); device {plan.device}, "
        f"{plan.ranks_per_node} rank(s) per node"
    )
    lines = [header] + [f"{a:<{width0}}  {b:<{width1}}  {c}".rstrip() for a, b, c in rows]
    notes = [f"  {k}: {r.text}" for k, r in plan.reasons.items() if k not in TABLE_ORDER]
    used = _estimate_used(plan)
    notes += [f"  {used}"] if used else []
    return "\n".join(lines + (["notes:", *notes] if notes else []))


def _estimate_used(plan: Plan) -> str | None:
    """Which model-memory estimate the plan's numbers come from, and what the analytic
    cross-check beside a trace compares."""
    memory = plan.reasons.get("model_memory")
    if memory is None:
        return None
    line = f"the plan uses the {memory.value} estimate"
    estimate = plan.reasons.get("model_estimate")
    if estimate is not None and "analytic_ratio" in estimate.numbers:
        line += (
            "; the analytic cross-check is the analytic count's activation bytes per token and "
            f"their ratio to the {memory.value}'s, shown for comparison only"
        )
    return line
