"""Fixtures of the data-path tests: a prompt/response view of a generated dataset."""

from __future__ import annotations

import numpy as np
import pytest

SFT_DOCS, SFT_SEED, SFT_MEDIAN = 300, 7, 40


@pytest.fixture
def sft(make_dataset, synthetic_token_docs):
    """(documents, prompt lengths, dataset folder) of SFT_DOCS generated documents: prompts of
    0..len tokens, every fifth empty, every fifth from the second the whole document (an empty
    response: only its EOS is labelled)."""
    docs = synthetic_token_docs(SFT_DOCS, SFT_SEED, SFT_MEDIAN, 256)
    rng = np.random.default_rng(1)
    lengths = np.array([len(d) for d in docs])
    prompts = rng.integers(0, lengths + 1)
    prompts[::5], prompts[1::5] = 0, lengths[1::5]
    return docs, prompts.astype(np.int64), make_dataset(SFT_DOCS, SFT_SEED, SFT_MEDIAN)
