"""Imports of libraries that fetch compute kernels from the Hugging Face hub when imported.

bitsandbytes (which peft imports too) asks the `kernels` package for a fused CPU 4-bit matmul as
it is imported: `kernels` checks the publisher online and downloads the kernel's code. These
commands never download anything, so such imports are made with `kernels` unimportable for their
duration: bitsandbytes keeps its built-in CPU kernels and logs a warning, which
`quiet.library_noise_hidden` hides unless --debug.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from types import ModuleType

from lowmem_core.errors import require_extra

_HUB_KERNELS = "kernels"  # the package that downloads kernels from the hub


@contextlib.contextmanager
def hub_kernels_blocked() -> Iterator[None]:
    """`import kernels` fails inside the block (a None entry in sys.modules is Python's way to
    make an import fail); everything is as before afterwards."""
    absent = object()
    saved = sys.modules.get(_HUB_KERNELS, absent)
    sys.modules[_HUB_KERNELS] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if saved is absent:
            sys.modules.pop(_HUB_KERNELS, None)
        else:
            sys.modules[_HUB_KERNELS] = saved  # type: ignore[assignment]


def require_extra_offline(module_name: str, extra: str, purpose: str) -> ModuleType:
    """`errors.require_extra`, with no kernel fetched from the hub while the module imports.

    bitsandbytes is imported inside the block too when installed: a peft that imports it
    lazily (on the first quantised layer) would otherwise make its kernel lookup outside it."""
    with hub_kernels_blocked():
        module = require_extra(module_name, extra, purpose)
        if importlib.util.find_spec("bitsandbytes") is not None:
            with contextlib.suppress(ImportError):
                importlib.import_module("bitsandbytes")
        return module
