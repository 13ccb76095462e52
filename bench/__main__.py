"""`bench throughput ...` (also `python -m bench throughput ...`): parse the flags and delegate."""

from __future__ import annotations

import sys

from lowmem_core.errors import run_cli


def _main(argv: list[str]) -> int:
    import tyro

    from bench.config import ThroughputConfig

    cfg = tyro.extras.subcommand_cli_from_dict(
        {"throughput": ThroughputConfig}, args=argv, prog="bench",
        description="Measure this project's data path against its baselines.",
    )
    from bench.report import run_and_report

    return run_and_report(cfg)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
