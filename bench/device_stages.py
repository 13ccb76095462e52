"""The device stages: host-to-device copy rates (pageable, pinned, our prefetcher) on CUDA, and
a real training step of the built-in model fed by our prefetcher vs a plain DataLoader."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from bench import baselines
from bench.config import ThroughputConfig
from bench.measure import Case, CaseResult, Check, Units, close_units, measure
from bench.memory_cases import PeakMemory, useful_tokens


def _copy_rate_bytes_per_s(src: torch.Tensor, dst: torch.Tensor, seconds: float) -> float:
    non_blocking = src.is_pinned()
    for _ in range(3):
        dst.copy_(src, non_blocking=non_blocking)
    torch.cuda.synchronize()
    copies, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(8):
            dst.copy_(src, non_blocking=non_blocking)
        copies += 8
        torch.cuda.synchronize()
    return copies * src.numel() * src.element_size() / (time.perf_counter() - started)


def prefetcher_case(
    path: Path, cfg: ThroughputConfig, device: torch.device | None, name: str
) -> Case:
    """Batches of `path` pulled through our Prefetcher as fast as it fills them: copied to
    `device` on its side stream, or host batches with `device` None."""
    from pipeline import Loader, Prefetcher, open_dataset

    def open_units() -> Units:
        with open_dataset(path) as ds:
            loader = Loader(
                ds, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, packing=True
            )
            prefetcher = Prefetcher(loader, device=device, depth=2, num_readers=max(cfg.readers))
            while True:
                for batch in prefetcher:
                    yield useful_tokens(batch), 1.0

    return Case(name, "h2d", open_units)


def run_h2d_stage(
    path: Path, cfg: ThroughputConfig, bar: tqdm
) -> tuple[list[CaseResult], list[Check]]:
    """Pageable vs pinned host-to-device GB/s for one batch's bytes, and the Prefetcher's rate."""
    device = torch.device("cuda", torch.cuda.current_device())
    batch_bytes = 3 * cfg.batch_size * cfg.seq_len * 8  # input_ids, labels, position_ids as int64
    pageable = torch.empty(batch_bytes, dtype=torch.uint8)
    pinned = torch.empty(batch_bytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(batch_bytes, dtype=torch.uint8, device=device)
    rates = {}
    for name, src in (("h2d pageable", pageable), ("h2d pinned", pinned)):
        samples = [_copy_rate_bytes_per_s(src, target, cfg.seconds) for _ in range(cfg.repeats)]
        rates[name] = statistics.median(samples)
        bar.update(1)

    case = prefetcher_case(path, cfg, device, "prefetcher to GPU")
    result = measure([case], cfg, bar)[case.name]
    torch.cuda.synchronize()
    result.extra["bytes_per_s"] = result.batches_per_s * batch_bytes
    results = [
        CaseResult(name=name, stage="h2d", extra={"bytes_per_s": rate, "gb_per_s": rate / 1e9})
        for name, rate in rates.items()
    ]
    results.append(result)
    checks = [
        Check(
            "prefetcher vs pinned H2D rate",
            result.extra["bytes_per_s"] / rates["h2d pinned"],
            0.8,
            True,
            "x",
        )
    ]
    return results, checks


# ----------------------------------------------------------------------------- step stage


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_steps(
    model, optimizer, next_batch: Callable[[], dict], device: torch.device, steps: int
) -> dict:
    """Run 2 warm-up + `steps` timed steps; a step's wait: until its batch sits on `device`."""
    waits_s, step_times_s, tokens = [], [], 0
    for i in range(2 + steps):
        started = time.perf_counter()
        batch = next_batch()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        waited = time.perf_counter() - started
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            waits_s.append(waited)
            step_times_s.append(time.perf_counter() - started)
            tokens += useful_tokens(batch)
    return {"waits_s": waits_s, "step_times_s": step_times_s, "tokens": tokens}


def run_step_stage(
    path: Path, files: baselines.BaselineFiles, cfg: ThroughputConfig, bar: tqdm
) -> tuple[list[CaseResult], list[Check], list[str]]:
    """The trainer's model step fed by our Prefetcher vs a plain DataLoader over the HF dataset."""
    from pipeline import Loader, Prefetcher, open_dataset
    from trainer_low_mem.model import build_model

    rank, world_size = _distributed()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    batch_size = cfg.step_batch_size or cfg.batch_size
    results, notes = [], []
    with open_dataset(path) as ds:
        vocab_size = ds.vocab_size
        loader = Loader(
            ds,
            batch_size=batch_size,
            seq_len=cfg.seq_len,
            rank=rank,
            world_size=world_size,
            seed=cfg.seed,
            packing=True,
        )
        prefetcher = Prefetcher(
            loader,
            device=device if device.type == "cuda" else None,
            depth=2,
            num_readers=max(cfg.readers),
        )
        hf_loader = baselines.hf_dataloader(
            files,
            batch_size,
            cfg.seq_len,
            num_workers=cfg.workers,
            pin_memory=device.type == "cuda",
            seed=cfg.seed,
        )
        feeds = (
            ("step fed by our prefetcher", prefetcher),
            ("step fed by HF DataLoader", hf_loader),
        )
        for name, feed in feeds:
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.model_preset, vocab_size=vocab_size).to(device)
            if world_size > 1:
                model = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None
                )
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            gc.collect()
            sampler = PeakMemory()
            batches = _endless(feed)
            try:
                timing = train_steps(model, optimizer, batches.__next__, device, cfg.step_count)
            finally:
                close_units(batches)
                peak = sampler.stop()
            total_s = sum(timing["step_times_s"])
            median_step_s = statistics.median(timing["step_times_s"])
            result = CaseResult(
                name=name,
                stage="step",
                tokens_per_s=timing["tokens"] / total_s,
                batches_per_s=len(timing["step_times_s"]) / total_s,
                peak_uss_bytes=peak.uss_bytes,
                peak_pss_bytes=peak.pss_bytes,
                uss_growth_bytes=peak.uss_bytes - sampler.start_reading.uss_bytes,
                data_wait_frac=sum(timing["waits_s"]) / total_s,
                note=f"{cfg.model_preset} model, B={batch_size}, {device.type}",
                extra={
                    "median_step_s": median_step_s,
                    "steps": len(timing["step_times_s"]),
                    "batch_size": batch_size,
                },
            )
            if world_size > 1:
                result.extra.update(_rank_spread(median_step_s, sum(timing["waits_s"]) / total_s))
            results.append(result)
            bar.update(1)
        prefetcher.close()
    if device.type == "cpu":
        notes.append("step stage ran on CPU: step times are CPU compute, not what a GPU would see")
    return results, [], notes


def _endless(feed) -> Iterator[dict]:
    while True:
        yield from feed


def _rank_spread(median_step_s: float, data_wait_frac: float) -> dict:
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (median_step_s, data_wait_frac))
    steps = [g[0] for g in gathered]
    return {
        "per_rank_median_step_s": steps,
        "per_rank_data_wait_frac": [g[1] for g in gathered],
        "rank_step_spread_s": max(steps) - min(steps),
    }
