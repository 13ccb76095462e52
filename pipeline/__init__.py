"""lowmem-pipeline's data path: tokenised Arrow datasets, an exactly-once resumable loader,
numba collate, pinned prefetch, and the data path's cost model.

Names are imported lazily so that `import pipeline` (and the CLIs' error handling) does not pay
for numba, pyarrow or torch until they are used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_dataset": "pipeline.build",
    "open_dataset": "pipeline.dataset",
    "TokenDataset": "pipeline.dataset",
    "Loader": "pipeline.loader",
    "Prefetcher": "pipeline.prefetch",
    "LowMemError": "lowmem_core.errors",
    "PipelineError": "lowmem_core.errors",
    "ConfigError": "lowmem_core.errors",
    "CheckpointError": "lowmem_core.errors",
    "MemoryLimitError": "lowmem_core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
