"""Shared fixtures: datasets built from the shipped sample corpus or a generated lognormal corpus.

Tests import nothing from each other (pytest runs in importlib mode); shared helpers are fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.build import build_dataset
from pipeline.config import BuildConfig
from pipeline.sample_corpus import write_sample_corpus


@pytest.fixture(scope="session")
def sample_corpus_files(tmp_path_factory) -> dict[str, Path]:
    """The sample corpus as sample.txt and sample.jsonl (generated once per test session)."""
    return write_sample_corpus(tmp_path_factory.mktemp("sample_corpus"))


@pytest.fixture(scope="session")
def sample_dataset_dir(tmp_path_factory, sample_corpus_files) -> Path:
    """The sample corpus built with the byte tokenizer."""
    out = tmp_path_factory.mktemp("sample_ds") / "tokens"
    build_dataset(BuildConfig(inputs=[sample_corpus_files["txt"]], out=out), progress=False)
    return out


def _synthetic_token_docs(
    num_docs: int, seed: int, median_len: int, vocab_size: int
) -> list[np.ndarray]:
    """Documents of random token ids with lognormal lengths (median `median_len`, at least 1)."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(median_len), 0.8, size=num_docs).astype(np.int64))
    return [rng.integers(0, min(vocab_size, 256), size=int(n), dtype=np.int64) for n in lengths]


@pytest.fixture
def synthetic_token_docs():
    """`synthetic_token_docs(num_docs, seed, median_len, vocab_size)`: the documents `make_dataset`
    builds from the same arguments (deterministic), for tests that compare against them."""
    return _synthetic_token_docs


@pytest.fixture
def make_dataset(tmp_path):
    """Factory: build a synthetic lognormal-length corpus (byte-range token ids); return its
    folder."""
    counter = iter(range(1_000_000))

    def make(
        num_docs: int = 500, seed: int = 0, median_len: int = 60, vocab_size: int = 256
    ) -> Path:
        i = next(counter)
        docs = _synthetic_token_docs(num_docs, seed, median_len, vocab_size)
        src = tmp_path / f"synthetic-{i}.jsonl"
        with src.open("w") as fh:
            for doc in docs:
                fh.write(json.dumps({"input_ids": doc.tolist()}) + "\n")
        out = tmp_path / f"synthetic-{i}"
        build_dataset(BuildConfig(inputs=[src], out=out, text_field="input_ids"), progress=False)
        return out

    return make
