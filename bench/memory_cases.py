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
- `shared index`: 3 rank processes open a corpus of 10M tiny documents (4-12 tokens) from a cold
  index cache and read 20 batches each; USS growth per rank from before `open_dataset` to after
  the batches (target <= 16 MB, mmap and ultra-low-mem), with PSS and the shared index files;
  and the consumer's wait for the first batch of the next epoch, its index prepared ahead or
  built on demand (`epoch boundary`).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
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
        # The next epoch's index, built ahead near the end: file pages shared by every rank of
        # the node (the planner counts them once per node), not memory that grows with reading.
        "index_mapped_bytes": mapped_private_bytes(".index_cache"),
        **_growth(peak, base, end),
    }


def mapped_private_bytes(path_part: str) -> int:
    """Private (clean + dirty) bytes of this process's mappings of files whose path contains
    `path_part`: what USS counts of them while no other process maps them."""
    total, counting = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=5)
            if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                counting = len(head) == 6 and path_part in head[5]
            elif counting and head[0] in ("Private_Clean:", "Private_Dirty:"):
                total += int(head[1]) * 1024
    return total


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


def _wait_for_all(folder: Path, stage: str, ranks: int) -> None:
    (folder / f"{stage}-{os.getpid()}").touch()
    while len(list(folder.glob(f"{stage}-*"))) < ranks:
        time.sleep(0.005)


def shared_index_rank(
    path: str, warm_path: str, ultra_low_mem: bool, rank: int, ranks: int, sync: str, cfg: tuple
) -> dict:
    """One rank: kernels warmed on a small dataset, then USS from before `open_dataset` to after
    `steps` batches; readings taken while every rank still holds its maps (PSS splits them)."""
    from pipeline import Loader, open_dataset

    batch_size, seq_len, seed, steps = cfg
    warm = Loader(open_dataset(warm_path, ultra_low_mem), batch_size, seq_len, rank, ranks, seed)
    next(iter(warm))
    del warm
    folder = Path(sync)
    _wait_for_all(folder, "ready", ranks)
    base = read_memory(include_children=False)
    sampler = PeakMemory(include_children=False)
    started = time.perf_counter()
    ds = open_dataset(path, ultra_low_mem=ultra_low_mem)
    loader = Loader(ds, batch_size, seq_len, rank=rank, world_size=ranks, seed=seed)
    batches = iter(loader)
    for _ in range(steps):
        next(batches)
    seconds = time.perf_counter() - started
    _wait_for_all(folder, "read", ranks)
    end = read_memory(include_children=False)
    peak = sampler.stop()
    _wait_for_all(folder, "measured", ranks)
    return {
        "rank": rank,
        "seconds": seconds,
        "end_pss_bytes": end.pss_bytes,
        **_growth(peak, base, end),
    }


def shared_index_case(
    path: str, warm_path: str, ultra_low_mem: bool, ranks: int, cfg: tuple
) -> dict:
    """`ranks` rank processes of `shared_index_rank` from a cold index cache; per-rank figures,
    the worst rank's growth, and the bytes of the shared index files they mapped."""
    from pipeline.index_cache import FOLDER_NAME, index_files_bytes

    shutil.rmtree(Path(path) / FOLDER_NAME, ignore_errors=True)
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as sync, ProcessPoolExecutor(ranks, context) as pool:
        args = (path, warm_path, ultra_low_mem)
        futures = [pool.submit(shared_index_rank, *args, r, ranks, sync, cfg) for r in range(ranks)]
        per_rank = [f.result() for f in futures]
    worst = max(per_rank, key=lambda r: r["uss_growth_bytes"])
    return {
        "steps": cfg[3],
        "seconds": max(r["seconds"] for r in per_rank),
        "peak_uss_bytes": worst["peak_uss_bytes"],
        "peak_pss_bytes": worst["peak_pss_bytes"],
        "uss_growth_bytes": worst["uss_growth_bytes"],  # the peak: a rank writing a file maps it
        "end_uss_growth_bytes": max(r["end_uss_growth_bytes"] for r in per_rank),
        "dirty_growth_bytes": max(r["dirty_growth_bytes"] for r in per_rank),
        "pss_growth_bytes": max(r["pss_growth_bytes"] for r in per_rank),
        "index_files_bytes": index_files_bytes(Path(path) / FOLDER_NAME),
        "per_rank": per_rank,
    }


def epoch_boundary_case(path: str, ahead: bool, cfg: tuple) -> dict:
    """From 85% of epoch 0 (cold index cache; a consumer step of `step_s`) into epoch 1: how long
    the first batch of epoch 1 takes, its index prepared ahead (at 90%) or built on demand."""
    from pipeline import Loader, open_dataset
    from pipeline import rows as rows_module
    from pipeline.index_cache import FOLDER_NAME

    batch_size, seq_len, seed, step_s = cfg
    shutil.rmtree(Path(path) / FOLDER_NAME, ignore_errors=True)
    if not ahead:
        rows_module.AHEAD_FRACTION = float("inf")  # this process only (run_isolated)
    base = read_memory(include_children=False)
    sampler = PeakMemory(include_children=False)
    loader = Loader(open_dataset(path), batch_size, seq_len, seed=seed)
    state, rows = loader.state_dict(), loader.rows_per_step
    state["consumed_rows"] = int(state["total_rows"] * 0.85) // rows * rows
    loader.load_state_dict(state)
    steps = 0
    for _ in loader:
        time.sleep(step_s)
        steps += 1
    started = time.perf_counter()
    next(iter(loader))
    boundary_wait_s = time.perf_counter() - started
    end = read_memory(include_children=False)
    return {
        "steps": steps,
        "boundary_wait_s": boundary_wait_s,
        **_growth(sampler.stop(), base, end),
    }


def build_tiny_docs_corpus(out: Path, num_docs: int, seed: int) -> Path:
    """(Once; cached at `out`) `num_docs` documents of 4-12 random byte ids, via the pipeline
    build (parquet parts of 1M documents)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig

    if (out / "index.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-src-") as tmp:
        inputs = []
        for first in range(0, num_docs, 1_000_000):
            lengths = rng.integers(4, 13, size=min(1_000_000, num_docs - first))
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            values = rng.integers(0, 256, size=int(offsets[-1]), dtype=np.int32)
            ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
            inputs.append(Path(tmp) / f"part-{len(inputs):05d}.parquet")
            pq.write_table(pa.table({"input_ids": ids}), inputs[-1])
        build_dataset(BuildConfig(inputs=inputs, out=out, text_field="input_ids"), progress=False)
    return out


def shared_index_cases(cache_dir: Path, cfg) -> list[MemoryCase]:
    """The shared-index cases (mmap and ultra-low-mem) over a tiny-documents corpus in
    `cache_dir`: 10M documents (200k with --quick), 3 ranks, 20 batches each."""
    num_docs = 200_000 if cfg.quick else 10_000_000
    corpus = cache_dir / f"tiny-docs-{num_docs}-seed{cfg.seed}"
    warm = cache_dir / f"tiny-docs-20000-seed{cfg.seed}"
    run_cfg = (cfg.batch_size, cfg.seq_len, cfg.seed, 20)
    args = (str(corpus), str(warm), num_docs, cfg.seed)
    cases = [
        MemoryCase(
            f"shared index {mode}, 3 ranks",
            _shared_index_stage,
            (*args, shared_index_case, (mode == "ultra_low_mem", 3, run_cfg)),
        )
        for mode in ("mmap", "ultra_low_mem")
    ]
    boundary_cfg = (cfg.batch_size, cfg.seq_len, cfg.seed, 0.005)
    for when in ("prepared ahead", "built on demand"):
        call = (epoch_boundary_case, (when == "prepared ahead", boundary_cfg))
        cases.append(
            MemoryCase(f"epoch boundary, index {when}", _shared_index_stage, (*args, *call))
        )
    return cases


def _shared_index_stage(corpus, warm, num_docs, seed, case, case_args) -> dict:
    build_tiny_docs_corpus(Path(corpus), num_docs, seed)
    build_tiny_docs_corpus(Path(warm), 20_000, seed + 1)
    if case is epoch_boundary_case:
        return case(corpus, *case_args)
    return case(corpus, warm, *case_args)


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
    return cases + shared_index_cases(Path(large_corpus).parent, cfg)
