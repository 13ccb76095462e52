"""The project's one exception hierarchy, and the CLI wrapper that turns it into one line.

Every error a user can cause (bad input, impossible config, broken checkpoint, memory limit,
diverged training) is raised as a subclass of `LowMemError` with a message that says what was
expected, what was found and what to do. Entry points call `run_cli` so the user sees that one
line and its class's `exit_code`, and the traceback only with `--debug`; the libraries'
notices are hidden unless `--debug` too (lowmem_core/quiet.py).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from types import ModuleType

from lowmem_core.quiet import library_noise_hidden

DEBUG_HELP = (
    "On an error, print the full traceback; also show the libraries' warnings, notices and "
    "progress bars (hidden otherwise). LOWMEM_DEBUG=1 does the same."
)


class LowMemError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 2


class PipelineError(LowMemError):
    """Bad data input or dataset: missing/corrupt files, wrong column type, empty corpus."""


class ConfigError(LowMemError):
    """An impossible or inconsistent configuration (sizes, world size, presets, launch config)."""


class CheckpointError(LowMemError):
    """A checkpoint that is missing, incomplete, corrupt, or from another model/dataset."""


class MemoryLimitError(LowMemError):
    """The host-RAM or GPU budget cannot hold what was asked for."""

    exit_code = 3


class DivergenceError(LowMemError):
    """Training diverged: too many consecutive steps with a non-finite loss or gradient norm."""

    exit_code = 4


class RankLostError(LowMemError):
    """Another rank of the job died mid-run (its process or its node), so a collective failed."""


class StoppedError(LowMemError):
    """A stop signal (SIGINT, SIGTERM) ended the job where it could not save first: during
    start-up, or while another rank had already gone. The exit code is the signal's (130, 143)."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def require_extra(module_name: str, extra: str, purpose: str) -> ModuleType:
    """Import `module_name` (e.g. "deepspeed.ops.adam"), or raise ConfigError in one line:
    "`purpose` needs the `package` package: pip install 'lowmem-pipeline[extra]'".

    Only the package itself being absent is reported so; an installed package that fails to
    import raises its own error.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        package = module_name.partition(".")[0]
        if exc.name is not None and exc.name.partition(".")[0] != package:
            raise
        raise ConfigError(
            f"{purpose} needs the `{package}` package: pip install 'lowmem-pipeline[{extra}]'"
        ) from None


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run `main(argv)`; print a LowMemError as one line and return its exit code.

    `--debug` anywhere in argv (or LOWMEM_DEBUG=1) prints the full traceback and leaves the
    libraries' notices on (DEBUG_HELP says so in the commands' help).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LOWMEM_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        with contextlib.nullcontext() if debug else library_noise_hidden():
            return int(main(argv) or 0)
    except LowMemError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
