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
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from bench import baselines, memory_cases
from bench.config import ThroughputConfig
from bench.memory_cases import PeakMemory, useful_tokens
from lowmem_core.errors import PipelineError

Units = Iterator[tuple[int, float]]  # (useful tokens, batches) per pull

HF_BASELINE = "hf datasets workers=0"
MEMCPY_BOUND = "memcpy bound"
NANOGPT = "nanoGPT memmap"
OURS_PACKING_MMAP = "ours packing mmap r=1"
OURS_PACKING_ULTRA = "ours packing ultra_low_mem r=1"

_MB = 2**20


@dataclass
class CaseResult:
    """One row of the report."""

    name: str
    stage: str
    tokens_per_s: float | None = None
    batches_per_s: float | None = None
    peak_uss_bytes: int | None = None
    peak_pss_bytes: int | None = None
    uss_growth_bytes: int | None = None
    data_wait_frac: float | None = None
    repeat_tokens_per_s: list[float] = field(default_factory=list)
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Case:
    name: str
    stage: str
    open: Callable[[], Units]
    seconds: float | None = None  # per repeat; None: the config's --seconds
    note: str = ""


@dataclass(frozen=True)
class Check:
    """A performance target of the data path, evaluated on measured numbers."""

    name: str
    value: float
    target: float
    higher_is_better: bool
    unit: str  # "x", "MB" or "%"

    @property
    def passed(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        if self.unit == "x":
            value, target = f"{self.value:.2f}x", f"{self.target:g}x"
        elif self.unit == "%":
            value, target = f"{self.value:.2f}%", f"{self.target:g}%"
        else:
            value, target = f"{self.value:.1f} MB", f"{self.target:g} MB"
        return f"{self.name}: {value} (target {op} {target}) {'PASS' if self.passed else 'FAIL'}"

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "line": self.line()}


# ----------------------------------------------------------------------------- data


def synthetic_token_lists(num_docs: int, seed: int, median_tokens: int, vocab_size: int) -> pa.ListArray:
    """`num_docs` documents of uniform random token ids with lognormal lengths (sigma 1), deterministic."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(median_tokens), 1.0, size=num_docs)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(0, vocab_size, size=int(offsets[-1]), dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def build_token_corpus(out: Path, num_docs: int, seed: int, median_tokens: int, docs_per_file: int = 200_000) -> Path:
    """Build (once; cached at `out`) a synthetic corpus with the pipeline builder, byte-tokenizer ids."""
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig
    from pipeline.tokenizer import BYTE_VOCAB_SIZE

    if (out / "index.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-src-") as tmp:
        inputs = []
        # Ids below 256 (plain bytes) so the byte tokenizer's specials keep their meaning.
        vocab = min(256, BYTE_VOCAB_SIZE)
        for part, first in enumerate(range(0, num_docs, docs_per_file)):
            n = min(docs_per_file, num_docs - first)
            path = Path(tmp) / f"part-{part:05d}.parquet"
            pq.write_table(pa.table({"input_ids": synthetic_token_lists(n, seed + part, median_tokens, vocab)}), path)
            inputs.append(path)
        build_dataset(BuildConfig(inputs=inputs, out=out, text_field="input_ids"), progress=False)
    return out


def prepare_dataset(cfg: ThroughputConfig) -> Path:
    """The dataset to benchmark: --data, a cached --synthetic corpus, or the sample corpus."""
    if cfg.data is not None:
        if not cfg.data.exists():
            raise PipelineError(f"--data {cfg.data} does not exist; build one with `python -m pipeline build INPUT... --out DIR`")
        return cfg.data
    if cfg.synthetic is not None:
        out = cfg.cache_dir / f"synthetic-{cfg.synthetic}-median{cfg.synthetic_median_tokens}-seed{cfg.seed}"
        return build_token_corpus(out, cfg.synthetic, cfg.seed, cfg.synthetic_median_tokens)
    return build_sample_dataset(cfg.cache_dir / "sample")


def build_sample_dataset(out: Path) -> Path:
    """The shipped sample corpus, built with the byte tokenizer (cached at `out`)."""
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig
    from pipeline.sample_corpus import write_sample_corpus

    if (out / "index.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".sample-src-") as tmp:
        files = write_sample_corpus(Path(tmp))
        build_dataset(BuildConfig(inputs=[files["txt"]], out=out), progress=False)
    return out


def memory_corpus_docs(corpus_gb: float, median_tokens: int) -> int:
    """Documents for a uint16 corpus of about `corpus_gb` GB (mean of lognormal(sigma=1) = median*e^0.5)."""
    mean_tokens = median_tokens * float(np.exp(0.5))
    return max(1, int(corpus_gb * 1e9 / 2 / mean_tokens))


# ----------------------------------------------------------------------------- timing


def _close(units: Units) -> None:
    close = getattr(units, "close", None)
    if close is not None:
        close()


@dataclass(frozen=True)
class _Window:
    tokens_per_s: float
    batches_per_s: float
    start: memory_cases.MemoryReading
    peak: memory_cases.MemoryReading


def _timed_window(case: Case, cfg: ThroughputConfig) -> _Window:
    """Open the case, warm it up, time one window of pulls, close it."""
    gc.collect()
    sampler = PeakMemory()
    units = case.open()
    try:
        warmup_end = time.perf_counter() + cfg.warmup_seconds
        next(units)
        while time.perf_counter() < warmup_end:
            next(units)
        tokens, batches = 0, 0.0
        started = time.perf_counter()
        deadline = started + (case.seconds if case.seconds is not None else cfg.seconds)
        while True:
            n_tokens, n_batches = next(units)
            tokens += n_tokens
            batches += n_batches
            now = time.perf_counter()
            if now >= deadline:
                break
    finally:
        _close(units)
        peak = sampler.stop()
    elapsed = now - started
    return _Window(tokens / elapsed, batches / elapsed, sampler.start_reading, peak)


def measure(cases: list[Case], cfg: ThroughputConfig, bar: tqdm | None = None) -> dict[str, CaseResult]:
    """Time every case `cfg.repeats` times, in rounds, and report each case's median window.

    Rounds (case 1, 2, ..., n, then again) rather than all repeats of one case back to back, so a
    burst of load from elsewhere on the machine lands on every case alike instead of on one.
    Each window is opened fresh and warmed up. Memory: the highest peak over the windows; growth is
    measured from the reading just before the case was opened.
    """
    windows: dict[str, list[_Window]] = {case.name: [] for case in cases}
    for _ in range(cfg.repeats):
        for case in cases:
            if bar is not None:
                bar.set_postfix_str(case.name)
            windows[case.name].append(_timed_window(case, cfg))
            if bar is not None:
                bar.update(1)
    results = {}
    for case in cases:
        runs = windows[case.name]
        worst = max(runs, key=lambda w: w.peak.uss_bytes - w.start.uss_bytes)
        results[case.name] = CaseResult(
            name=case.name,
            stage=case.stage,
            tokens_per_s=statistics.median(w.tokens_per_s for w in runs),
            batches_per_s=statistics.median(w.batches_per_s for w in runs),
            peak_uss_bytes=max(w.peak.uss_bytes for w in runs),
            peak_pss_bytes=max(w.peak.pss_bytes for w in runs),
            uss_growth_bytes=worst.peak.uss_bytes - worst.start.uss_bytes,
            repeat_tokens_per_s=[w.tokens_per_s for w in runs],
            note=case.note,
            extra={"dirty_growth_bytes": max(w.peak.dirty_bytes - w.start.dirty_bytes for w in runs)},
        )
    return results


# ----------------------------------------------------------------------------- loader stage


def _batches_forever(make_epoch: Callable[[], Iterator[dict]]) -> Units:
    while True:
        for batch in make_epoch():
            yield useful_tokens(batch), 1.0


def _ours(path: Path, cfg: ThroughputConfig, ultra: bool, packing: bool, readers: int) -> Callable[[], Units]:
    def open_units() -> Units:
        from pipeline import Loader, Prefetcher, open_dataset

        with open_dataset(path, ultra_low_mem=ultra) as ds:
            loader = Loader(ds, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                            packing=packing)
            # One reader: the Loader itself. More: the Prefetcher's reader threads (host buffers).
            feed = loader if readers == 1 else Prefetcher(loader, depth=readers, num_readers=readers)
            yield from _batches_forever(lambda: iter(feed))

    return open_units


def _dataloader_units(make_loader: Callable[[], torch.utils.data.DataLoader]) -> Callable[[], Units]:
    def open_units() -> Units:
        loader = make_loader()
        try:
            yield from _batches_forever(lambda: iter(loader))
        finally:
            # Persistent workers exit when their iterator is collected; collect it now, not later.
            del loader
            gc.collect()

    return open_units


def _nanogpt(files: baselines.BaselineFiles, cfg: ThroughputConfig) -> Callable[[], Units]:
    def open_units() -> Units:
        blocks = baselines.NanoGPTBlocks(files.flat_tokens_path, cfg.batch_size, cfg.seq_len, cfg.seed)
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
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        collate = baselines.PadCollate(cfg.seq_len, files.pad_id)
        # One item per unit: a whole batch would take longer than the sampling window.
        for index in order:
            yield useful_tokens(collate([dataset[index]])), 1.0 / cfg.batch_size

    return open_units


def loader_cases(path: Path, files: baselines.BaselineFiles, cfg: ThroughputConfig) -> tuple[list[Case], list[str]]:
    """The loader stage's cases and notes about what was left out."""
    notes: list[str] = []
    cases: list[Case] = []
    for packing in (True, False):
        for ultra in (False, True):
            for readers in cfg.readers:
                layout = "packing" if packing else "padding"
                mode = "ultra_low_mem" if ultra else "mmap"
                cases.append(Case(f"ours {layout} {mode} r={readers}", "loader", _ours(path, cfg, ultra, packing, readers)))
    pin_options = (False, True) if torch.cuda.is_available() else (False,)
    if not torch.cuda.is_available():
        notes.append("pin_memory=True DataLoader cases skipped: no CUDA (pinning needs a CUDA device)")
    for workers in (0, cfg.workers):
        for pin in pin_options:
            name = f"hf datasets workers={workers}" + (" pinned" if pin else "")
            cases.append(Case(name, "loader", _dataloader_units(
                lambda w=workers, p=pin: baselines.hf_dataloader(files, cfg.batch_size, cfg.seq_len, w, p, cfg.seed))))
    cases.append(Case(NANOGPT, "loader", _nanogpt(files, cfg)))
    cases.append(Case("reference read_table+slice", "loader", _dataloader_units(
        lambda: baselines.reference_dataloader(files, cfg.batch_size, cfg.seq_len, cfg.seed))))
    cases.append(Case("reference ultra (re-read file per item)", "loader", _reference_reread(files, cfg),
                      seconds=cfg.ultra_reference_seconds, note="sampled per item"))
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
        cfg.cache_dir / f"memory-{cfg.memory_corpus_gb:g}gb-seed{cfg.seed}", corpus_docs, cfg.seed,
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
    checks = [Check("ultra_low_mem read-all USS growth", raw["ultra_low_mem read-all"]["uss_growth_bytes"] / _MB,
                    32.0, False, "MB")]
    if "mmap read-all" in raw:
        # The ultra_low_mem throughput target again, on the large corpus: reads come from disk.
        checks.append(Check("ultra_low_mem vs mmap, large-corpus read-all",
                            raw["ultra_low_mem read-all"]["tokens_per_s"] / raw["mmap read-all"]["tokens_per_s"],
                            0.9, True, "x"))
    prefetch = sorted(k for k in raw if k.startswith("prefetch"))
    counts = {int(k.split()[1]): raw[k] for k in prefetch}
    k_max = max(counts)
    # USS as the targets state it, then the private dirty part alone: USS also moves with the
    # dataset's clean file pages (fault-around, readahead) and with shared libraries that other
    # processes stop or start mapping, so the dirty figure is the one that isolates the readers.
    for key, what in (("uss_growth_bytes", "USS"), ("dirty_growth_bytes", "private dirty")):
        one, four = raw["mmap 1 reader(s)"][key], raw["mmap 4 reader(s)"][key]
        checks.append(Check(f"mmap 4 readers vs 1: extra {what}", (four - one) / _MB, 16.0, False, "MB"))
        per_reader = (counts[k_max][key] - counts[1][key]) / (k_max - 1)
        checks.append(Check(f"prefetch {what} per extra reader (1 -> {k_max})", per_reader / _MB, 16.0, False, "MB"))
    checks.append(Check("CPU prefetcher data wait, 1 reader", 100.0 * counts[1]["data_wait_frac"], 1.0, False, "%"))
    return list(results.values()), checks


def memory_case_count(cfg: ThroughputConfig) -> int:
    # The corpus path only travels into the cases' arguments; the count does not depend on it.
    return len(memory_cases.memory_cases(cfg.cache_dir, cfg))


# ----------------------------------------------------------------------------- h2d stage


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


def run_h2d_stage(path: Path, cfg: ThroughputConfig, bar: tqdm) -> tuple[list[CaseResult], list[Check]]:
    """Pageable vs pinned host-to-device GB/s for one batch's bytes, and the Prefetcher's achieved rate."""
    from pipeline import Loader, Prefetcher, open_dataset

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

    def open_units() -> Units:
        with open_dataset(path) as ds:
            loader = Loader(ds, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, packing=True)
            prefetcher = Prefetcher(loader, device=device, depth=2, num_readers=max(cfg.readers))
            while True:
                for batch in prefetcher:
                    yield useful_tokens(batch), 1.0

    result = measure([Case("prefetcher to GPU", "h2d", open_units)], cfg, bar)["prefetcher to GPU"]
    torch.cuda.synchronize()
    result.extra["bytes_per_s"] = result.batches_per_s * batch_bytes
    results = [CaseResult(name=name, stage="h2d", extra={"bytes_per_s": rate, "gb_per_s": rate / 1e9})
               for name, rate in rates.items()]
    results.append(result)
    checks = [Check("prefetcher vs pinned H2D rate", result.extra["bytes_per_s"] / rates["h2d pinned"], 0.8, True, "x")]
    return results, checks


# ----------------------------------------------------------------------------- step stage


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _train_steps(model, optimizer, next_batch: Callable[[], dict], device: torch.device, steps: int) -> dict:
    """Run 2 warm-up + `steps` timed steps; each step's wait is the time until its batch sits on `device`."""
    waits_s, step_times_s, tokens = [], [], 0
    for i in range(2 + steps):
        started = time.perf_counter()
        batch = next_batch()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        waited = time.perf_counter() - started
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
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


def run_step_stage(path: Path, files: baselines.BaselineFiles, cfg: ThroughputConfig,
                   bar: tqdm) -> tuple[list[CaseResult], list[Check], list[str]]:
    """The trainer's model step fed by our Prefetcher vs a plain DataLoader over the HF dataset."""
    from pipeline import Loader, Prefetcher, open_dataset
    from trainer_low_mem.model import build_model

    rank, world_size = _distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    batch_size = cfg.step_batch_size or cfg.batch_size
    results, notes = [], []
    with open_dataset(path) as ds:
        vocab_size = ds.vocab_size
        loader = Loader(ds, batch_size=batch_size, seq_len=cfg.seq_len, rank=rank, world_size=world_size,
                        seed=cfg.seed, packing=True)
        prefetcher = Prefetcher(loader, device=device if device.type == "cuda" else None, depth=2,
                                num_readers=max(cfg.readers))
        hf_loader = baselines.hf_dataloader(files, batch_size, cfg.seq_len, num_workers=cfg.workers,
                                            pin_memory=device.type == "cuda", seed=cfg.seed)
        feeds = (("step fed by our prefetcher", prefetcher), ("step fed by HF DataLoader", hf_loader))
        for name, feed in feeds:
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.model_preset, vocab_size=vocab_size).to(device)
            if world_size > 1:
                model = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            gc.collect()
            sampler = PeakMemory()
            batches = _endless(feed)
            try:
                timing = _train_steps(model, optimizer, lambda: next(batches), device, cfg.step_count)
            finally:
                _close(batches)
                peak = sampler.stop()
            total_s = sum(timing["step_times_s"])
            median_step_s = statistics.median(timing["step_times_s"])
            result = CaseResult(
                name=name, stage="step",
                tokens_per_s=timing["tokens"] / total_s,
                batches_per_s=len(timing["step_times_s"]) / total_s,
                peak_uss_bytes=peak.uss_bytes, peak_pss_bytes=peak.pss_bytes,
                uss_growth_bytes=peak.uss_bytes - sampler.start_reading.uss_bytes,
                data_wait_frac=sum(timing["waits_s"]) / total_s,
                note=f"{cfg.model_preset} model, B={batch_size}, {device.type}",
                extra={"median_step_s": median_step_s, "steps": len(timing["step_times_s"]), "batch_size": batch_size},
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
        total = (len(planned_loader[0]) * cfg.repeats + (memory_case_count(cfg) if "memory" in cfg.stages else 0)
                 + (2 + cfg.repeats if "h2d" in cfg.stages and cuda else 0) + (2 if "step" in cfg.stages else 0))
        bar = stack.enter_context(tqdm(total=total, desc="bench", unit="case", disable=not cfg.progress))
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
