"""`python -m pipeline {build,demo,...}`: parse the subcommand's dataclass and delegate."""

from __future__ import annotations

import tyro

from pipeline.config import BuildConfig, DemoConfig, PlanConfig
from lowmem_core.errors import run_cli


def build(cfg: BuildConfig) -> None:
    from pipeline.build import build_dataset

    report = build_dataset(cfg)
    print(f"built {report.out_dir}: {report.num_documents} documents, {report.num_tokens} tokens, "
          f"{report.num_shards} shard(s) in {report.seconds:.2f} s ({report.tokens_per_s / 1e6:.2f} M tokens/s)")


def demo(cfg: DemoConfig) -> None:
    from pipeline.demo import run_demo

    run_demo(cfg)


def plan(cfg: PlanConfig) -> None:
    import json

    from pipeline.sizer import plan_from_config

    result = plan_from_config(cfg)
    print(json.dumps(result.to_dict(), indent=2) if cfg.json else result.table())


# subcommand name -> (config dataclass, handler)
SUBCOMMANDS = {"build": (BuildConfig, build), "demo": (DemoConfig, demo), "plan": (PlanConfig, plan)}


def _main(argv: list[str]) -> int:
    cfg = tyro.extras.subcommand_cli_from_dict(
        {name: cls for name, (cls, _) in SUBCOMMANDS.items()}, prog="python -m pipeline", args=argv
    )
    handler = next(fn for cls, fn in SUBCOMMANDS.values() if isinstance(cfg, cls))
    handler(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
