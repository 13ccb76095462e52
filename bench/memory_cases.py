"""The memory stage: private-memory (USS) growth of the data path, each case in a fresh process.

USS counts pages only this process maps, which includes *clean file pages* of a memory-mapped
dataset that no other process maps: they are page cache, reclaimable, not a leak. So every
reading also carries the private dirty part (heap, buffers, thread stacks: written memory) and
PSS, and the report shows them apart. Each case runs in its own spawned interpreter so that
what one case leaves in the allocator does not count against the next; growth is measured from a
baseline taken after the dataset is open and the first batch (numba compilation, first buffers)
is done.

Cases and their targets:
- `ultra_read_all`: read a large corpus end to end in ultra_low_mem mode (USS growth <= 32 MB).
- `mmap_readers`: a fixed number of batches in mmap mode with k reader threads (4 vs 1: <= 16 MB).
- `prefetch_readers`: the same through the Prefetcher with k readers (<= 16 MB per extra reader).
- `prefetch_wait`: data-wait fraction of the CPU Prefetcher behind a consumer that spends a fixed
  time per step with the GIL released, as a GPU step does (target < 1% at 1 reader).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from lowmem_core.format import IGNORE_INDEX

_SAMPLE_INTERVAL_S = 0.05


@dataclass(frozen=True)
class MemoryReading:
    """One process's (and optionally its children's) memory, in bytes."""

    uss_bytes: int  # private = private_dirty + private_clean
    pss_bytes: int  # proportional share of every mapped page
    dirty_bytes: int  # Private_Dirty: written private pages (heap, buffers); what stays until freed
    rss_bytes: int


def _private_dirty_bytes(pid: int) -> int:
    # smaps_rollup is one cheap read. Private_Dirty separates written private memory from the
    # clean file pages in USS (page cache of mapped files, reclaimable). "Anonymous" would not do:
    # it also counts copy-on-write pages a forked worker still shares with its parent.
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Private_Dirty:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def read_memory(include_children: bool = True) -> MemoryReading:
    """USS/PSS/RSS (lowmem_core.memory) plus private dirty bytes of this process and, if asked, its
    children."""
    from lowmem_core.memory import process_memory

    totals = process_memory(include_children=include_children)
    me = psutil.Process()
    pids = [me.pid] + ([p.pid for p in me.children(recursive=True)] if include_children else [])
    dirty = sum(_private_dirty_bytes(pid) for pid in pids)
    return MemoryReading(totals.uss_bytes, totals.pss_bytes, dirty, totals.rss_bytes)


class PeakMemory:
    """Samples `read_memory` on a background thread; `stop()` returns the peak of each field."""

    def __init__(self, interval_s: float = _SAMPLE_INTERVAL_S, include_children: bool = True):
        self.interval_s = interval_s
        self.include_children = include_children
        self.start_reading = read_memory(include_children)
        self._peak = dict(vars(self.start_reading))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory-sampler", daemon=True)
        self._thread.start()

    def _take(self) -> None:
        reading = read_memory(self.include_children)
        for key, value in vars(reading).items():
            self._peak[key] = max(self._peak[key], value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def stop(self) -> MemoryReading:
        self._stop.set()
        self._thread.join()
        self._take()
        return MemoryReading(**self._peak)


def useful_tokens(batch) -> int:
    """Tokens of `batch` whose label is not -100 (padding is work, not progress)."""
    labels = batch["labels"]
    if labels.device.type != "cpu":
        return int((labels != IGNORE_INDEX).sum())
    # Runs once per batch in every case: numpy counts a [B, L] batch about 4x faster than torch,
    # which keeps the measurement's own cost small next to the fastest loaders.
    return labels.numel() - int(np.count_nonzero(labels.numpy() == IGNORE_INDEX))


def _growth(peak: MemoryReading, base: MemoryReading, end: MemoryReading) -> dict:
    return {
        "base_uss_bytes": base.uss_bytes,
        "peak_uss_bytes": peak.uss_bytes,
        "peak_pss_bytes": peak.pss_bytes,
        "uss_growth_bytes": peak.uss_bytes - base.uss_bytes,
        "end_uss_growth_bytes": end.uss_bytes - base.uss_bytes,
        "dirty_growth_bytes": peak.dirty_bytes - base.dirty_bytes,
        "pss_growth_bytes": peak.pss_bytes - base.pss_bytes,
    }


# ----------------------------------------------------------------------------- cases (child side)


def read_all_case(path: str, ultra_low_mem: bool, batch_size: int, seq_len: int, seed: int) -> dict:
    """Read every batch of one epoch; USS growth from after open + first batch to the end."""
    from pipeline import Loader, open_dataset

    ds = open_dataset(path, ultra_low_mem=ultra_low_mem)
    loader = Loader(ds, batch_size=batch_size, seq_len=seq_len, seed=seed, packing=True)
    batches = iter(loader)
    tokens = useful_tokens(next(batches))
    base = read_memory(include_children=False)
    sampler = PeakMemory(include_children=False)
    started = time.perf_counter()
    steps = 1
    for batch in batches:
        tokens += useful_tokens(batch)
        steps += 1
    seconds = time.perf_counter() - started
    end = read_memory(include_children=False)
    peak = sampler.stop()
    return {
        "tokens": tokens,
        "steps": steps,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "dataset_token_bytes": ds.token_bytes,
        **_growth(peak, base, end),
    }


def loader_steps_case(
    path: str, num_readers: int, steps: int, batch_size: int, seq_len: int, seed: int
) -> dict:
    """`steps` batches in mmap mode with `num_readers` reader threads (the Loader alone for one,
    the Prefetcher's host-buffer readers for more)."""
    from pipeline import Loader, Prefetcher, open_dataset

    ds = open_dataset(path, ultra_low_mem=False)
    loader = Loader(ds, batch_size=batch_size, seq_len=seq_len, seed=seed, packing=True)
    feed = (
        loader
        if num_readers == 1
        else Prefetcher(loader, depth=num_readers, num_readers=num_readers)
    )
    batches = iter(feed)
    next(batches)
    base = read_memory(include_children=False)
    sampler = PeakMemory(include_children=False)
    started = time.perf_counter()
    for _ in range(steps - 1):
        next(batches)
    seconds = time.perf_counter() - started
    batches.close()
    end = read_memory(include_children=False)
    peak = sampler.stop()
    return {"steps": steps, "seconds": seconds, **_growth(peak, base, end)}


def prefetch_steps_case(
    path: str,
    num_readers: int,
    steps: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    consumer_step_s: float,
) -> dict:
    """`steps` batches through the CPU Prefetcher; USS growth it adds, and the consumer's data wait.

    The consumer sleeps `consumer_step_s` per step (GIL released, like a host thread waiting on a
    GPU step). The first batch's wait (the pipeline filling from empty) is start-up, reported
    apart, and not part of `data_wait_frac`.
    """
    from pipeline import Loader, Prefetcher, open_dataset

    ds = open_dataset(path, ultra_low_mem=False)
    # One batch through a throwaway loader compiles the kernels before the baseline is taken.
    next(iter(Loader(ds, batch_size=batch_size, seq_len=seq_len, seed=seed, packing=True)))
    loader = Loader(ds, batch_size=batch_size, seq_len=seq_len, seed=seed, packing=True)
    # Build the epoch index (O(documents) bytes) now: it belongs to the loader, not the prefetcher.
    len(loader)
    base = read_memory(include_children=False)
    sampler = PeakMemory(include_children=False)
    prefetcher = Prefetcher(loader, device=None, depth=2, num_readers=num_readers)
    batches = iter(prefetcher)
    waits_s, step_times_s = [], []
    for _ in range(steps):
        step_started = time.perf_counter()
        next(batches)
        waits_s.append(prefetcher.last_wait_s)
        time.sleep(consumer_step_s)
        step_times_s.append(time.perf_counter() - step_started)
    batches.close()
    prefetcher.close()
    end = read_memory(include_children=False)
    peak = sampler.stop()
    steady_wait_s, steady_step_s = sum(waits_s[1:]), sum(step_times_s[1:])
    return {
        "steps": steps,
        "first_wait_s": waits_s[0],
        "data_wait_frac": steady_wait_s / steady_step_s,
        "mean_step_s": steady_step_s / (steps - 1),
        **_growth(peak, base, end),
    }


def run_isolated(fn: Callable[..., dict], *args) -> dict:
    """Run `fn(*args)` in a freshly spawned interpreter and return its result."""
    with ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        return pool.submit(fn, *args).result()


# ----------------------------------------------------------------------------- stage (parent side)


@dataclass(frozen=True)
class MemoryCase:
    name: str
    fn: Callable[..., dict]
    args: tuple


def memory_cases(large_corpus: Path, cfg) -> list[MemoryCase]:
    """The memory stage's cases for `cfg` (a ThroughputConfig), in the order they run."""
    B, L, seed, steps = cfg.batch_size, cfg.seq_len, cfg.seed, cfg.memory_steps
    path = str(large_corpus)
    cases = [MemoryCase("ultra_low_mem read-all", read_all_case, (path, True, B, L, seed))]
    if not cfg.quick:
        # The same read in mmap mode shows the page-cache effect: USS grows by the file pages read.
        cases.append(MemoryCase("mmap read-all", read_all_case, (path, False, B, L, seed)))
    for k in sorted({1, 4, max(cfg.readers)}):
        cases.append(
            MemoryCase(f"mmap {k} reader(s)", loader_steps_case, (path, k, steps, B, L, seed))
        )
    for k in sorted({1, max(2, *cfg.readers)}):
        cases.append(
            MemoryCase(
                f"prefetch {k} reader(s)",
                prefetch_steps_case,
                (path, k, steps, B, L, seed, cfg.consumer_step_ms / 1000.0),
            )
        )
    return cases
