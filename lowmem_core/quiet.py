"""Library noise kept off the console: what transformers, huggingface_hub, accelerate and
DeepSpeed print that a user of these commands cannot act on.

That is deprecation notices (`FutureWarning`, `DeprecationWarning`: the libraries' own API
changes), transformers' logs below errors and its progress bars ("Loading weights", "Writing
model shards"), and the warnings and notices of accelerate and DeepSpeed (DeepSpeed's "Setting
accelerator to CPU" is printed whenever it is imported on a machine without a GPU, DeepSpeed in
use or not), and bitsandbytes' warning that it keeps its built-in CPU kernels (the hub's are
never fetched: hub_kernels.py). Errors still show, and so do our own messages and other
warnings. `run_cli` hides the noise unless `--debug` (or LOWMEM_DEBUG=1) is given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

# Read by the libraries when they are imported: a user's own setting is kept.
NOISE_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
# accelerate and bitsandbytes log through child loggers that take the parent's level; DeepSpeed
# sets the level of its one logger when it is imported, so a filter on that logger is what stays.
LEVELLED_LOGGERS = ("accelerate", "bitsandbytes")
FILTERED_LOGGERS = ("DeepSpeed",)


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def library_noise_hidden() -> Iterator[None]:
    """Hide the libraries' notices for the duration (see the module docstring); everything is
    as before afterwards, except what a library read while imported inside."""
    saved_env = {name: os.environ.get(name) for name in NOISE_ENV}
    levelled = [logging.getLogger(name) for name in LEVELLED_LOGGERS]
    saved_levels = [logger.level for logger in levelled]
    errors_only = _ErrorsOnly()
    filtered = [logging.getLogger(name) for name in FILTERED_LOGGERS]
    for name, value in NOISE_ENV.items():
        os.environ.setdefault(name, value)
    for logger in levelled:
        logger.setLevel(logging.ERROR)
    for logger in filtered:
        logger.addFilter(errors_only)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger in filtered:
            logger.removeFilter(errors_only)
        for logger, level in zip(levelled, saved_levels, strict=True):
            logger.setLevel(level)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
