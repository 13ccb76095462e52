"""How a bench case is timed: a case opens an iterator of `(useful_tokens, batches)` units; the
runner warms it up, times `repeats` windows of `seconds` in rounds, and reports the median window
with the memory it took. Also the result and check records every stage reports."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from bench import memory_cases
from bench.config import ThroughputConfig
from bench.memory_cases import PeakMemory

Units = Iterator[tuple[int, float]]  # (useful tokens, batches) per pull


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


def close_units(units: Units) -> None:
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
        close_units(units)
        peak = sampler.stop()
    elapsed = now - started
    return _Window(tokens / elapsed, batches / elapsed, sampler.start_reading, peak)


def measure(
    cases: list[Case], cfg: ThroughputConfig, bar: tqdm | None = None
) -> dict[str, CaseResult]:
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
            extra={
                "dirty_growth_bytes": max(w.peak.dirty_bytes - w.start.dirty_bytes for w in runs)
            },
        )
    return results
