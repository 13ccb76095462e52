"""The data a throughput run reads: a synthetic token corpus or the shipped sample corpus, built
once into a dataset with the product's own build."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.config import ThroughputConfig
from lowmem_core.errors import PipelineError


def synthetic_token_lists(
    num_docs: int, seed: int, median_tokens: int, vocab_size: int
) -> pa.ListArray:
    """`num_docs` documents of uniform random token ids, lognormal lengths (sigma 1); seeded."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(median_tokens), 1.0, size=num_docs)).astype(
        np.int64
    )
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(0, vocab_size, size=int(offsets[-1]), dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def build_token_corpus(
    out: Path, num_docs: int, seed: int, median_tokens: int, docs_per_file: int = 200_000
) -> Path:
    """Build (once; cached at `out`) a synthetic corpus with the pipeline builder (byte ids)."""
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig
    from pipeline.tokenizer import BYTE_VOCAB_SIZE

    if (out / "index.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-src-") as tmp:
        inputs = []
        # Ids below 256 (plain bytes) so the byte tokenizer's specials keep their meaning.
        vocab = min(256, BYTE_VOCAB_SIZE)
        for part, first in enumerate(range(0, num_docs, docs_per_file)):
            n = min(docs_per_file, num_docs - first)
            path = Path(tmp) / f"part-{part:05d}.parquet"
            pq.write_table(
                pa.table(
                    {"input_ids": synthetic_token_lists(n, seed + part, median_tokens, vocab)}
                ),
                path,
            )
            inputs.append(path)
        build_dataset(BuildConfig(inputs=inputs, out=out, text_field="input_ids"), progress=False)
    return out


def prepare_dataset(cfg: ThroughputConfig) -> Path:
    """The dataset to benchmark: --data, a cached --synthetic corpus, or the sample corpus."""
    if cfg.data is not None:
        if not cfg.data.exists():
            raise PipelineError(
                f"--data {cfg.data} does not exist; build one with "
                "`python -m pipeline build INPUT... --out DIR`"
            )
        return cfg.data
    if cfg.synthetic is not None:
        out = (
            cfg.cache_dir
            / f"synthetic-{cfg.synthetic}-median{cfg.synthetic_median_tokens}-seed{cfg.seed}"
        )
        return build_token_corpus(out, cfg.synthetic, cfg.seed, cfg.synthetic_median_tokens)
    return build_sample_dataset(cfg.cache_dir / "sample")


def build_sample_dataset(out: Path) -> Path:
    """The shipped sample corpus, built with the byte tokenizer (cached at `out`)."""
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig
    from pipeline.sample_corpus import write_sample_corpus

    if (out / "index.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".sample-src-") as tmp:
        files = write_sample_corpus(Path(tmp))
        build_dataset(BuildConfig(inputs=[files["txt"]], out=out), progress=False)
    return out


def memory_corpus_docs(corpus_gb: float, median_tokens: int) -> int:
    """Documents for a uint16 corpus of about `corpus_gb` GB.

    The mean of lognormal(sigma=1) lengths is median * e^0.5.
    """
    mean_tokens = median_tokens * float(np.exp(0.5))
    return max(1, int(corpus_gb * 1e9 / 2 / mean_tokens))
