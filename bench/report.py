"""Running `bench throughput` and presenting it: console/Markdown table, JSON document, PNG chart.

The JSON document is `{"machine": {...}, "config": {...}, "dataset": {...}, "results": [...],
"checks": [...], "notes": [...]}`; every result carries at least the keys of `RESULT_KEYS`.
The console shows what was measured (the table and each check's figure); the data path's
targets and their verdicts are for our own benchmarking and stay in the JSON's "checks" (each
with `target`, `passed` and `line`), since a busy machine misses them without anything being
wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.config import ThroughputConfig
from bench.measure import Check
from bench.throughput import HF_BASELINE, MEMCPY_BOUND, RunOutcome
from lowmem_core.errors import require_extra

RESULT_KEYS = ("name", "stage", "tokens_per_s", "batches_per_s", "peak_uss_bytes", "data_wait_frac")
SCHEMA_VERSION = 1


def to_json(outcome: RunOutcome, machine: dict, config: dict, dataset: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "machine": machine,
        "config": config,
        "dataset": dataset,
        "seconds": outcome.seconds,
        "results": [r.to_dict() for r in outcome.results],
        "checks": [c.to_dict() for c in outcome.checks],
        "notes": outcome.notes,
    }


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def _fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.1f}"


def _fmt_ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def _fmt_mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def table(outcome: RunOutcome) -> str:
    """A Markdown table (readable as plain text) of every result."""
    by_name = {r.name: r for r in outcome.results}
    hf = by_name[HF_BASELINE].tokens_per_s if HF_BASELINE in by_name else None
    bound = by_name[MEMCPY_BOUND].tokens_per_s if MEMCPY_BOUND in by_name else None
    header = (
        "case",
        "stage",
        "tokens/s",
        "batches/s",
        "vs HF",
        "vs memcpy",
        "peak USS MB",
        "USS growth MB",
        "data wait",
        "other",
    )
    rows = []
    for r in outcome.results:
        other = []
        if "gb_per_s" in r.extra:
            other.append(f"{r.extra['gb_per_s']:.2f} GB/s")
        elif "bytes_per_s" in r.extra:
            other.append(f"{r.extra['bytes_per_s'] / 1e9:.2f} GB/s")
        if "dirty_growth_bytes" in r.extra:
            other.append(f"dirty {r.extra['dirty_growth_bytes'] / 2**20:+.1f} MB")
        if "median_step_s" in r.extra:
            other.append(f"step {r.extra['median_step_s'] * 1e3:.0f} ms")
        if "rank_step_spread_s" in r.extra:
            other.append(f"rank spread {r.extra['rank_step_spread_s'] * 1e3:.1f} ms")
        if r.note:
            other.append(r.note)
        rows.append(
            (
                r.name,
                r.stage,
                _fmt_rate(r.tokens_per_s),
                _fmt_rate(r.batches_per_s),
                _fmt_ratio(r.tokens_per_s, hf) if r.stage == "loader" else "-",
                _fmt_ratio(r.tokens_per_s, bound) if r.stage == "loader" else "-",
                _fmt_mb(r.peak_uss_bytes),
                "-" if r.uss_growth_bytes is None else f"{r.uss_growth_bytes / 2**20:+.1f}",
                "-" if r.data_wait_frac is None else f"{100 * r.data_wait_frac:.2f}%",
                "; ".join(other),
            )
        )
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    return "\n".join(lines)


def figure_lines(outcome: RunOutcome) -> list[str]:
    """Each check's measured figure, `name: value`, without its target or verdict."""
    return [f"{c.name}: {_fmt_figure(c)}" for c in outcome.checks]


def _fmt_figure(check: Check) -> str:
    if check.unit == "x":
        return f"{check.value:.2f}x"
    if check.unit == "%":
        return f"{check.value:.2f}%"
    return f"{check.value:.1f} MB"


def plot(outcome: RunOutcome, path: Path, title: str) -> None:
    """Horizontal bars of tokens/s per case (log axis); ours, baselines and the bound in distinct
    colours."""
    matplotlib = require_extra("matplotlib", "plot", "bench --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in outcome.results if r.tokens_per_s and r.stage in ("loader", "h2d", "step")]
    if not rows:
        return
    colours = []
    for r in rows:
        if r.name == MEMCPY_BOUND:
            colours.append("#7f7f7f")
        elif (
            r.name.startswith("ours") or "our prefetcher" in r.name or r.name == "prefetcher to GPU"
        ):
            colours.append("#1f77b4")
        else:
            colours.append("#ff7f0e")
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.4))
    positions = range(len(rows))
    ax.barh(positions, [r.tokens_per_s for r in rows], color=colours)
    ax.set_yticks(list(positions), [r.name for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("useful tokens/s (log scale)")
    ax.set_title(title, fontsize=9)
    for pos, r in zip(positions, rows, strict=True):
        ax.text(r.tokens_per_s, pos, f" {_fmt_rate(r.tokens_per_s)}", va="center", fontsize=7)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _is_main_rank() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def run_and_report(cfg: ThroughputConfig) -> int:
    """Run the benchmark `cfg` describes; print the table and the checks' figures; write JSON
    (targets and verdicts included) and plot if asked."""
    from bench import machine, throughput
    from lowmem_core.locks import check_output_file
    from pipeline import open_dataset

    # Fail now, not after the whole run: the report paths can be written.
    if cfg.json_path is not None:
        check_output_file(cfg.json_path, "--json")
    if cfg.plot_path is not None:
        check_output_file(cfg.plot_path, "--plot")
    facts = machine.machine_facts()
    outcome = throughput.run(cfg)
    if not _is_main_rank():
        return 0
    with open_dataset(outcome.dataset) as ds:
        dataset = {
            "path": str(outcome.dataset),
            "num_documents": len(ds),
            "num_tokens": ds.num_tokens,
            "token_dtype": ds.token_dtype.name,
            "fingerprint": ds.fingerprint,
        }
    print(f"machine: {machine.describe(facts)}")
    print(
        f"dataset: {dataset['path']} ({dataset['num_documents']} documents, "
        f"{dataset['num_tokens']} tokens); B={cfg.batch_size}, L={cfg.seq_len}, {cfg.repeats} x "
        f"{cfg.seconds:g} s per case, median"
    )
    print(table(outcome))
    for line in figure_lines(outcome):
        print(line)
    for note in outcome.notes:
        print(f"note: {note}")
    if cfg.json_path is not None:
        write_json(to_json(outcome, facts, cfg.to_dict(), dataset), cfg.json_path)
        print(f"wrote {cfg.json_path}")
    if cfg.plot_path is not None:
        title = (
            f"B={cfg.batch_size}, L={cfg.seq_len}, {dataset['num_documents']} docs; "
            f"{machine.describe(facts).split(';')[0]}"
        )
        plot(outcome, cfg.plot_path, title)
        print(f"wrote {cfg.plot_path}")
    print(f"total {outcome.seconds:.1f} s")
    return 0
