"""numba kernels that turn a slice of the epoch's row layout into a [B, L] batch.

Small pure functions over numpy arrays, compiled with `nogil=True` so reader threads run them in
parallel. A batch is described by *segments*: runs of consecutive tokens of one document, each
with where it comes from (`seg_src`, a global token index), how many tokens (`seg_n`), where it
lands in the flat B*L output (`seg_dst`), where its document started in output coordinates
(`seg_doc0`, may be negative: positions restart at document starts), where the document's EOS
lands (`seg_eos`, -1 if outside this batch), how many of its first tokens are prompt tokens
(`seg_prompt`: label -100, no loss; prompt/response datasets only), and its document
(`seg_doc`). A document with labelled spans (multi-turn chats) gets no prompt count: every token
of it outside its spans gets label -100 (`mask_outside_spans`).
Labels are unshifted (the label at a position is the token there; the model shifts them).
Filling a batch: segments -> `emit_from_chunks` (tokens, labels and positions in one pass) ->
`finish_rows` (EOS, prompt masking, padding) -> `mask_outside_spans` (datasets with spans).
`sample_starts` lays out whole-sample packing.
Every kernel is tested against a plain numpy reference in tests/pipeline/test_collate.py.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import numba
import numpy as np

from lowmem_core.format import IGNORE_INDEX

_libc = ctypes.CDLL(None, use_errno=True)
# The buffer argument is declared as size_t so numba passes an array's data address unchanged.
_pread = _libc.pread
_pread.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int64]
_pread.restype = ctypes.c_ssize_t


class Segments(NamedTuple):
    """Scratch for one batch's segments: seven (capacity,) int64 arrays (see the module docstring).

    A reader thread keeps one and reuses it; a call fills the first `count` entries of each.
    """

    src: np.ndarray
    n: np.ndarray
    dst: np.ndarray
    doc0: np.ndarray
    eos: np.ndarray
    prompt: np.ndarray
    doc: np.ndarray

    @classmethod
    def empty(cls, capacity: int) -> Segments:
        return cls(*np.empty((7, capacity), dtype=np.int64))


@numba.njit(nogil=True, cache=True)
def sample_starts(lengths, seq_len, starts):
    """Whole-sample packing of samples (tokens then EOS) of `lengths`, in order, into rows of
    seq_len: starts[k] = flat position (row * seq_len + column) where sample k begins, starts[N] =
    one past the last EOS. A sample that does not fit in what is left of the current row starts
    on the next row; only a sample longer than a row (lengths[k] + 1 > seq_len) spans rows.
    """
    x = 0
    for k in range(lengths.shape[0]):
        size = lengths[k] + 1
        used = x % seq_len
        if used > 0 and size > seq_len - used:
            x += seq_len - used
        starts[k] = x
        x += size
    starts[lengths.shape[0]] = x


@numba.njit(nogil=True, cache=True)
def _masked(prompt_lengths, span_starts, doc, lo, hi):
    """How many of a document's tokens [lo, hi) are prompt tokens (all at the segment's start);
    0 for a document with labelled spans (`mask_outside_spans` labels those)."""
    if prompt_lengths.shape[0] == 0:
        return 0
    if span_starts.shape[0] and span_starts[doc + 1] > span_starts[doc]:
        return 0
    return max(min(hi, prompt_lengths[doc]) - lo, 0)


@numba.njit(nogil=True, cache=True)
def packing_segments(
    perm,
    cum,
    doc_starts,
    prompt_lengths,
    span_starts,
    s0,
    s1,
    seg_src,
    seg_n,
    seg_dst,
    seg_doc0,
    seg_eos,
    seg_prompt,
    seg_doc,
):
    """Segments of flat positions [s0, s1): permuted document k at cum[k], its EOS right after.

    perm: (N,) permuted document ids; cum: (N+1,) flat start of each permuted document (back to
    back in stream packing, with padding gaps in whole-sample packing). prompt_lengths: (N,)
    prompt tokens per document, or empty when no token is masked; span_starts: the dataset's
    (N+1,) span rows, or empty. Returns the segments written.
    """
    num_docs = perm.shape[0]
    k = np.searchsorted(cum, s0, side="right") - 1
    nseg = 0
    while k < num_docs and cum[k] < s1:
        doc = perm[k]
        start = doc_starts[doc]
        length = doc_starts[doc + 1] - start
        lo = min(max(s0 - cum[k], 0), length)
        hi = min(length, s1 - cum[k])
        seg_src[nseg] = start + lo
        seg_n[nseg] = max(hi - lo, 0)
        seg_dst[nseg] = cum[k] + lo - s0
        seg_doc0[nseg] = cum[k] - s0
        eos_at = cum[k] + length
        seg_eos[nseg] = eos_at - s0 if s0 <= eos_at < s1 else -1
        seg_prompt[nseg] = _masked(prompt_lengths, span_starts, doc, lo, hi)
        seg_doc[nseg] = doc
        nseg += 1
        k += 1
    return nseg


@numba.njit(nogil=True, cache=True)
def padding_segments(
    perm,
    row_cum,
    doc_starts,
    prompt_lengths,
    span_starts,
    r0,
    r1,
    seq_len,
    seg_src,
    seg_n,
    seg_dst,
    seg_doc0,
    seg_eos,
    seg_prompt,
    seg_doc,
):
    """One segment per global row in [r0, r1): piece `r - row_cum[k]` of permuted document k,
    which has ceil((len+1)/seq_len) pieces; its EOS ends the last (possibly token-less) piece."""
    k = np.searchsorted(row_cum, r0, side="right") - 1
    nseg = 0
    for r in range(r0, r1):
        while row_cum[k + 1] <= r:
            k += 1
        doc = perm[k]
        start = doc_starts[doc]
        length = doc_starts[doc + 1] - start
        offset = (r - row_cum[k]) * seq_len
        n = min(seq_len, length - offset)
        dst = (r - r0) * seq_len
        seg_src[nseg] = start + offset
        seg_n[nseg] = n
        seg_dst[nseg] = dst
        seg_doc0[nseg] = dst
        seg_eos[nseg] = dst + n if r == row_cum[k + 1] - 1 else -1
        seg_prompt[nseg] = _masked(prompt_lengths, span_starts, doc, offset, offset + n)
        seg_doc[nseg] = doc
        nseg += 1
    return nseg


@numba.njit(nogil=True, cache=True)
def emit_staged(staging, seg_n, seg_dst, seg_doc0, nseg, seq_len, ids, labels, pos):
    """`emit_from_chunks` for tokens already read into staging at their output positions (the
    ultra-low-mem reader's preads)."""
    for i in range(nseg):
        if seg_n[i]:
            d = seg_dst[i]
            _copy_segment(staging, d, d, seg_n[i], seg_doc0[i], seq_len, ids, labels, pos)


@numba.njit(nogil=True, cache=True)
def emit_from_chunks(
    chunks, first, seg_src, seg_n, seg_dst, seg_doc0, nseg, seq_len, ids, labels, pos
):
    """Copy each segment's tokens to ids and labels, with positions. chunks is a typed list of
    the chunks' token arrays, chunk c holding global tokens [first[c], first[c + 1]); one call
    covers them all, since a call per chunk cost more in dispatch than in copying once a batch
    touched tens of chunks (record batches of a large corpus)."""
    for i in range(nseg):
        n = seg_n[i]
        if n == 0:
            continue
        src = seg_src[i]
        c = np.searchsorted(first, src, side="right") - 1
        _copy_segment(
            chunks[c], src - first[c], seg_dst[i], n, seg_doc0[i], seq_len, ids, labels, pos
        )


@numba.njit(nogil=True, cache=True, inline="always")
def _copy_segment(source, s, d, n, doc0, seq_len, ids, labels, pos):
    """Tokens source[s : s + n] to output positions [d, d + n), positions restarting at each row
    start and at doc0 (the row boundary found once per row, not per token)."""
    x = d
    end = d + n
    while x < end:
        row_start = (x // seq_len) * seq_len
        stop = min(row_start + seq_len, end)
        p = x - max(row_start, doc0)
        for j in range(x, stop):
            token = source[s + j - d]
            ids[j] = token
            labels[j] = token
            pos[j] = p
            p += 1
        x = stop


@numba.njit(nogil=True)  # not cached: numba cannot cache functions that call ctypes pointers
def pread_tokens(chunk_fd, chunk_base, first, itemsize, seg_src, seg_n, seg_dst, nseg, staging):
    """pread each segment into staging[dst:dst+n] (token dtype), in one call for all chunks.

    Chunk c holds global tokens [first[c], first[c + 1]) in file `chunk_fd[c]`, global token t
    at byte chunk_base[c] + t * itemsize. Returns the bytes read, or -(c + 1) for the chunk of
    the first read that came back short.
    """
    ptr = staging.ctypes.data
    total = 0
    for i in range(nseg):
        n = seg_n[i]
        if n == 0:
            continue
        src = seg_src[i]
        c = np.searchsorted(first, src, side="right") - 1
        want = n * itemsize
        got = _pread(chunk_fd[c], ptr + seg_dst[i] * itemsize, want, chunk_base[c] + src * itemsize)
        if got != want:
            return -(c + 1)
        total += want
    return total


@numba.njit(nogil=True, cache=True)
def finish_rows(
    ids,
    labels,
    pos,
    seq_len,
    seg_n,
    seg_dst,
    seg_doc0,
    seg_eos,
    seg_prompt,
    nseg,
    eos_id,
    pad_id,
):
    """After `emit_from_chunks`: write the EOS tokens, give each segment's first seg_prompt tokens
    label -100, and pad every position no segment covers (id pad_id, label -100, position 0).
    Segments must be in output order. Returns the positions whose label is not -100.
    """
    useful = 0
    end = 0  # one past the last position written so far
    for i in range(nseg):
        d = seg_dst[i]
        n = seg_n[i]
        _pad(ids, labels, pos, end, d, pad_id)
        for x in range(d, d + seg_prompt[i]):
            labels[x] = IGNORE_INDEX
        useful += n - seg_prompt[i]
        end = max(end, d + n)
        e = seg_eos[i]
        if e >= 0:
            ids[e] = eos_id
            labels[e] = eos_id
            pos[e] = e - max((e // seq_len) * seq_len, seg_doc0[i])
            useful += 1
            end = e + 1
    _pad(ids, labels, pos, end, ids.shape[0], pad_id)
    return useful


@numba.njit(nogil=True, cache=True)
def mask_outside_spans(
    labels, doc_starts, span_starts, spans, seg_src, seg_n, seg_dst, seg_doc, nseg
):
    """After `finish_rows`: label -100 every token of a segment whose document has labelled
    spans (rows [span_starts[doc], span_starts[doc + 1]) of spans (S, 2): start and length in
    the document, in order) that lies outside them. Returns the positions unlabelled here."""
    cleared = 0
    for i in range(nseg):
        doc = seg_doc[i]
        first, last = span_starts[doc], span_starts[doc + 1]
        if first == last or seg_n[i] == 0:
            continue
        lo = seg_src[i] - doc_starts[doc]  # the segment's tokens are [lo, hi) of its document
        hi = lo + seg_n[i]
        shift = seg_dst[i] - lo  # output position of document token t: t + shift
        x = lo  # tokens before x are done
        for j in range(first, last + 1):
            gap_end = hi if j == last else min(spans[j, 0], hi)
            for t in range(x, gap_end):
                labels[t + shift] = IGNORE_INDEX
            cleared += max(gap_end - x, 0)
            if j < last:
                x = max(x, min(spans[j, 0] + spans[j, 1], hi))
            if x >= hi:
                break
    return cleared


@numba.njit(nogil=True, cache=True)
def _pad(ids, labels, pos, lo, hi, pad_id):
    for x in range(lo, hi):
        ids[x] = pad_id
        labels[x] = IGNORE_INDEX
        pos[x] = 0
