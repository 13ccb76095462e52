"""`bench throughput|plan|build|sft|gpu|load|sizing ...` (also `python -m bench`): parse flags,
delegate."""

from __future__ import annotations

import sys

import tyro

from bench.config import (
    BuildSpeedConfig,
    GpuCheckConfig,
    LoadRamConfig,
    PlanCheckConfig,
    SftSpeedConfig,
    SizingConfig,
    ThroughputConfig,
)
from lowmem_core.errors import run_cli
from lowmem_core.flags import parse_flags


def parse_args(
    argv: list[str],
) -> (
    ThroughputConfig
    | PlanCheckConfig
    | BuildSpeedConfig
    | SftSpeedConfig
    | GpuCheckConfig
    | LoadRamConfig
    | SizingConfig
):
    """The config of the benchmark `argv` names: throughput, plan, build, sft, gpu, load or
    sizing."""
    configs = {
        "throughput": ThroughputConfig,
        "plan": PlanCheckConfig,
        "build": BuildSpeedConfig,
        "sft": SftSpeedConfig,
        "gpu": GpuCheckConfig,
        "load": LoadRamConfig,
        "sizing": SizingConfig,
    }
    return parse_flags(
        lambda args: tyro.extras.subcommand_cli_from_dict(
            configs,
            args=args,
            prog="bench",
            description="Measure this project's data path against its baselines, and check the "
            "planner's memory trace against real steps.",
        ),
        argv,
        "bench",
        configs,
    )


def _main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    if isinstance(cfg, BuildSpeedConfig):
        from bench.build_speed import run_and_report as run_build_bench

        return run_build_bench(cfg)
    if isinstance(cfg, SftSpeedConfig):
        from bench.sft_speed import run_and_report as run_sft_bench

        return run_sft_bench(cfg)
    if isinstance(cfg, GpuCheckConfig):
        from bench.gpu_check import run_gpu_check

        return run_gpu_check(cfg)
    if isinstance(cfg, LoadRamConfig):
        from bench.load_ram import ModelSize, run_load_bench

        heads = max(cfg.hidden // 128, 2)
        size = ModelSize(hidden=cfg.hidden, layers=cfg.layers, heads=heads, kv_heads=heads // 2)
        run_load_bench(size, cfg.processes, workdir=cfg.workdir)
        return 0
    if isinstance(cfg, SizingConfig):
        from bench.sizing import run_sizing

        return run_sizing(cfg.markdown, cfg.models or None)
    if isinstance(cfg, PlanCheckConfig):
        from bench.plan_check import run_plan_check

        return run_plan_check(quick=cfg.quick, json_path=cfg.json_path)
    from bench.report import run_and_report

    return run_and_report(cfg)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
