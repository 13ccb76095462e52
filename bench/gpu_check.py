"""`bench gpu`: the GPU path checked in one command, in under 5 minutes on one GPU.

Each check is a small function of a `Context` (the device, the sample dataset, a scratch folder,
the device budget) that returns a `Row`: its figures, the expectation it is held to and a verdict
("pass", "fail", "info" where nothing is expected, or "skipped: why"). Without CUDA the checks
that need it (pinned copies, the side stream, CUDA memory against the plan, a real CUDA
out-of-memory error, flash-attention) are skipped and named in one line; the others run on the
CPU: the prefetcher's rate and data wait, plan vs real memory through torch's MemTracker (as
`bench plan` does), a bf16 step under CPU autocast, the trainer's backoff from an injected
out-of-memory error, packed rows equal to unpacked ones under SDPA. Models are built from
configs with random weights, short rows and few steps; the ~0.5B and ~1B configs only on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import io
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench import plan_check
from bench.config import GpuCheckConfig, ThroughputConfig
from bench.corpus import build_sample_dataset
from bench.device_stages import prefetcher_case, run_h2d_stage, train_steps
from bench.measure import measure
from bench.memory_cases import prefetch_steps_case
from lowmem_core.errors import ConfigError, require_extra
from lowmem_core.memory import format_bytes

COMMAND = "python -m bench gpu --json bench_gpu.json"
PEAK_TOLERANCE = plan_check.PEAK_TOLERANCE  # real step peak within 10% of the planned one
DATA_WAIT_TARGET_FRAC = 0.05  # of step time, behind a 20 ms synthetic step
SYNTHETIC_STEP_S = 0.020
BF16_LOSS_TOLERANCE = 0.02  # relative, bf16 autocast loss vs fp32 on the same batch
PACKED_TOLERANCE_FP32 = 1e-4  # relative, summed loss of a packed row vs its documents alone
PACKED_TOLERANCE_BF16 = 2e-2  # flash-attention computes in bf16
PREFETCH_VS_HOST_TARGET = 0.8  # the prefetcher's rate with side-stream copies vs without
DOC_LENGTHS = (37, 91, 20, 60)  # documents packed into one row by the packing checks

# Llama-style shapes of the configs checked on CUDA (random weights).
LLAMA_05B = dict(
    vocab_size=32000,
    hidden_size=1536,
    intermediate_size=4096,
    num_hidden_layers=16,
    num_attention_heads=12,
    num_key_value_heads=4,
)  # about 0.50B parameters
LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
)  # about 1.1B parameters (TinyLlama's shape)
LLAMA_SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)  # the CPU stand-in and the packing checks' model


@dataclass(frozen=True)
class Row:
    """One line of the report."""

    name: str
    figures: dict[str, Any]
    expectation: str
    verdict: str  # "pass", "fail", "info" or "skipped: why"
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Context:
    """What every check gets."""

    device: torch.device
    data_path: Path
    work_dir: Path
    budget_bytes: int | None = None  # --device_budget; None: the whole device

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Context], Row]
    needs_cuda: bool = False


# ----------------------------------------------------------------------------- verdicts


def verdict(ok: bool) -> str:
    return "pass" if ok else "fail"


def h2d_verdict(pageable_bytes_per_s: float, pinned_bytes_per_s: float) -> str:
    """Pinned copies must be at least as fast as pageable ones, or pinning buys nothing."""
    return verdict(pinned_bytes_per_s >= pageable_bytes_per_s)


def at_least_verdict(value: float, target: float) -> str:
    return verdict(value >= target)


def at_most_verdict(value: float, target: float) -> str:
    return verdict(value <= target)


def relative_miss(value: float, reference: float) -> float:
    """|value / reference - 1|; infinite where the reference is zero or either is not finite."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return math.inf
    return abs(value / reference - 1.0)


def plan_verdict(
    planned_bytes: int,
    real_bytes: int,
    planned_device_bytes: int | None = None,
    reserved_bytes: int | None = None,
) -> str:
    """The real step peak within PEAK_TOLERANCE of the planned one, and (on CUDA) what the
    allocator reserved within the plan's whole device line (which adds the CUDA reserve)."""
    ok = relative_miss(planned_bytes, real_bytes) <= PEAK_TOLERANCE
    if planned_device_bytes is not None and reserved_bytes is not None:
        ok = ok and reserved_bytes <= planned_device_bytes
    return verdict(ok)


def backoff_verdict(
    before: tuple[int, int], after: tuple[int, int], global_batch_kept: bool
) -> str:
    """(micro-batch, accumulation) before and after: halved and doubled, global batch kept."""
    (micro, accum), (new_micro, new_accum) = before, after
    return verdict(
        global_batch_kept and new_micro == micro // 2 and new_accum == accum * 2 and micro >= 2
    )


# ----------------------------------------------------------------------------- data path


def _throughput_config() -> ThroughputConfig:
    # One batch of 32 x 512 tokens, 3 windows of 0.5 s: about 5 s per measured case.
    return ThroughputConfig(seconds=0.5, warmup_seconds=0.3, repeats=3, readers=(2,))


@cache
def _h2d_stage(data_path: Path, device_index: int) -> dict[str, Any]:
    """`bench throughput`'s H2D stage, measured once for the two rows that read it."""
    bar = tqdm(disable=True)
    with torch.cuda.device(device_index):
        results, checks = run_h2d_stage(data_path, _throughput_config(), bar)
    return {"results": {r.name: r for r in results}, "check": checks[0]}


def check_h2d(ctx: Context) -> Row:
    results = _h2d_stage(ctx.data_path, ctx.device.index or 0)["results"]
    pageable = results["h2d pageable"].extra["bytes_per_s"]
    pinned = results["h2d pinned"].extra["bytes_per_s"]
    return Row(
        "H2D pinned vs pageable",
        {
            "pageable_gb_per_s": pageable / 1e9,
            "pinned_gb_per_s": pinned / 1e9,
            "pinned_vs_pageable": pinned / pageable,
        },
        "pinned >= pageable (one 32 x 512 batch's bytes)",
        h2d_verdict(pageable, pinned),
    )


def check_prefetcher_rate(ctx: Context) -> Row:
    """The rate at which the Prefetcher fills host batches, and on CUDA the rate with its
    side-stream copies, held to the host rate (the copy must not slow the data path); its ratio
    to a plain pinned copy is shown too (filling, not copying, bounds it)."""
    cfg = _throughput_config()
    batch_bytes = 3 * cfg.batch_size * cfg.seq_len * 8  # input_ids, labels, position_ids
    case = prefetcher_case(ctx.data_path, cfg, None, "prefetcher (host)")
    host = measure([case], cfg)[case.name]
    figures = {
        "host_batches_per_s": host.batches_per_s,
        "host_gb_per_s": host.batches_per_s * batch_bytes / 1e9,
    }
    if not ctx.cuda:
        return Row("prefetcher rate", figures, "info (host batches, nothing to copy)", "info")
    stage = _h2d_stage(ctx.data_path, ctx.device.index or 0)
    to_gpu, vs_pinned = stage["results"]["prefetcher to GPU"], stage["check"]
    ratio = to_gpu.batches_per_s / host.batches_per_s
    figures.update(
        gpu_batches_per_s=to_gpu.batches_per_s,
        gpu_gb_per_s=to_gpu.extra["bytes_per_s"] / 1e9,
        gpu_vs_host=ratio,
        gpu_vs_pinned_h2d=vs_pinned.value,
    )
    expectation = f"prefetcher to GPU >= {PREFETCH_VS_HOST_TARGET:g}x its host-only rate"
    return Row(
        "prefetcher rate", figures, expectation, at_least_verdict(ratio, PREFETCH_VS_HOST_TARGET)
    )


def _gpu_step_fn(device: torch.device, step_s: float) -> Callable[[torch.Tensor], None]:
    """A synthetic GPU step of about `step_s`: bf16 matmuls, calibrated once, that read the
    batch (so the step depends on its copy)."""
    a = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize(device)
    matmuls = max(1, round(step_s / ((time.perf_counter() - started) / 20)))

    def step(input_ids: torch.Tensor) -> None:
        x = a + input_ids[0, 0].to(a.dtype)
        for _ in range(matmuls):
            x = x @ a
        torch.cuda.synchronize(device)

    return step


def data_wait_on_cuda(data_path: Path, device: torch.device, steps: int, step_s: float) -> dict:
    """The consumer's data wait behind a synthetic GPU step, batches copied by the Prefetcher."""
    from pipeline import Loader, Prefetcher, open_dataset

    cfg = _throughput_config()
    step = _gpu_step_fn(device, step_s)
    waits_s, step_times_s = [], []
    with open_dataset(data_path) as ds:
        loader = Loader(ds, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=0, packing=True)
        prefetcher = Prefetcher(loader, device=device, depth=2, num_readers=max(cfg.readers))
        batches = _endless(prefetcher)
        for _ in range(steps):
            started = time.perf_counter()
            batch = next(batches)
            waits_s.append(prefetcher.last_wait_s)
            step(batch["input_ids"])
            step_times_s.append(time.perf_counter() - started)
        batches.close()
        prefetcher.close()
    # The first batch's wait is the pool filling from empty: start-up, not steady state.
    return {"data_wait_frac": sum(waits_s[1:]) / sum(step_times_s[1:]), "steps": steps}


def _endless(feed) -> Iterator:
    while True:
        yield from feed


def check_data_wait(ctx: Context) -> Row:
    steps = 60
    if ctx.cuda:
        out = data_wait_on_cuda(ctx.data_path, ctx.device, steps, SYNTHETIC_STEP_S)
        where = "GPU matmul step"
    else:
        cfg = _throughput_config()
        out = prefetch_steps_case(
            str(ctx.data_path), 2, steps, cfg.batch_size, cfg.seq_len, 0, SYNTHETIC_STEP_S
        )
        where = "host sleep (GIL released)"
    frac = out["data_wait_frac"]
    return Row(
        "data wait behind a synthetic step",
        {"data_wait_pct": 100 * frac, "step_ms": 1000 * SYNTHETIC_STEP_S, "steps": steps},
        f"<= {DATA_WAIT_TARGET_FRAC:.0%} of a {SYNTHETIC_STEP_S * 1000:g} ms {where}",
        at_most_verdict(frac, DATA_WAIT_TARGET_FRAC),
    )


# ----------------------------------------------------------------------------- plan vs real


def _llama_folder(ctx: Context, name: str, shape: dict, weights: bool) -> Path:
    """A Llama config (and random bf16 weights where asked) saved as a model folder."""
    transformers = require_extra("transformers", "hf", "Hugging Face models")
    folder = ctx.work_dir / name
    if (folder / "config.json").is_file():
        return folder
    config = transformers.LlamaConfig(
        **shape, max_position_embeddings=2048, tie_word_embeddings=False
    )
    if not weights:
        config.save_pretrained(folder)
        return folder
    torch.manual_seed(0)
    with torch.device(ctx.device):  # initialising 1B weights is much faster on the GPU
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    _release(ctx)
    return folder


def _plan_job(ctx: Context, flags: list[str], micro: int, seq_len: int):
    """The job and plan `train_low_mem.py plan FLAGS` makes at this micro-batch on this device."""
    from trainer_low_mem.cli import parse_plan_config
    from trainer_low_mem.job import build_job
    from trainer_low_mem.launch import Launch

    budget = ["--device_budget", str(ctx.budget_bytes)] if ctx.budget_bytes else []
    cfg = parse_plan_config(
        [
            *flags,
            *budget,
            "--max_seq_len",
            str(seq_len),
            "--auto_plan=False",
            "--batch_size_per_gpu",
            str(micro),
            "--gradient_accumulation_steps",
            "1",
        ]
    )
    job = build_job(cfg, Launch.from_flags(cfg.launch, cfg.training.mixed_precision))
    return job, job.plan(device=ctx.device.type)


def _batch(vocab_size: int, micro: int, seq_len: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (micro, seq_len), generator=g)
    positions = torch.arange(seq_len).repeat(micro, 1)
    return {
        "input_ids": ids.to(device),
        "labels": ids.to(device),
        "position_ids": positions.to(device),
    }


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )


def real_steps(job, micro: int, seq_len: int, device: torch.device) -> dict:
    """2 + 2 real optimizer steps of the job's model at `micro`: their losses, the median step
    time, and on CUDA the peak allocated and reserved bytes."""
    torch.manual_seed(0)
    model = job.build_model().to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = _batch(job.vocab_size, micro, seq_len, device)
    losses: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with _autocast(device, job.config.training.mixed_precision):
        timing = train_steps(_LossRecorder(model, losses), optimizer, lambda: batch, device, 2)
    out = {"losses": losses, "median_step_s": statistics.median(timing["step_times_s"])}
    if device.type == "cuda":
        out["allocated"] = torch.cuda.max_memory_allocated(device)
        out["reserved"] = torch.cuda.max_memory_reserved(device)
    del model, optimizer
    return out


def plan_vs_real(
    ctx: Context, model: str, flags: list[str], micro: int, seq_len: int, memtracker: bool = True
) -> Row:
    """The plan's step peak at `micro` (model states and step transients, plus the traced
    activation bytes per token) against the real one: CUDA's allocator peak, or on the CPU
    MemTracker's count of the same tensors. `memtracker=False`: on the CPU, only the real steps
    run (their losses and time; an "info" row)."""
    job, plan = _plan_job(ctx, flags, micro, seq_len)
    fp = plan.footprint
    planned = fp.model_device_bytes + micro * seq_len * fp.activation_bytes_per_token
    name = f"plan vs real: {model}"
    figures: dict[str, Any] = {
        "model": model,
        "micro_batch": micro,
        "seq_len": seq_len,
        "estimate": fp.source,
        "planned_peak_mib": planned / 2**20,
    }
    expectation = f"real peak within {PEAK_TOLERANCE:.0%} of planned"
    if ctx.cuda:
        real = real_steps(job, micro, seq_len, ctx.device)
        _release(ctx)
        figures.update(
            max_allocated_mib=real["allocated"] / 2**20,
            max_reserved_mib=real["reserved"] / 2**20,
            planned_device_mib=plan.device_peak_bytes_planned / 2**20,
            ratio=planned / real["allocated"],
            median_step_s=real["median_step_s"],
        )
        expectation = (
            f"max_memory_allocated within {PEAK_TOLERANCE:.0%} of planned; max_memory_reserved "
            "<= the plan's device peak"
        )
        result = plan_verdict(
            planned, real["allocated"], plan.device_peak_bytes_planned, real["reserved"]
        )
        return Row(name, figures, expectation, result)
    if not memtracker:
        real = real_steps(job, micro, seq_len, ctx.device)
        figures.update(step_losses=real["losses"], median_step_s=real["median_step_s"])
        finite = all(math.isfinite(x) for x in real["losses"])
        return Row(
            name,
            figures,
            "info (steps run, losses finite; memory on CUDA)",
            ("info" if finite else "fail"),
        )
    case = plan_check.Case(
        name,
        job.build_model,
        job.vocab_size,
        seq_len,
        (micro,),
        job.config.training.mixed_precision,
    )
    real_bytes = plan_check.real_peak_bytes(case, micro)
    figures.update(memtracker_peak_mib=real_bytes / 2**20, ratio=planned / real_bytes)
    return Row(name, figures, expectation + " (MemTracker, CPU)", plan_verdict(planned, real_bytes))


def check_plan_preset(ctx: Context) -> Row:
    preset = "small" if ctx.cuda else "tiny"
    return plan_vs_real(
        ctx,
        f"preset {preset}",
        ["--model_preset", preset, "--mixed_precision", "no"],
        micro=4,
        seq_len=512 if ctx.cuda else 256,
    )


def check_plan_05b(ctx: Context) -> Row:
    folder = _llama_folder(ctx, "llama-0.5b", LLAMA_05B, weights=False)
    flags = ["--model", str(folder), "--from_scratch", "--mixed_precision", "no"]
    return plan_vs_real(ctx, "Llama ~0.5B", flags, micro=2, seq_len=512)


def check_plan_qlora(ctx: Context) -> Row:
    """QLoRA through the trainer's public path (--load_in_4bit with LoRA): the ~1B config on
    CUDA, the small one on the CPU; skipped with the trainer's reason where it cannot load.
    On the CPU the real steps run without MemTracker, which cannot follow bitsandbytes' 4-bit
    weights (it hooks every parameter, and re-registering them as buffers loses their
    quantisation state)."""
    model = "Llama ~1.1B, 4-bit, LoRA 16" if ctx.cuda else "small Llama, 4-bit, LoRA 16"
    shape = LLAMA_1B if ctx.cuda else LLAMA_SMALL
    folder = _llama_folder(ctx, "llama-qlora", shape, weights=True)
    flags = [
        "--model",
        str(folder),
        "--load_in_4bit",
        "--lora_rank",
        "16",
        "--mixed_precision",
        "bf16",
    ]
    try:
        return plan_vs_real(
            ctx, model, flags, micro=2, seq_len=512 if ctx.cuda else 128, memtracker=False
        )
    except ConfigError as exc:
        return Row(model, {"model": model}, "4-bit loading through the trainer", f"skipped: {exc}")


# ----------------------------------------------------------------------------- precision, OOM


def check_bf16_step(ctx: Context) -> Row:
    """bf16 autocast optimizer steps of the built-in model on one batch: the losses stay finite
    and fall, and at the trained weights the bf16 loss is within BF16_LOSS_TOLERANCE of fp32
    (compared after training: at initialisation the logits are near zero and any precision
    gives ln(vocabulary))."""
    from trainer_low_mem.model import build_model

    preset, micro, seq_len = ("small", 8, 512) if ctx.cuda else ("tiny", 4, 128)
    torch.manual_seed(0)
    model = build_model(preset).to(ctx.device)
    batch = _batch(model.preset.vocab_size, micro, seq_len, ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses: list[float] = []
    with _autocast(ctx.device, "bf16"):
        timing = train_steps(_LossRecorder(model, losses), optimizer, lambda: batch, ctx.device, 6)
    with torch.no_grad():
        loss_fp32 = float(model(**batch).loss)
        with _autocast(ctx.device, "bf16"):
            loss_bf16 = float(model(**batch).loss)
    miss = relative_miss(loss_bf16, loss_fp32)
    finite = all(math.isfinite(x) for x in losses)
    del model, optimizer
    _release(ctx)
    return Row(
        "bf16 step",
        {
            "preset": preset,
            "step_losses": losses,
            "loss_fp32": loss_fp32,
            "loss_bf16": loss_bf16,
            "relative_diff": miss,
            "median_step_s": statistics.median(timing["step_times_s"]),
        },
        f"losses finite and falling; bf16 loss within {BF16_LOSS_TOLERANCE:.0%} of fp32 after",
        verdict(finite and losses[-1] < losses[0] and miss <= BF16_LOSS_TOLERANCE),
    )


class _LossRecorder(torch.nn.Module):
    """The model, recording each forward's loss."""

    def __init__(self, model: torch.nn.Module, losses: list[float]):
        super().__init__()
        self.model, self.losses = model, losses

    def forward(self, **batch):
        out = self.model(**batch)
        self.losses.append(float(out.loss.detach()))
        return out


def check_forced_oom(ctx: Context) -> Row:
    """A real CUDA out-of-memory error (one allocation past the budget) caught by the trainer's
    `attempt`, with the allocator back where it was."""
    from trainer_low_mem import oom

    total = torch.cuda.get_device_properties(ctx.device).total_memory
    limit = ctx.budget_bytes or total
    before = torch.cuda.memory_allocated(ctx.device)
    request = limit + 2**30
    result, reason = oom.attempt(lambda: torch.empty(request, dtype=torch.uint8, device=ctx.device))
    del result
    after = torch.cuda.memory_allocated(ctx.device)
    return Row(
        "forced CUDA OOM",
        {
            "requested": format_bytes(request),
            "error": reason,
            "allocated_delta_bytes": after - before,
        },
        "torch.cuda.OutOfMemoryError caught by oom.attempt; allocated bytes unchanged after",
        verdict(reason is not None and after == before),
    )


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def check_oom_backoff(ctx: Context) -> Row:
    """The trainer's backoff: an out-of-memory error injected at step 2 (the trainer's own hook,
    LOWMEM_INJECT_OOM_AT_STEP) halves the micro-batch, doubles the accumulation and the run
    finishes its steps."""
    from trainer_low_mem import loop, oom
    from trainer_low_mem.cli import parse_job_config

    micro, accum, steps = 4, 1, 3
    config = parse_job_config(
        [
            "--data", str(ctx.data_path),
            "--output_dir", str(ctx.work_dir / "oom-backoff"),
            "--model_preset", "tiny",
            "--max_seq_len", "64",
            "--auto_plan=False",
            "--batch_size_per_gpu", str(micro),
            "--gradient_accumulation_steps", str(accum),
            "--max_steps", str(steps),
            "--save_every", "0",
            "--progress_bar=False",
            "--num_readers", "1",
        ]
    )  # fmt: skip
    # The trainer's plan table and step lines would bury the report: kept out of it.
    with _env(oom.INJECT_OOM_ENV, "2"), contextlib.redirect_stdout(io.StringIO()):
        result = loop.train(config)
    after = (result.plan["micro_batch_per_rank"], result.plan["grad_accum_steps"])
    kept = result.plan["global_batch"] == micro * accum and result.final_step == steps
    return Row(
        "OOM backoff (trainer)",
        {
            "backoffs": result.backoffs,
            "micro_batch": f"{micro} -> {after[0]}",
            "accumulation": f"{accum} -> {after[1]}",
            "final_step": result.final_step,
        },
        "one backoff: micro-batch halved, accumulation doubled, global batch kept, all steps run",
        backoff_verdict((micro, accum), after, kept and len(result.backoffs) == 1),
    )


# ----------------------------------------------------------------------------- packed rows


def _docs(vocab_size: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, vocab_size, (n,), generator=g) for n in DOC_LENGTHS]


def packed_and_unpacked_loss(model, vocab_size: int, device: torch.device) -> tuple[float, float]:
    """Summed loss of the documents packed in a row (document masking by position ids) and of
    each document alone; labels never ask one document to predict the next. The packed batch
    holds the row twice: a batch of several rows is what the trainer gives, and what
    flash-attention sees as one sequence per row unless the rows are flattened."""
    docs = [d.to(device) for d in _docs(vocab_size)]
    ids = torch.cat(docs)[None].repeat(2, 1)
    positions = torch.cat([torch.arange(len(d), device=device) for d in docs])[None].repeat(2, 1)
    labels = ids.clone()
    starts = torch.tensor([0, *DOC_LENGTHS[:-1]]).cumsum(0)
    labels[:, starts.to(device)] = -100
    with torch.no_grad():
        packed = model(ids, position_ids=positions, labels=labels)
        alone = [model(d[None], labels=d[None]) for d in docs]
    total_packed = float(packed.loss * packed.n_loss_tokens) / 2
    total_alone = float(sum(o.loss * o.n_loss_tokens for o in alone))
    return total_packed, total_alone


def _packing_row(name: str, packed: float, alone: float, tolerance: float, note: str) -> Row:
    miss = relative_miss(packed, alone)
    return Row(
        name,
        {"packed_loss_sum": packed, "unpacked_loss_sum": alone, "relative_diff": miss},
        f"relative diff <= {tolerance:g} ({note})",
        verdict(miss <= tolerance),
    )


def check_packed_builtin(ctx: Context) -> Row:
    from trainer_low_mem.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny", document_masking=True).to(ctx.device).eval()
    packed, alone = packed_and_unpacked_loss(model, model.preset.vocab_size, ctx.device)
    return _packing_row(
        "packed == unpacked: built-in, SDPA", packed, alone, PACKED_TOLERANCE_FP32, "fp32"
    )


def _hf_llama(ctx: Context, attention: str, dtype: torch.dtype = torch.float32):
    from trainer_low_mem.hf_model import load_model_folder

    folder = _llama_folder(ctx, "llama-small", LLAMA_SMALL, weights=True)
    model = load_model_folder(folder, document_masking=True).to(ctx.device, dtype).eval()
    model.hf_model.set_attn_implementation(attention)
    return model


def check_packed_hf_sdpa(ctx: Context) -> Row:
    model = _hf_llama(ctx, "sdpa")
    packed, alone = packed_and_unpacked_loss(model, LLAMA_SMALL["vocab_size"], ctx.device)
    return _packing_row(
        "packed == unpacked: HF Llama, SDPA", packed, alone, PACKED_TOLERANCE_FP32, "fp32"
    )


def check_packed_hf_flash(ctx: Context) -> Row:
    name = "packed == unpacked: HF Llama, flash-attention"
    if importlib.util.find_spec("flash_attn") is None:
        return Row(name, {}, "flash-attn installed", "skipped: flash-attn is not installed")
    model = _hf_llama(ctx, "flash_attention_2", torch.bfloat16)  # flash kernels take bf16
    packed, alone = packed_and_unpacked_loss(model, LLAMA_SMALL["vocab_size"], ctx.device)
    return _packing_row(name, packed, alone, PACKED_TOLERANCE_BF16, "bf16 weights")


CHECKS = (
    Check("H2D pinned vs pageable", check_h2d, needs_cuda=True),
    Check("prefetcher rate", check_prefetcher_rate),
    Check("data wait behind a synthetic step", check_data_wait),
    Check("plan vs real: built-in preset", check_plan_preset),
    Check("plan vs real: ~0.5B Llama", check_plan_05b, needs_cuda=True),
    Check("plan vs real: QLoRA Llama", check_plan_qlora),
    Check("bf16 step", check_bf16_step),
    Check("forced CUDA OOM", check_forced_oom, needs_cuda=True),
    Check("OOM backoff (trainer)", check_oom_backoff),
    Check("packed == unpacked: built-in, SDPA", check_packed_builtin),
    Check("packed == unpacked: HF Llama, SDPA", check_packed_hf_sdpa),
    Check("packed == unpacked: HF Llama, flash-attention", check_packed_hf_flash, needs_cuda=True),
)


# ----------------------------------------------------------------------------- running


def _release(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def run_check(check: Check, ctx: Context) -> Row:
    """One check, timed; an exception is its failure (the other checks still run)."""
    if check.needs_cuda and not ctx.cuda:
        return Row(check.name, {}, "", "skipped: needs CUDA")
    started = time.perf_counter()
    try:
        row = check.run(ctx)
    except Exception as exc:  # noqa: BLE001 (one broken check must not hide the others' rows)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        row = Row(check.name, {"error": f"{type(exc).__name__}: {first}"}, "", "fail")
    _release(ctx)
    return dataclasses.replace(row, name=check.name, seconds=time.perf_counter() - started)


def skip_line(rows: list[Row]) -> str | None:
    """One line naming the checks skipped for want of CUDA, or None."""
    skipped = [r.name for r in rows if r.verdict == "skipped: needs CUDA"]
    if not skipped:
        return None
    return f"no CUDA device: skipped {len(skipped)} checks that need one: {', '.join(skipped)}"


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_figure(v) for v in value) + "]"
    return str(value)


def table(rows: list[Row]) -> str:
    """A Markdown table (readable as plain text): one line per check."""
    lines = ["| check | figures | expectation | verdict | s |", "|---|---|---|---|---|"]
    for r in rows:
        figures = ", ".join(f"{k} {_figure(v)}" for k, v in r.figures.items()) or "-"
        lines.append(
            f"| {r.name} | {figures} | {r.expectation or '-'} | {r.verdict} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def _set_device_budget(device: torch.device, budget_bytes: int | None) -> dict:
    """Cap this process's CUDA memory at the budget (a smaller card's), and say what was set."""
    if device.type != "cuda":
        return {"device_budget_bytes": budget_bytes, "applied": False}
    total = torch.cuda.get_device_properties(device).total_memory
    if budget_bytes is None:
        return {"device_budget_bytes": None, "device_total_bytes": total}
    if budget_bytes > total:
        raise ConfigError(
            f"--device_budget {format_bytes(budget_bytes)} exceeds this GPU's "
            f"{format_bytes(total)}; give a smaller budget or none"
        )
    torch.cuda.set_per_process_memory_fraction(budget_bytes / total, device)
    return {"device_budget_bytes": budget_bytes, "device_total_bytes": total, "applied": True}


def run_gpu_check(cfg: GpuCheckConfig, checks: tuple[Check, ...] = CHECKS) -> int:
    """Run every check, print the table, write JSON; 1 when a check failed."""
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    budget = _set_device_budget(device, cfg.device_budget_bytes)
    data_path = build_sample_dataset(cfg.cache_dir / "sample")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work:
        ctx = Context(device, data_path, Path(work), cfg.device_budget_bytes)
        for check in checks:
            row = run_check(check, ctx)
            rows.append(row)
            if not row.verdict.startswith("skipped: needs CUDA"):
                print(f"  {row.name}: {row.verdict} ({row.seconds:.1f} s)", flush=True)
    skipped = skip_line(rows)
    if skipped:
        print(skipped)
    print(table(rows))
    failed = [r.name for r in rows if r.verdict == "fail"]
    print(f"{len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    if cfg.json_path is not None:
        doc = {
            "command": COMMAND,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__,
            "machine": platform.platform(),
            "budget": budget,
            "skipped": skipped,
            "rows": [r.to_dict() for r in rows],
            "failed": failed,
            "seconds": time.perf_counter() - started,
        }
        cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {cfg.json_path}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 1 if failed else 0
