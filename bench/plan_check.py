"""`bench plan`: the planner's traced step memory against real CPU training steps.

For each case (a built-in preset or a Hugging Face architecture built from its config, at a
sequence length, with or without gradient checkpointing or LoRA, or LoRA on 4-bit or 8-bit
weights), the planner traces the step on
fake tensors at micro-batches 1, 2, 4 and predicts the peak at other micro-batches from its line
in tokens. The reference is torch's `MemTracker` (an independent accounting of the same tensors)
around real fp32 steps on the CPU, in the same order as the trace: a first step, then with
gradients and optimizer states resident, the optimizer step and one accumulating micro-step.
A quantised case traces the planner's stand-ins (trainer_low_mem/models/quantised_meta.py) and
steps a real bitsandbytes model that transformers quantised on the CPU from saved weights.
The sharded cases (bench/sharded_check.py) plan an FSDP2 rank and measure two real gloo ranks.
Targets: every peak within 10%, every case's bytes per token within 5%.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

from lowmem_core.errors import require_extra
from trainer_low_mem.planner.trace import trace_step_memory

# What the quantised cases' LoRA trains in: 4-bit layers compute in its dtype.
QUANTISED_COMPUTE_PRECISION = "bf16"
PEAK_TOLERANCE = 0.10
SLOPE_TOLERANCE = 0.05
TRACED_MICRO_BATCHES = (1, 2, 4)
COMMAND = "python -m bench plan --json bench_plan.json"


@dataclass(frozen=True)
class Case:
    """One model setting; `real_micro_batches` are measured with real steps."""

    name: str
    factory: Callable[[], nn.Module]
    vocab_size: int
    seq_len: int
    real_micro_batches: tuple[int, ...]
    mixed_precision: str | None = None
    real_factory: Callable[[], nn.Module] | None = None  # None: `factory` builds the real model


@dataclass(frozen=True)
class Row:
    case: str
    micro_batch: int
    seq_len: int
    traced_peak_bytes: int
    real_peak_bytes: int

    @property
    def ratio(self) -> float:
        return self.traced_peak_bytes / self.real_peak_bytes


@dataclass(frozen=True)
class Slope:
    case: str
    traced_bytes_per_token: int
    real_bytes_per_token: float
    linear_residual_frac: float
    trace_seconds: float

    @property
    def ratio(self) -> float:
        return self.traced_bytes_per_token / self.real_bytes_per_token


def _preset(name: str, grad_checkpointing: bool) -> Callable[[], nn.Module]:
    from trainer_low_mem.model import MODEL_PRESETS, DecoderLM

    return lambda: DecoderLM(MODEL_PRESETS[name], grad_checkpointing=grad_checkpointing)


def _hf_config(arch: str):
    transformers = require_extra("transformers", "hf", "Hugging Face models")
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=8192,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=1024,
            intermediate_size=688,
            num_key_value_heads=2,
        )
    return transformers.GPT2Config(
        vocab_size=8192,
        n_embd=256,
        n_layer=4,
        n_head=4,
        n_positions=1024,
        bos_token_id=0,
        eos_token_id=0,
    )


def _hf(
    arch: str, grad_checkpointing: bool, lora_rank: int = 0, quantised: str | None = None
) -> Callable[[], nn.Module]:
    """The model the trainer trains on a folder of this architecture (its config alone, so
    randomly initialised), LoRA adapters of `lora_rank` on every linear layer but the head;
    `quantised` ("4bit", "8bit"): on the planner's stand-ins of bitsandbytes' layers."""

    def build() -> nn.Module:
        from trainer_low_mem.config import ModelConfig
        from trainer_low_mem.models import resolve_model_kind

        config = _hf_config(arch)
        lora = {"lora_rank": lora_rank, "lora_alpha": 2.0 * lora_rank} if lora_rank else {}
        if quantised is not None:
            lora[f"load_in_{quantised}"] = True
        with tempfile.TemporaryDirectory() as folder:  # the module needs it only to be built
            config.save_pretrained(folder)
            model = ModelConfig(
                model=folder,
                from_scratch=quantised is None,
                grad_checkpointing=grad_checkpointing,
                **lora,
            )
            kind = resolve_model_kind(model, QUANTISED_COMPUTE_PRECISION)
            return kind.build(config.vocab_size, document_masking=True, weights=False)

    return build


def _hf_bnb(quantised: str, grad_checkpointing: bool, lora_rank: int) -> Callable[[], nn.Module]:
    """The real model of `_hf("llama", ..., quantised=...)`, as the trainer builds it: random
    weights saved to a folder, which transformers loads with bitsandbytes quantising them on the
    CPU (NF4 with double quantisation, or LLM.int8), LoRA added by peft."""

    def build() -> nn.Module:
        from trainer_low_mem.config import ModelConfig
        from trainer_low_mem.models import resolve_model_kind

        transformers = require_extra("transformers", "hf", "Hugging Face models")
        config = _hf_config("llama")
        with tempfile.TemporaryDirectory() as folder:
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
            model = ModelConfig(
                model=folder,
                lora_rank=lora_rank,
                lora_alpha=2.0 * lora_rank,
                grad_checkpointing=grad_checkpointing,
                **{f"load_in_{quantised}": True},
            )
            kind = resolve_model_kind(model, QUANTISED_COMPUTE_PRECISION)
            return kind.build(config.vocab_size, document_masking=True, weights=True)

    return build


def _quantised(name: str, quantised: str, ckpt: bool) -> Case:
    return Case(
        name,
        _hf("llama", ckpt, lora_rank=8, quantised=quantised),
        8192,
        256,
        (1, 3),
        QUANTISED_COMPUTE_PRECISION,
        real_factory=_hf_bnb(quantised, ckpt, lora_rank=8),
    )


def cases(quick: bool) -> list[Case]:
    """The validated settings; `quick` keeps one of each kind at the smallest sizes."""
    out = [
        Case("tiny L=256", _preset("tiny", False), 259, 256, (1, 3, 8)),
        Case("tiny L=256 ckpt", _preset("tiny", True), 259, 256, (1, 3, 8)),
        Case("tiny L=256 bf16", _preset("tiny", False), 259, 256, (1, 3, 8), "bf16"),
        Case("small L=256", _preset("small", False), 32000, 256, (1, 2, 3)),
        Case("small L=256 ckpt", _preset("small", True), 32000, 256, (1, 2, 3)),
        Case("small L=512", _preset("small", False), 32000, 512, (1, 3)),
        Case("hf-llama L=256", _hf("llama", False), 8192, 256, (1, 3, 6)),
        Case("hf-llama L=256 ckpt", _hf("llama", True), 8192, 256, (1, 3, 6)),
        Case("hf-llama L=256 lora", _hf("llama", False, lora_rank=8), 8192, 256, (1, 3, 6)),
        Case("hf-gpt2 L=256", _hf("gpt2", False), 8192, 256, (1, 3, 6)),
        Case("hf-gpt2 L=256 ckpt", _hf("gpt2", True), 8192, 256, (1, 3, 6)),
        _quantised("hf-llama L=256 4bit lora", "4bit", False),
        _quantised("hf-llama L=256 4bit lora ckpt", "4bit", True),
        _quantised("hf-llama L=256 8bit lora", "8bit", False),
        _quantised("hf-llama L=256 8bit lora ckpt", "8bit", True),
    ]
    if quick:
        keep = {"tiny L=256", "tiny L=256 ckpt", "hf-llama L=256 lora", "hf-gpt2 L=256"}
        out = [c for c in out if c.name in keep]
    return out


def real_peak_bytes(case: Case, micro_batch: int) -> int:
    """MemTracker's peak over a real optimizer step and an accumulating micro-step on the CPU."""
    torch.manual_seed(0)
    model = _frozen_as_buffers((case.real_factory or case.factory)())
    return step_peak_bytes(case, model, micro_batch, *_quantisation_state(model))


def step_peak_bytes(case: Case, model: nn.Module, micro_batch: int, *tracked) -> int:
    """MemTracker's peak over `model`'s real optimizer step and accumulating micro-step (after
    one warm-up step, so the optimizer states exist), with `tracked` tensors counted too."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, case.vocab_size, (micro_batch, case.seq_len))
    positions = torch.arange(case.seq_len).repeat(micro_batch, 1)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case.mixed_precision or "")

    def micro_step() -> None:
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            out = model(input_ids=ids, position_ids=positions, labels=ids)
        out.loss.backward()

    micro_step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    micro_step()
    peaks = []
    for phase in (optimizer.step, micro_step):
        tracker = MemTracker()
        tracker.track_external(model, optimizer, *tracked)
        with tracker:
            phase()
        peaks.append(sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values()))
    return max(peaks)


def _frozen_as_buffers(model: nn.Module) -> nn.Module:
    """Frozen weights re-registered as buffers (same storage): MemTracker hooks every parameter
    and cannot hook one without requires_grad (LoRA's base weights). bitsandbytes' parameter
    types carry their quantisation state on the object, so they are kept as they are."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.requires_grad:
                delattr(module, name)
                kept = param if type(param) is not nn.Parameter else param.detach()
                module.register_buffer(name, kept, persistent=False)
    return model


def _quantisation_state(model: nn.Module) -> list[torch.Tensor]:
    """bitsandbytes' quantisation state, which no module registers, for MemTracker to count:
    a 4-bit weight's absmax, codes and offset (nested included), an 8-bit layer's row scales."""
    out: dict[int, torch.Tensor] = {}  # peft's LoRA layer shows its base layer's weight too
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            for t in (state.absmax, state.code, state.offset, state.state2.absmax):
                out[id(t)] = t
            out[id(state.state2.code)] = state.state2.code
        scales = getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(scales, torch.Tensor):
            out[id(scales)] = scales
    return list(out.values())


def check_case(case: Case) -> tuple[list[Row], Slope]:
    traced = trace_step_memory(
        case.factory,
        seq_len=case.seq_len,
        micro_batches=TRACED_MICRO_BATCHES,
        device_type="cpu",
        mixed_precision=case.mixed_precision,
    )
    return compare(case.name, case, traced, lambda m: real_peak_bytes(case, m))


def compare(
    name: str, case: Case, traced, real_peak: Callable[[int], int]
) -> tuple[list[Row], Slope]:
    """The traced plan against `real_peak(micro_batch)` at each of the case's real micro-batches,
    and the slopes between the last two (the real activation bytes per extra token)."""
    rows = [
        Row(name, m, case.seq_len, traced.peak_bytes(m), real_peak(m))
        for m in case.real_micro_batches
    ]
    a, b = rows[-2], rows[-1]
    real_slope = (b.real_peak_bytes - a.real_peak_bytes) / (
        (b.micro_batch - a.micro_batch) * case.seq_len
    )
    slope = Slope(
        name,
        traced.activation_bytes_per_token,
        real_slope,
        traced.linear_residual_frac,
        traced.trace_seconds,
    )
    return rows, slope


def table(rows: list[Row], slopes: list[Slope]) -> str:
    """A Markdown table: one line per measured micro-batch, the case's slope beside its first.

    The real slope is taken between the two largest measured micro-batches; the line residual is
    how far the trace's line lies above its own traced points (non-linear peaks).
    """
    by_case = {s.case: s for s in slopes}
    lines = [
        "| case | B | L | traced peak MiB | real peak MiB | ratio | traced B/token | "
        "real B/token | slope ratio | line residual | trace s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shown: set[str] = set()
    for r in rows:
        s = by_case[r.case]
        first = r.case not in shown
        shown.add(r.case)
        slope_cells = (
            (
                f"{s.traced_bytes_per_token:,} | {s.real_bytes_per_token:,.0f} | "
                f"{s.ratio:.3f} | {s.linear_residual_frac:.1%} | {s.trace_seconds:.1f}"
            )
            if first
            else " |  |  |  | "
        )
        lines.append(
            f"| {r.case} | {r.micro_batch} | {r.seq_len} | "
            f"{r.traced_peak_bytes / 2**20:,.1f} | {r.real_peak_bytes / 2**20:,.1f} | "
            f"{r.ratio:.3f} | {slope_cells} |"
        )
    return "\n".join(lines)


def run_plan_check(quick: bool = False, json_path: Path | None = None) -> int:
    """Run every case, print the table and the verdict, write JSON; 1 when a target is missed."""
    started = time.perf_counter()
    rows: list[Row] = []
    slopes: list[Slope] = []
    from bench.sharded_check import check_sharded_case, sharded_cases

    checks = [(c.name, check_case, c) for c in cases(quick)]
    checks += [(c.name, check_sharded_case, c) for c in sharded_cases(quick)]
    for name, check, case in checks:
        case_rows, slope = check(case)
        rows += case_rows
        slopes.append(slope)
        print(f"  {name}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    print(table(rows, slopes))
    worst_peak = max(abs(r.ratio - 1.0) for r in rows)
    worst_slope = max(abs(s.ratio - 1.0) for s in slopes)
    ok = worst_peak <= PEAK_TOLERANCE and worst_slope <= SLOPE_TOLERANCE
    print(
        f"worst peak miss {worst_peak:.1%} (target {PEAK_TOLERANCE:.0%}), worst slope miss "
        f"{worst_slope:.1%} (target {SLOPE_TOLERANCE:.0%}): {'PASS' if ok else 'FAIL'}"
    )
    if json_path is not None:
        doc = {
            "command": COMMAND,
            "torch": torch.__version__,
            "machine": platform.platform(),
            "traced_micro_batches": list(TRACED_MICRO_BATCHES),
            "rows": [{**asdict(r), "ratio": r.ratio} for r in rows],
            "slopes": [{**asdict(s), "ratio": s.ratio} for s in slopes],
            "worst_peak_miss": worst_peak,
            "worst_slope_miss": worst_slope,
            "pass": ok,
            "seconds": time.perf_counter() - started,
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {json_path}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1
