"""The epoch index: a seeded document order and the global row layout it implies.

For an epoch, documents are permuted by a generator seeded with (seed, epoch). The rows of the
epoch then follow from the permutation alone:
- packing: the permuted documents, each followed by EOS, form one token stream; row r is stream
  positions [r*L, (r+1)*L). `cum[k]` is the stream position where permuted document k starts.
- padding: permuted document k fills ceil(len/L) consecutive rows; `cum[k]` is its first row.
Finding row r is a binary search in `cum`, so any global row is reached in O(log N) without
replaying earlier batches. World size and batch size do not enter: they only decide which
consecutive rows a rank takes at each step (pipeline/loader.py).

Memory: the permutation and `cum` are int64, 16 bytes per document (1.6 MB for 100k documents),
built once per epoch in O(N). A keyed bijection would make the permutation itself O(1), but
packing needs each permuted document's stream start, a prefix sum over the permuted lengths, which
is O(N) whatever the permutation; so the permutation is stored too, and reads stay O(1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_permutation(num_docs: int, seed: int, epoch: int) -> np.ndarray:
    """(num_docs,) int64 document order of `epoch`; a function of (seed, epoch) only."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(num_docs).astype(np.int64, copy=False)


@dataclass(frozen=True)
class EpochIndex:
    epoch: int
    seed: int
    seq_len: int
    packing: bool
    perm: np.ndarray  # (N,) int64 permuted document ids
    cum: np.ndarray  # (N+1,) int64: stream start (packing) or first row (padding) of permuted doc k
    total_rows: int
    total_stream_tokens: int  # packing: tokens incl. one EOS per document; padding: document tokens

    @classmethod
    def build(cls, doc_starts: np.ndarray, seed: int, epoch: int, seq_len: int, packing: bool) -> "EpochIndex":
        num_docs = doc_starts.size - 1
        perm = epoch_permutation(num_docs, seed, epoch)
        lengths = doc_starts[perm + 1] - doc_starts[perm]  # (N,) int64, transient
        cum = np.zeros(num_docs + 1, dtype=np.int64)
        if packing:
            np.cumsum(lengths + 1, out=cum[1:])
            total_tokens = int(cum[-1])
            total_rows = -(-total_tokens // seq_len)
        else:
            np.cumsum(-(-lengths // seq_len), out=cum[1:])
            total_tokens = int(lengths.sum())
            total_rows = int(cum[-1])
        return cls(epoch, seed, seq_len, packing, perm, cum, total_rows, total_tokens)
