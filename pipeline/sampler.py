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
  `cum[k]` is the flat position where sample k starts (as collate.sample_starts lays it out).
- padding: permuted document k fills ceil((len+1)/L) consecutive rows, its EOS ending the last
  one; `cum[k]` is its first row.
Finding row r is a binary search in `cum`, so any global row is reached in O(log N) without
replaying earlier batches. World size and batch size do not enter: they only decide which
consecutive rows a rank takes at each step (pipeline/loader.py).

Memory: the permutation is uint32 below 2^32 documents (int64 above) and `cum` int64, 12 bytes
per document, built in O(N) straight into the caller's arrays (`fill_epoch_index`): the loader
passes the pages of a file every rank maps (pipeline/index_cache.py), so a node holds one copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np

LAYOUTS = ("stream", "samples", "rows")  # stream packing, whole-sample packing, padding rows
_FILL_CHUNK = 1 << 16  # ids written per arange step while the permutation is filled
_GATHER_BLOCK = 4096  # documents whose lengths layout_starts reads ahead of its scan
_LAYOUT_SLICE = 1 << 20  # documents laid out between two hand-backs of the written pages


def layout_name(packing: bool, whole_samples: bool) -> str:
    """The layout's name in LAYOUTS (part of an index file's key)."""
    return LAYOUTS[2 if not packing else 1 if whole_samples else 0]


def perm_dtype(num_docs: int) -> np.dtype:
    """uint32 document ids while they fit, int64 beyond."""
    return np.dtype(np.uint32 if num_docs < 1 << 32 else np.int64)


def _generator(seed: int, epoch: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))


def epoch_permutation(num_docs: int, seed: int, epoch: int) -> np.ndarray:
    """(num_docs,) int64 document order of `epoch`; a function of (seed, epoch) only."""
    return _generator(seed, epoch).permutation(num_docs).astype(np.int64, copy=False)


def fill_permutation(out: np.ndarray, seed: int, epoch: int) -> None:
    """Write `epoch_permutation(out.size, seed, epoch)` into `out` (any integer dtype that holds
    the ids), in place: numpy's Fisher-Yates shuffle, step for step (`Generator.shuffle` draws j
    for i = n-1 .. 1 with `random_interval`: masked 32-bit halves of the 64-bit draws below 2^32,
    whole draws above, rejecting values over i), but a block of swap targets is drawn first and
    touched before the swaps, so their cache misses overlap (5x faster at 100M)."""
    for lo in range(0, out.size, _FILL_CHUNK):
        hi = min(lo + _FILL_CHUNK, out.size)
        out[lo:hi] = np.arange(lo, hi, dtype=out.dtype)
    bitgen = _generator(seed, epoch).bit_generator
    targets = np.empty(_GATHER_BLOCK, dtype=np.uint64)
    raw, has_half, half = np.empty(0, dtype=np.uint64), False, 0
    i = out.size - 1
    while i >= 1:
        count = min(_GATHER_BLOCK, i)
        done = 0
        while done < count:
            if raw.size == 0:
                raw = bitgen.random_raw(2 * _GATHER_BLOCK + 64)
            args = (raw, has_half, np.uint64(half), i - done, count - done, targets[done:])
            used, has_half, half, got = _swap_targets(*args)
            raw, has_half, done = raw[used:], bool(has_half), done + got
        _swap(out, i, targets, count)
        i -= count


@numba.njit(nogil=True, cache=True)
def _swap_targets(raw, has_half, half, i, count, targets):
    """targets[k] = numpy's random_interval(i - k) for k < count, from raw 64-bit draws (and a
    32-bit half left over from the last call). Returns (draws used, has_half, half, steps done):
    fewer steps than count when the draws run out."""
    r = 0
    for k in range(count):
        top = np.uint64(i - k)
        mask = top
        for shift in (1, 2, 4, 8, 16, 32):
            mask |= mask >> np.uint64(shift)
        while True:
            if top <= np.uint64(0xFFFFFFFF):
                if has_half:
                    has_half = False
                    value = half
                else:
                    if r == raw.shape[0]:
                        return r, has_half, half, k
                    draw = raw[r]
                    r += 1
                    has_half = True
                    half = draw >> np.uint64(32)
                    value = draw & np.uint64(0xFFFFFFFF)
            else:
                if r == raw.shape[0]:
                    return r, has_half, half, k
                value = raw[r]
                r += 1
            value &= mask
            if value <= top:
                break
        targets[k] = value
    return r, has_half, half, count


@numba.njit(nogil=True, cache=True)
def _swap(perm, i, targets, count):
    """Fisher-Yates steps i, i-1, ..., i-count+1: swap perm[i-k] with perm[targets[k]]."""
    touched = 0
    for k in range(count):
        touched += perm[targets[k]]  # every target's cache line requested before the swaps
    for k in range(count):
        j = targets[k]
        kept = perm[i - k]
        perm[i - k] = perm[j]
        perm[j] = kept
    return touched


@numba.njit(nogil=True, cache=True)
def layout_starts(perm, doc_starts, seq_len, layout, cum, start=0):
    """cum[k] = start of permuted document k in `layout` (0 stream, 1 whole samples: flat
    positions; 2 padding: first row), cum[N] = one past the end, the first document placed at
    `start` (where an earlier slice of the permutation ended). Returns the documents (with
    their EOS) spread over more than one row. perm: (N,) ids; doc_starts: (D+1,) int64.

    The random reads of doc_starts go first, a block at a time, in a loop of their own: with
    nothing else in it the CPU keeps many of those cache misses in flight (3-4x faster at 100M).
    """
    lengths = np.empty(_GATHER_BLOCK, dtype=np.int64)
    x = start
    split = 0
    for k0 in range(0, perm.shape[0], _GATHER_BLOCK):
        m = min(_GATHER_BLOCK, perm.shape[0] - k0)
        for j in range(m):
            doc = perm[k0 + j]
            lengths[j] = doc_starts[doc + 1] - doc_starts[doc]
        for j in range(m):
            length = lengths[j]
            size = length + 1
            if layout == 2:
                cum[k0 + j] = x
                x += (size + seq_len - 1) // seq_len
                if size > seq_len:
                    split += 1
                continue
            used = x % seq_len
            if layout == 1 and used > 0 and size > seq_len - used:
                x += seq_len - used
            cum[k0 + j] = x
            if x // seq_len != (x + length) // seq_len:
                split += 1
            x += size
    cum[perm.shape[0]] = x
    return split


def fill_epoch_index(
    perm: np.ndarray,
    cum: np.ndarray,
    doc_starts: np.ndarray,
    seed: int,
    epoch: int,
    seq_len: int,
    packing: bool,
    whole_samples: bool,
    release: Callable[[np.ndarray], None] | None = None,
) -> dict[str, int]:
    """Write epoch `epoch`'s permutation into `perm` (N,) and its layout into `cum` (N+1,) int64;
    return the index's scalars (total_rows, stream_end, split_samples). `release(array)`, when
    given, hands back the pages of a mapped array written so far: the layout goes a slice at a
    time, so that only the permutation (during the shuffle) is resident all at once."""
    release = release or (lambda array: None)
    fill_permutation(perm, seed, epoch)
    release(perm)
    layout = LAYOUTS.index(layout_name(packing, whole_samples))
    split = 0
    for lo in range(0, perm.size, _LAYOUT_SLICE):
        hi = min(lo + _LAYOUT_SLICE, perm.size)
        start = int(cum[lo]) if lo else 0
        split += int(
            layout_starts(perm[lo:hi], doc_starts, seq_len, layout, cum[lo : hi + 1], start)
        )
        release(perm)
        release(cum)
    if perm.size == 0:
        cum[0] = 0
    end = int(cum[-1])
    if packing:
        return {"total_rows": -(-end // seq_len), "stream_end": end, "split_samples": split}
    return {"total_rows": end, "stream_end": 0, "split_samples": split}


@dataclass(frozen=True)
class EpochIndex:
    epoch: int
    seed: int
    seq_len: int
    packing: bool
    whole_samples: bool  # packing layout: whole samples (True) or one token stream (False)
    perm: np.ndarray  # (N,) uint32 (int64 from 2^32 documents) permuted document ids
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
        """This process's own copy (the loader maps a shared one: pipeline/index_cache.py)."""
        num_docs = doc_starts.size - 1
        perm = np.empty(num_docs, dtype=perm_dtype(num_docs))
        cum = np.empty(num_docs + 1, dtype=np.int64)
        scalars = fill_epoch_index(
            perm, cum, doc_starts, seed, epoch, seq_len, packing, whole_samples
        )
        return cls(epoch, seed, seq_len, packing, packing and whole_samples, perm, cum, **scalars)
