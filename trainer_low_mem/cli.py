"""Command line of the trainer: `train` runs the loop, `plan` prints the plan a run would use,
`stop OUTPUT_DIR` stops a running job (trainer_low_mem/stop.py).

`train_low_mem.py` and the `train-low-mem` console script both call `main`; `python -m pipeline
plan` delegates to `plan_main`, which plans the model `train` would build (a preset or `--model
DIR`, LoRA included) and says which memory estimate it used. Flags are generated from
`trainer_low_mem.config` by tyro: flat names with underscores; a boolean is a flag (`--json`,
`--no_json` or `--no-json`) or takes true/false as its value (`--is_keep_training=True`,
`--auto_plan False`), as the seed's users type it; `plan` takes the same names as `train`.
`--debug` is taken off the command line by `run_cli` before the flags are parsed; the help of
`train` and `plan` lists it all the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import io
import json
import sys
from pathlib import Path
from typing import Annotated

import tyro

from lowmem_core.errors import DEBUG_HELP, ConfigError, LowMemError, run_cli
from lowmem_core.flags import parse_flags
from trainer_low_mem.config import JobConfig, PlanConfig

PROG = "train_low_mem.py"
SUBCOMMANDS = ("train", "plan", "stop")
_TYRO_MARKERS = (tyro.conf.OmitArgPrefixes,)


def parse_job_config(argv: list[str]) -> JobConfig:
    """Parse the flags of the `train` subcommand (without the word `train`) into a JobConfig."""
    return _parse(JobConfig, argv, f"{PROG} train")


def parse_plan_config(argv: list[str], prog: str = f"{PROG} plan") -> PlanConfig:
    """Parse the flags of the `plan` subcommand (without the word `plan`) into a PlanConfig."""
    return _parse(PlanConfig, argv, prog)


def _parse(config: type, argv: list[str], prog: str):
    shown = _with_debug_flag(config) if "-h" in argv or "--help" in argv else config
    return parse_flags(
        lambda args: tyro.cli(
            shown,
            args=args,
            prog=prog,
            use_underscores=True,
            config=_TYRO_MARKERS,
            description=config.__doc__,
        ),
        argv,
        prog,
        config,
    )


def _with_debug_flag(config: type) -> type:
    """`config` plus a documented --debug, for its help only: the parsed config never holds it."""
    flag = Annotated[
        bool, tyro.conf.FlagCreatePairsOff, tyro.conf.arg(help=DEBUG_HELP, help_behavior_hint="")
    ]
    field = ("debug", flag, dataclasses.field(default=False))
    return dataclasses.make_dataclass(config.__name__, [field], bases=(config,), kw_only=True)


def plan_from_config(cfg: PlanConfig):
    """The plan of the run `cfg` describes, decided by the job builder `train` uses
    (trainer_low_mem/job.py): a built-in preset or a Hugging Face folder, with or without LoRA,
    its memory traced on fake tensors (analytic count when the trace fails)."""
    from pipeline.dataset import open_dataset
    from trainer_low_mem.job import build_job
    from trainer_low_mem.launch import Launch

    launch = Launch.from_flags(cfg.launch, cfg.training.mixed_precision)
    if cfg.data.data is None:
        return build_job(cfg, launch, vocab_size=cfg.vocab_size).plan()
    with open_dataset(cfg.data.data, ultra_low_mem=True) as dataset:
        job = build_job(cfg, launch, dataset)
    return job.plan()


def plan_main(argv: list[str], prog: str = f"{PROG} plan") -> int:
    """`plan [FLAGS]`: print the plan as a table (or JSON with --json=True)."""
    cfg = parse_plan_config(argv, prog)
    result = plan_from_config(cfg)
    print(json.dumps(result.to_dict(), indent=2) if cfg.json else result.table())
    return 0


def stop_main(argv: list[str]) -> int:
    """`stop OUTPUT_DIR`: every rank of the run writing OUTPUT_DIR saves and exits."""
    if len(argv) != 1 or argv[0].startswith("-"):
        print(
            f"usage: {PROG} stop OUTPUT_DIR   (signals every rank of the run writing OUTPUT_DIR "
            "on this node: each saves the state at the next step boundary and exits)"
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from trainer_low_mem.stop import stop_run

    print(stop_run(Path(argv[0])))
    return 0


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: {PROG} {{train,plan}} [FLAGS] [--debug] | {PROG} stop OUTPUT_DIR   (see "
            f"`{PROG} train --help`, `{PROG} plan --help`)"
        )
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        raise ConfigError(
            f"unknown subcommand {command!r}; choose one of "
            f"{', '.join(SUBCOMMANDS)} (`{PROG} train --help`)"
        )
    if command == "stop":
        return stop_main(rest)
    if command == "plan":
        return plan_main(rest)
    config = parse_job_config(rest)
    # A mapped shard truncated between two checks ends in SIGBUS: name the stack that read it.
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        faulthandler.enable(file=sys.__stderr__)  # no usable stderr: nothing to print to
    # Imported here so that `--help` and flag errors do not pay for torch and accelerate.
    from trainer_low_mem.distributed import report_to_launcher
    from trainer_low_mem.loop import train

    try:
        return train(config).exit_code
    except LowMemError as exc:
        report_to_launcher(exc)
        raise


def main(argv: list[str] | None = None) -> int:
    """Console entry (`train-low-mem`); returns the process exit code."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
