"""The epoch index: a seeded document order and the global row layout it implies.

For an epoch, documents are permuted by a generator seeded with (seed, epoch). The rows of the
epoch then follow from the permutation alone. Rows live in one flat space of positions
row * L + column; each layout says where each permuted document (then its EOS) starts:
- stream packing (text): the permuted documents, each followed by EOS, form one token stream;
  row r is stream positions [r*L, (r+1)*L). `cum[k]` is where permuted document k starts.
- whole-sample packing (prompt/response samples, `whole_samples`): samples (tokens + EOS) are
  placed in permutation order, each in the current row when it fits in what is left of it, else
  at the start of the next row (the rest of the row is padding). Only a sample longer than a row
  spans rows: it starts a row and continues over the next ones (positions restart at each row).
  `cum[k]` is the flat position where sample k starts (collate.sample_starts).
- padding: permuted document k fills ceil((len+1)/L) consecutive rows, its EOS ending the last
  one; `cum[k]` is its first row.
Finding row r is a binary search in `cum`, so any global row is reached in O(log N) without
replaying earlier batches. World size and batch size do not enter: they only decide which
consecutive rows a rank takes at each step (pipeline/loader.py).

Memory: the permutation and `cum` are int64, 16 bytes per document (1.6 MB for 100k documents),
built once per epoch in O(N). A keyed bijection would make the permutation itself O(1), but
packing needs each permuted document's start, a prefix sum over the permuted lengths, which is
O(N) whatever the permutation; so the permutation is stored too, and reads stay O(1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.collate import sample_starts


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
    whole_samples: bool  # packing layout: whole samples (True) or one token stream (False)
    perm: np.ndarray  # (N,) int64 permuted document ids
    cum: np.ndarray  # (N+1,) int64: flat start (packing) or first row (padding) of permuted doc k
    total_rows: int
    stream_end: int  # packing: flat position one past the epoch's last EOS; padding: unused (0)
    split_samples: int  # documents (with their EOS) spread over more than one row

    @classmethod
    def build(
        cls,
        doc_starts: np.ndarray,
        seed: int,
        epoch: int,
        seq_len: int,
        packing: bool,
        whole_samples: bool = False,
    ) -> EpochIndex:
        num_docs = doc_starts.size - 1
        perm = epoch_permutation(num_docs, seed, epoch)
        lengths = doc_starts[perm + 1] - doc_starts[perm]  # (N,) int64, transient
        cum = np.zeros(num_docs + 1, dtype=np.int64)
        stream_end = 0
        if packing and whole_samples:
            sample_starts(lengths, seq_len, cum)
        elif packing:
            np.cumsum(lengths + 1, out=cum[1:])
        else:
            np.cumsum(-(-(lengths + 1) // seq_len), out=cum[1:])
        if packing:
            stream_end = int(cum[-1])
            total_rows = -(-stream_end // seq_len)
            # A document starting at cum[k] has its EOS at cum[k] + len: split if rows differ.
            split = np.count_nonzero(cum[:-1] // seq_len != (cum[:-1] + lengths) // seq_len)
        else:
            total_rows = int(cum[-1])
            split = np.count_nonzero(lengths + 1 > seq_len)
        return cls(
            epoch,
            seed,
            seq_len,
            packing,
            packing and whole_samples,
            perm,
            cum,
            total_rows,
            stream_end,
            int(split),
        )
