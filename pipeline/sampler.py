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
- best-fit packing (prompt/response samples, the default for them; `bestfit`): the permutation
  is cut into windows of BEST_FIT_WINDOW samples; within a window samples are placed longest
  first into the open row with the least room that fits them (best-fit decreasing), a new row
  opening when none has room, and the window's rows then follow each other in a seeded order.
  A sample longer than a row starts a row and continues over the next ones; its last row takes
  other samples. `perm` then lists the samples in row order (each row's longest first) and
  `cum[k]` is the flat position of perm[k], so the batches are read exactly as in `samples`.
  The window keeps the build's memory O(window) and the data order shuffled at its scale;
  what padding is left is where the window's remaining samples were all too long for a gap.
- padding: permuted document k fills ceil((len+1)/L) consecutive rows, its EOS ending the last
  one; `cum[k]` is its first row.
Finding row r is a binary search in `cum`, so any global row is reached in O(log N) without
replaying earlier batches. World size and batch size do not enter: they only decide which
consecutive rows a rank takes at each step (pipeline/loader.py).

Memory: the permutation is uint32 below 2^32 documents (int64 above) and `cum` int64, 12 bytes
per document, built in O(N) straight into the caller's arrays (`fill_epoch_index`): the loader
passes the pages of a file every rank maps (pipeline/index_cache.py), so a node holds one copy.
Best-fit adds O(window) scratch and O(N (log window + log L)) time: a sort per window, and the
row with the least room found in a tree of counts per room (about 0.35 us per sample).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np

# stream packing, whole samples in permutation order (next-fit), padding rows, best-fit packing.
LAYOUTS = ("stream", "samples", "rows", "bestfit")
BEST_FIT_WINDOW = 8192  # samples per best-fit window: its rows and its shuffle stay within it
_FILL_CHUNK = 1 << 16  # ids written per arange step while the permutation is filled
_GATHER_BLOCK = 4096  # documents whose lengths layout_starts reads ahead of its scan
_LAYOUT_SLICE = 1 << 20  # documents laid out between two hand-backs of the written pages


def layout_name(packing: bool, whole_samples: bool) -> str:
    """The default layout (a name in LAYOUTS, part of an index file's key): padding rows, one
    token stream, or best-fit packing of whole samples (`samples`, their next-fit placement in
    permutation order, is read only for runs that started with it)."""
    return "rows" if not packing else "bestfit" if whole_samples else "stream"


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


@numba.njit(nogil=True, cache=True, inline="always")
def _mix(x):
    """splitmix64's finaliser: a well-spread uint64 from any uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(nogil=True, cache=True)
def unit_keys(key, window, count, out):
    """out[u] = the sort key of row unit u of best-fit window `window`: the units of a window
    follow each other in the order of these keys (a seeded shuffle, drawn without a generator
    so the build needs no state between windows)."""
    base = _mix(key + np.uint64(window) * np.uint64(0x9E3779B97F4A7C15))
    for u in range(count):
        out[u] = _mix(base + np.uint64(u))


@numba.njit(nogil=True, cache=True, inline="always")
def _tree_add(tree, leaves, room, delta):
    i = room + leaves
    while i >= 1:
        tree[i] += delta
        i >>= 1


@numba.njit(nogil=True, cache=True, inline="always")
def _least_room(tree, leaves, size):
    """The smallest room >= size that some open row has (tree: counts per room, summed up a
    binary tree of `leaves` leaves), or -1."""
    i = size + leaves
    while tree[i] == 0:
        while i & 1:  # a right child: the next rooms are right of its parent
            i >>= 1
        if i == 0:
            return -1
        i += 1
    while i < leaves:
        i = 2 * i if tree[2 * i] > 0 else 2 * i + 1
    return i - leaves


@numba.njit(nogil=True, cache=True)
def best_fit_units(sizes, seq_len, unit_of, tree, head, below):
    """Best-fit decreasing of `sizes` (samples' tokens + EOS, sorted longest first) into rows of
    seq_len: unit_of[j] = the row unit of sample j; returns the number of units. A unit is one
    row, or the rows of a sample longer than a row (the others share its last row). A sample
    goes into the open row with the least room that fits it, among those with equal room the one
    that got it last; when none fits it opens a new unit. Scratch: tree (2 * leaves,) with
    leaves a power of two > seq_len, head (seq_len + 1,), below (sizes.size,), all int64."""
    leaves = tree.shape[0] // 2
    tree[:] = 0
    head[:] = -1  # head[room]: the open row with that room that got it last; below: the next
    units = 0
    for j in range(sizes.shape[0]):
        size = sizes[j]
        room = _least_room(tree, leaves, size) if size < seq_len else -1
        if room < 0:
            u = units
            units += 1
            left = (seq_len - size % seq_len) % seq_len
        else:
            u = head[room]
            head[room] = below[u]
            _tree_add(tree, leaves, room, -1)
            left = room - size
        unit_of[j] = u
        if left > 0:
            below[u] = head[left]
            head[left] = u
            _tree_add(tree, leaves, left, 1)
    return units


@numba.njit(nogil=True, cache=True)
def best_fit_window(ids, doc_starts, seq_len, key, window, out, cum, start, tree, head):
    """Lay out one best-fit window: ids (m,) the window's document ids in permutation order.
    Writes out[t] = the t-th sample in row order and cum[t] its flat position, the window's
    first row starting at flat position `start` (a row start); returns (flat end, samples longer
    than a row). Rows follow in the order of `unit_keys`, each unit's samples longest first."""
    m = ids.shape[0]
    sizes = np.empty(m, dtype=np.int64)
    for j in range(m):
        sizes[j] = doc_starts[ids[j] + 1] - doc_starts[ids[j]] + 1
    order = np.argsort(-sizes, kind="mergesort")  # longest first, ties in permutation order
    sorted_sizes = sizes[order]
    unit_of = np.empty(m, dtype=np.int64)
    units = best_fit_units(sorted_sizes, seq_len, unit_of, tree, head, np.empty(m, np.int64))
    keys = np.empty(units, dtype=np.uint64)
    unit_keys(key, window, units, keys)
    rank = np.empty(units, dtype=np.int64)
    rank[np.argsort(keys, kind="mergesort")] = np.arange(units)
    place = np.empty(m, dtype=np.int64)
    for j in range(m):
        place[j] = rank[unit_of[j]]
    grouped = np.empty(m, dtype=np.int64)
    unit_starts = np.empty(units + 1, dtype=np.int64)
    group_rows(np.arange(m), place, units, grouped, unit_starts)
    x = start
    split = 0
    for u in range(units):
        at = x
        for t in range(unit_starts[u], unit_starts[u + 1]):
            j = grouped[t]
            out[t] = ids[order[j]]
            cum[t] = at
            at += sorted_sizes[j]
            if sorted_sizes[j] > seq_len:
                split += 1
        x += -(-(at - x) // seq_len) * seq_len
    return x, split


@numba.njit(nogil=True, cache=True)
def group_rows(perm, row_of, rows, pairs, row_starts):
    """Counting sort of the permuted items by row, stable: pairs = the item ids row after row
    (each row's items in `perm` order), row_starts[r] = index in pairs of row r's first."""
    row_starts[:] = 0
    for k in range(row_of.shape[0]):
        row_starts[row_of[k] + 1] += 1
    for r in range(rows):
        row_starts[r + 1] += row_starts[r]
    # row_starts[r] serves as row r's cursor, ending at row r + 1's start; shifted back below
    # (no cursor array: the layout's build holds no more than the permutation and row_of).
    for k in range(row_of.shape[0]):
        r = row_of[k]
        pairs[row_starts[r]] = perm[k]
        row_starts[r] += 1
    for r in range(rows, 0, -1):
        row_starts[r] = row_starts[r - 1]
    row_starts[0] = 0


def best_fit_key(seed: int, epoch: int) -> np.uint64:
    """The uint64 that seeds the order of best-fit rows of (seed, epoch) (unit_keys); drawn
    from a child of the permutation's seed sequence, so the two are independent."""
    sequence = np.random.SeedSequence([seed, epoch], spawn_key=(1,))
    return sequence.generate_state(1, np.uint64)[0]  # numpy's, so numba types it uint64


def _best_fit_slice(perm, cum, doc_starts, seq_len, key, first_window, start, window) -> int:
    """Lay out the windows of perm (a slice of whole windows, the first numbered
    first_window) into perm (reordered in place) and cum; returns the samples longer than a
    row."""
    leaves = 1 << int(seq_len).bit_length()  # a power of two > seq_len
    tree = np.empty(2 * leaves, dtype=np.int64)
    head = np.empty(seq_len + 1, dtype=np.int64)
    split = 0
    for w, lo in enumerate(range(0, perm.size, window)):
        hi = min(lo + window, perm.size)
        ids = perm[lo:hi].copy()
        args = (seq_len, key, first_window + w, perm[lo:hi], cum[lo:hi], start, tree, head)
        start, got = best_fit_window(ids, doc_starts, *args)
        split += int(got)
    cum[perm.size] = start
    return split


def fill_epoch_index(
    perm: np.ndarray,
    cum: np.ndarray,
    doc_starts: np.ndarray,
    seed: int,
    epoch: int,
    seq_len: int,
    layout: str,
    release: Callable[[np.ndarray], None] | None = None,
) -> dict[str, int]:
    """Write epoch `epoch`'s permutation into `perm` (N,) and its `layout` (a name in LAYOUTS)
    into `cum` (N+1,) int64; return the index's scalars (total_rows, stream_end,
    split_samples). `release(array)`, when given, hands back the pages of a mapped array written
    so far: the layout goes a slice at a time, so that only the permutation (during the
    shuffle) is resident all at once. Best-fit reorders each window of `perm` into row order."""
    release = release or (lambda array: None)
    fill_permutation(perm, seed, epoch)
    release(perm)
    code = LAYOUTS.index(layout)
    best_fit = layout == "bestfit"
    step = max(_LAYOUT_SLICE // BEST_FIT_WINDOW, 1) * BEST_FIT_WINDOW if best_fit else _LAYOUT_SLICE
    key = best_fit_key(seed, epoch) if best_fit else np.uint64(0)
    split = 0
    for lo in range(0, perm.size, step):
        hi = min(lo + step, perm.size)
        start = int(cum[lo]) if lo else 0
        part, part_cum = perm[lo:hi], cum[lo : hi + 1]
        if best_fit:
            window = lo // BEST_FIT_WINDOW
            args = (doc_starts, seq_len, key, window, start, BEST_FIT_WINDOW)
            split += _best_fit_slice(part, part_cum, *args)
        else:
            split += int(layout_starts(part, doc_starts, seq_len, code, part_cum, start))
        release(perm)
        release(cum)
    if perm.size == 0:
        cum[0] = 0
    end = int(cum[-1])
    if layout != "rows":
        return {"total_rows": -(-end // seq_len), "stream_end": end, "split_samples": split}
    return {"total_rows": end, "stream_end": 0, "split_samples": split}


@dataclass(frozen=True)
class EpochIndex:
    epoch: int
    seed: int
    seq_len: int
    layout: str  # a name in LAYOUTS
    perm: np.ndarray  # (N,) uint32 (int64 from 2^32 documents) document ids in layout order
    cum: np.ndarray  # (N+1,) int64: flat start (packing) or first row (padding) of perm[k]
    total_rows: int
    stream_end: int  # packing: flat position one past the epoch's last EOS; padding: unused (0)
    split_samples: int  # documents (with their EOS) spread over more than one row

    @property
    def packing(self) -> bool:
        return self.layout != "rows"

    @property
    def whole_samples(self) -> bool:
        """Whether every sample that fits in a row lies within one."""
        return self.layout in ("samples", "bestfit")

    @classmethod
    def build(
        cls, doc_starts: np.ndarray, seed: int, epoch: int, seq_len: int, layout: str
    ) -> EpochIndex:
        """This process's own copy (the loader maps a shared one: pipeline/index_cache.py)."""
        num_docs = doc_starts.size - 1
        perm = np.empty(num_docs, dtype=perm_dtype(num_docs))
        cum = np.empty(num_docs + 1, dtype=np.int64)
        scalars = fill_epoch_index(perm, cum, doc_starts, seed, epoch, seq_len, layout)
        return cls(epoch, seed, seq_len, layout, perm, cum, **scalars)
