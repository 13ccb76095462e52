"""The quick-start demo's data part: sample corpus -> built dataset -> streamed batches.

Prints what a new user wants to see first: how big the data is, how fast it was built, and how
many useful tokens per second the loader delivers in both read modes.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.build import build_dataset
from pipeline.config import BuildConfig, DemoConfig
from pipeline.dataset import open_dataset
from pipeline.loader import Loader
from pipeline.sample_corpus import write_sample_corpus


def stream_tokens_per_s(
    dataset, batch_size: int, seq_len: int, seconds: float
) -> tuple[float, int]:
    """Useful tokens/s of one loader pass (stopped after `seconds`), and the batches read."""
    loader = Loader(dataset, batch_size=batch_size, seq_len=seq_len, seed=0)
    next(iter(loader))  # compile the kernels outside the timing
    useful, batches = 0, 0
    started = time.perf_counter()
    for batch in loader:
        useful += int((batch["labels"] != -100).sum())
        batches += 1
        if time.perf_counter() - started > seconds:
            break
    return useful / (time.perf_counter() - started), batches


def run_demo(cfg: DemoConfig) -> Path:
    """Generate, build and stream the sample corpus; return the dataset folder."""
    workdir = Path(cfg.workdir)
    files = write_sample_corpus(workdir / "corpus")
    out = workdir / "tokens"
    report = build_dataset(BuildConfig(inputs=[files["txt"]], out=out, overwrite=True))
    print(
        f"built {out}: {report.num_documents} documents, {report.num_tokens} tokens "
        f"in {report.seconds:.2f} s ({report.tokens_per_s / 1e6:.1f} M tokens/s)"
    )
    for ultra in (False, True):
        with open_dataset(out, ultra_low_mem=ultra) as ds:
            tokens_per_s, batches = stream_tokens_per_s(
                ds, cfg.batch_size, cfg.seq_len, seconds=2.0
            )
        mode = "ultra_low_mem" if ultra else "mmap"
        print(
            f"loader ({mode}, B={cfg.batch_size}, L={cfg.seq_len}): {tokens_per_s / 1e6:.1f} M "
            f"useful tokens/s over {batches} batches"
        )
    return out
