"""Command line of the trainer: parse `train` flags into a `JobConfig` and run the loop.

`train_low_mem.py` and the `train-low-mem` console script both call `main`. Flags are generated
from `trainer_low_mem.config` by tyro: flat names with underscores, booleans given as values
(`--is_keep_training=True`, `--auto_plan False`), as the seed's users type them.
"""

from __future__ import annotations

import sys

import tyro

from lowmem_core.errors import ConfigError, run_cli
from trainer_low_mem.config import JobConfig

PROG = "train_low_mem.py"
_TYRO_MARKERS = (tyro.conf.OmitArgPrefixes, tyro.conf.FlagConversionOff)


def parse_job_config(argv: list[str]) -> JobConfig:
    """Parse the flags of the `train` subcommand (without the word `train`) into a JobConfig."""
    return tyro.cli(JobConfig, args=argv, prog=f"{PROG} train", use_underscores=True,
                    config=_TYRO_MARKERS, description=JobConfig.__doc__)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} train [FLAGS]   (see `{PROG} train --help`)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "train":
        raise ConfigError(f"unknown subcommand {command!r}; the trainer has one: `{PROG} train --help`")
    config = parse_job_config(rest)
    # Imported here so that `--help` and flag errors do not pay for torch and accelerate.
    from trainer_low_mem.loop import train

    return train(config).exit_code


def main(argv: list[str] | None = None) -> int:
    """Console entry (`train-low-mem`); returns the process exit code."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
