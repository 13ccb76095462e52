"""The `bench throughput` runner: prepares the data, builds each stage's cases and times them.

Every case is an iterator of `(useful_tokens, batches)` units opened fresh for the case. The
runner pulls units for a warm-up period (thread and worker start-up, page faults, numba
compilation), then for `repeats` timed windows of `seconds` each, and reports the median window.
Useful tokens are those whose label is not -100 (padding is work, not progress). All cases run
in this one process, so their ratios compare like with like; the memory stage alone runs each
case in a fresh process (bench/memory_cases.py) because it measures growth of private memory.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from bench import baselines, memory_cases
from bench.config import ThroughputConfig
from bench.corpus import build_token_corpus, memory_corpus_docs, prepare_dataset
from bench.device_stages import run_h2d_stage, run_step_stage
from bench.measure import Case, CaseResult, Check, Units, measure
from bench.memory_cases import useful_tokens

HF_BASELINE = "hf datasets workers=0"
MEMCPY_BOUND = "memcpy bound"
NANOGPT = "nanoGPT memmap"
OURS_PACKING_MMAP = "ours packing mmap r=1"
OURS_PACKING_ULTRA = "ours packing ultra_low_mem r=1"

_MB = 2**20


# ----------------------------------------------------------------------------- loader stage


def _batches_forever(make_epoch: Callable[[], Iterator[dict]]) -> Units:
    while True:
        for batch in make_epoch():
            yield useful_tokens(batch), 1.0


def _ours(
    path: Path, cfg: ThroughputConfig, ultra: bool, packing: bool, readers: int
) -> Callable[[], Units]:
    def open_units() -> Units:
        from pipeline import Loader, Prefetcher, open_dataset

        with open_dataset(path, ultra_low_mem=ultra) as ds:
            loader = Loader(
                ds, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, packing=packing
            )
            # One reader: the Loader itself. More: the Prefetcher's reader threads (host buffers).
            feed = (
                loader if readers == 1 else Prefetcher(loader, depth=readers, num_readers=readers)
            )
            yield from _batches_forever(lambda: iter(feed))

    return open_units


def _dataloader_units(
    make_loader: Callable[[], torch.utils.data.DataLoader],
) -> Callable[[], Units]:
    def open_units() -> Units:
        loader = make_loader()
        try:
            yield from _batches_forever(loader.__iter__)
        finally:
            # Persistent workers exit when their iterator is collected; collect it now, not later.
            del loader
            gc.collect()

    return open_units


def _nanogpt(files: baselines.BaselineFiles, cfg: ThroughputConfig) -> Callable[[], Units]:
    def open_units() -> Units:
        blocks = baselines.NanoGPTBlocks(
            files.flat_tokens_path, cfg.batch_size, cfg.seq_len, cfg.seed
        )
        for batch in blocks:
            yield useful_tokens(batch), 1.0

    return open_units


def _memcpy(files: baselines.BaselineFiles, cfg: ThroughputConfig) -> Callable[[], Units]:
    def open_units() -> Units:
        bound = baselines.MemcpyBound(files.flat_tokens_path, cfg.batch_size, cfg.seq_len)
        while True:
            bound.next_batch()
            yield bound.tokens_per_batch, 1.0

    return open_units


def _reference_reread(files: baselines.BaselineFiles, cfg: ThroughputConfig) -> Callable[[], Units]:
    def open_units() -> Units:
        dataset = baselines.ParquetRereadDataset(files.parquet_path)
        order = torch.randperm(
            len(dataset), generator=torch.Generator().manual_seed(cfg.seed)
        ).tolist()
        collate = baselines.PadCollate(cfg.seq_len, files.pad_id, files.eos_id)
        # One item per unit: a whole batch would take longer than the sampling window.
        for index in order:
            yield useful_tokens(collate([dataset[index]])), 1.0 / cfg.batch_size

    return open_units


def loader_cases(
    path: Path, files: baselines.BaselineFiles, cfg: ThroughputConfig
) -> tuple[list[Case], list[str]]:
    """The loader stage's cases and notes about what was left out."""
    notes: list[str] = []
    cases: list[Case] = []
    for packing in (True, False):
        for ultra in (False, True):
            for readers in cfg.readers:
                layout = "packing" if packing else "padding"
                mode = "ultra_low_mem" if ultra else "mmap"
                cases.append(
                    Case(
                        f"ours {layout} {mode} r={readers}",
                        "loader",
                        _ours(path, cfg, ultra, packing, readers),
                    )
                )
    pin_options = (False, True) if torch.cuda.is_available() else (False,)
    if not torch.cuda.is_available():
        notes.append(
            "pin_memory=True DataLoader cases skipped: no CUDA (pinning needs a CUDA device)"
        )
    for workers in (0, cfg.workers):
        for pin in pin_options:
            name = f"hf datasets workers={workers}" + (" pinned" if pin else "")
            cases.append(
                Case(
                    name,
                    "loader",
                    _dataloader_units(
                        lambda w=workers, p=pin: baselines.hf_dataloader(
                            files, cfg.batch_size, cfg.seq_len, w, p, cfg.seed
                        )
                    ),
                )
            )
    cases.append(Case(NANOGPT, "loader", _nanogpt(files, cfg)))
    cases.append(
        Case(
            "reference read_table+slice",
            "loader",
            _dataloader_units(
                lambda: baselines.reference_dataloader(files, cfg.batch_size, cfg.seq_len, cfg.seed)
            ),
        )
    )
    cases.append(
        Case(
            "reference ultra (re-read file per item)",
            "loader",
            _reference_reread(files, cfg),
            seconds=cfg.ultra_reference_seconds,
            note="sampled per item",
        )
    )
    cases.append(Case(MEMCPY_BOUND, "loader", _memcpy(files, cfg)))
    return cases, notes


def loader_checks(results: dict[str, CaseResult]) -> list[Check]:
    """The loader's throughput targets, from the loader stage's results."""
    checks = []

    def ratio(a: str, b: str) -> float | None:
        if a in results and b in results and results[b].tokens_per_s:
            return results[a].tokens_per_s / results[b].tokens_per_s
        return None

    for name, a, b, target in (
        ("packing mmap vs HF", OURS_PACKING_MMAP, HF_BASELINE, 20.0),
        ("packing mmap vs nanoGPT memmap", OURS_PACKING_MMAP, NANOGPT, 5.0),
        ("ultra_low_mem vs mmap (packing)", OURS_PACKING_ULTRA, OURS_PACKING_MMAP, 0.9),
    ):
        value = ratio(a, b)
        if value is not None:
            checks.append(Check(name, value, target, True, "x"))
    return checks


# ----------------------------------------------------------------------------- memory stage


def run_memory_stage(cfg: ThroughputConfig, bar: tqdm) -> tuple[list[CaseResult], list[Check]]:
    corpus_docs = memory_corpus_docs(cfg.memory_corpus_gb, cfg.synthetic_median_tokens)
    corpus = build_token_corpus(
        cfg.cache_dir / f"memory-{cfg.memory_corpus_gb:g}gb-seed{cfg.seed}",
        corpus_docs,
        cfg.seed,
        cfg.synthetic_median_tokens,
    )
    results: dict[str, CaseResult] = {}
    raw: dict[str, dict] = {}
    for case in memory_cases.memory_cases(corpus, cfg):
        bar.set_postfix_str(case.name)
        out = memory_cases.run_isolated(case.fn, *case.args)
        raw[case.name] = out
        steps = out["steps"]
        seconds = out.get("seconds")
        results[case.name] = CaseResult(
            name=f"memory: {case.name}",
            stage="memory",
            tokens_per_s=out.get("tokens_per_s"),
            batches_per_s=steps / seconds if seconds else None,
            peak_uss_bytes=out["peak_uss_bytes"],
            peak_pss_bytes=out["peak_pss_bytes"],
            uss_growth_bytes=out["uss_growth_bytes"],
            data_wait_frac=out.get("data_wait_frac"),
            extra=out,
        )
        bar.update(1)
    checks = [
        Check(
            "ultra_low_mem read-all USS growth, shared index files aside",
            (
                raw["ultra_low_mem read-all"]["uss_growth_bytes"]
                - raw["ultra_low_mem read-all"].get("index_mapped_bytes", 0)
            )
            / _MB,
            32.0,
            False,
            "MB",
        )
    ]
    if "mmap read-all" in raw:
        # The ultra_low_mem throughput target again, on the large corpus: reads come from disk.
        checks.append(
            Check(
                "ultra_low_mem vs mmap, large-corpus read-all",
                raw["ultra_low_mem read-all"]["tokens_per_s"]
                / raw["mmap read-all"]["tokens_per_s"],
                0.9,
                True,
                "x",
            )
        )
    prefetch = sorted(k for k in raw if k.startswith("prefetch"))
    counts = {int(k.split()[1]): raw[k] for k in prefetch}
    k_max = max(counts)
    # USS as the targets state it, then the private dirty part alone: USS also moves with the
    # dataset's clean file pages (fault-around, readahead) and with shared libraries that other
    # processes stop or start mapping, so the dirty figure is the one that isolates the readers.
    for key, what in (("uss_growth_bytes", "USS"), ("dirty_growth_bytes", "private dirty")):
        one, four = raw["mmap 1 reader(s)"][key], raw["mmap 4 reader(s)"][key]
        checks.append(
            Check(f"mmap 4 readers vs 1: extra {what}", (four - one) / _MB, 16.0, False, "MB")
        )
        per_reader = (counts[k_max][key] - counts[1][key]) / (k_max - 1)
        checks.append(
            Check(
                f"prefetch {what} per extra reader (1 -> {k_max})",
                per_reader / _MB,
                16.0,
                False,
                "MB",
            )
        )
    checks.append(
        Check(
            "CPU prefetcher data wait, 1 reader",
            100.0 * counts[1]["data_wait_frac"],
            1.0,
            False,
            "%",
        )
    )
    for name in (k for k in raw if k.startswith("shared index")):
        growth = raw[name]["end_uss_growth_bytes"] / _MB
        what = f"{name}: USS growth per rank, open to 20 batches (worst)"
        checks.append(Check(what, growth, 16.0, False, "MB"))
    if "epoch boundary, index prepared ahead" in raw:
        ahead = raw["epoch boundary, index prepared ahead"]["boundary_wait_s"]
        on_demand = raw["epoch boundary, index built on demand"]["boundary_wait_s"]
        what = "epoch boundary wait, index built on demand vs prepared ahead"
        checks.append(Check(what, on_demand / max(ahead, 1e-6), 10.0, True, "x"))
    return list(results.values()), checks


def memory_case_count(cfg: ThroughputConfig) -> int:
    # The corpus path only travels into the cases' arguments; the count does not depend on it.
    return len(memory_cases.memory_cases(cfg.cache_dir, cfg))


# ----------------------------------------------------------------------------- the run


@dataclass
class RunOutcome:
    dataset: Path
    results: list[CaseResult]
    checks: list[Check]
    notes: list[str]
    seconds: float


def run(cfg: ThroughputConfig) -> RunOutcome:
    """Run the selected stages; return every result, the checks against the targets, and notes."""
    started = time.perf_counter()
    path = prepare_dataset(cfg)
    results: list[CaseResult] = []
    checks: list[Check] = []
    notes: list[str] = []
    cuda = torch.cuda.is_available()
    with contextlib.ExitStack() as stack:
        files = None
        if {"loader", "step"} & set(cfg.stages):
            from pipeline import open_dataset

            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-baselines-")))
            with open_dataset(path) as ds:
                files = baselines.write_baseline_files(ds, work)
        planned_loader = loader_cases(path, files, cfg) if "loader" in cfg.stages else ([], [])
        total = (
            len(planned_loader[0]) * cfg.repeats
            + (memory_case_count(cfg) if "memory" in cfg.stages else 0)
            + (2 + cfg.repeats if "h2d" in cfg.stages and cuda else 0)
            + (2 if "step" in cfg.stages else 0)
        )
        bar = stack.enter_context(
            tqdm(total=total, desc="bench", unit="case", disable=not cfg.progress)
        )
        if "loader" in cfg.stages:
            cases, loader_notes = planned_loader
            notes += loader_notes
            by_name = measure(cases, cfg, bar)
            results += by_name.values()
            checks += loader_checks(by_name)
        if "memory" in cfg.stages:
            memory_results, memory_checks = run_memory_stage(cfg, bar)
            results += memory_results
            checks += memory_checks
        if "h2d" in cfg.stages:
            if cuda:
                h2d_results, h2d_checks = run_h2d_stage(path, cfg, bar)
                results += h2d_results
                checks += h2d_checks
            else:
                notes.append("h2d stage skipped: no CUDA")
        if "step" in cfg.stages:
            step_results, step_checks, step_notes = run_step_stage(path, files, cfg, bar)
            results += step_results
            checks += step_checks
            notes += step_notes
    return RunOutcome(path, results, checks, notes, time.perf_counter() - started)
