"""The row layout of an epoch of encoder-decoder pairs: `PairIndex`, and `pair_row_lens`.

Each document of a prompt/response dataset is one pair: its first `prompt_lengths[i]` tokens
feed the encoder, the rest (the response) the decoder. A global row is a pair of rows, encoder
`enc_len` (Le) tokens and decoder `dec_len` (Ld) tokens (`pair_row_lens` sizes both from the
data under one limit, --max_seq_len). A pair takes max(min(prompt, Le), 1) encoder positions (an
empty prompt is one EOS) and min(response, Ld - 1) + 1 decoder positions (the start token).

Pairs are taken in the epoch's permutation order (seed, epoch; as pipeline/sampler.py) and
placed first-fit: into the first of up to PACK_WINDOW open rows where both the prompt fits what
is left of the encoder row and the decoder part what is left of the decoder row; when none has
room, the fullest open row is closed and a new one opens. No sort, one pass of O(pairs x
window). Next-fit (one open row) left rows of responses about half the row length half empty.
The layout is the pair ids row after row plus where each row starts (12 B/pair). Like the
Loader's epoch index it is a file the node shares (pipeline/index_cache.py): the first rank to
need it builds it, every rank maps it. tests/pipeline/test_pairs.py checks the kernels against
plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from pipeline import index_cache
from pipeline.sampler import epoch_permutation, group_rows, perm_dtype

PACK_WINDOW = 16  # open rows of the first-fit: fuller rows than next-fit, O(pairs x window)
LENS_SAMPLE_PAIRS = 65_536  # pairs pair_row_lens lays out to choose the shorter row length


@numba.njit(nogil=True, cache=True, inline="always")
def pair_parts(doc, doc_starts, prompt_lengths, enc_len, dec_len):
    """(prompt tokens, response tokens, and of them what rows of enc_len / dec_len keep) of
    pair `doc`: the one truncation rule the layout and the batches share (a prompt keeps its
    first enc_len tokens, a response its first dec_len - 1, the start token or EOS taking one)."""
    p = np.int64(prompt_lengths[doc])
    response = doc_starts[doc + 1] - doc_starts[doc] - p
    return p, response, min(p, enc_len), min(response, dec_len - 1)


@numba.njit(nogil=True, cache=True)
def pair_rows(order, doc_starts, prompt_lengths, enc_len, dec_len, window, row_of, stats):
    """First-fit of pairs order[0], order[1], ... into at most `window` open rows. order: (N,)
    pair (document) ids, the epoch's permutation; doc_starts (D + 1,), prompt_lengths (D,) of
    the dataset, read in place (no per-pair copies: the build's transient memory is `order`
    and `row_of`).

    A pair goes into the first open row where both its parts fit; if none has room, a new row
    opens, and when `window` rows are already open the fullest of them is closed for it (window
    1 is next-fit: each row is a run of consecutive pairs). Writes row_of[k] = the row of
    order[k], rows numbered in the order they open, and stats = (encoder tokens, decoder tokens,
    prompts cut, responses cut); returns the number of rows.
    """
    n = order.shape[0]
    slot_row = np.empty(window, dtype=np.int64)
    used_e = np.zeros(window, dtype=np.int64)
    used_d = np.zeros(window, dtype=np.int64)
    open_rows = 0
    rows = 0
    for k in range(n):
        p, response, prompt_n, response_n = pair_parts(
            order[k], doc_starts, prompt_lengths, enc_len, dec_len
        )
        e = max(prompt_n, 1)  # an empty prompt is one EOS
        d = response_n + 1  # the start token
        s = -1
        for j in range(open_rows):
            if used_e[j] + e <= enc_len and used_d[j] + d <= dec_len:
                s = j
                break
        if s < 0:
            if open_rows < window:
                s = open_rows
                open_rows += 1
            else:  # close the fullest row (fill = its fuller side, compared cross-multiplied)
                s, best = 0, -1
                for j in range(window):
                    fill = max(used_e[j] * dec_len, used_d[j] * enc_len)
                    if fill > best:
                        s, best = j, fill
            slot_row[s] = rows
            rows += 1
            used_e[s] = 0
            used_d[s] = 0
        used_e[s] += e
        used_d[s] += d
        row_of[k] = slot_row[s]
        stats[0] += e
        stats[1] += d
        if p > enc_len:
            stats[2] += 1
        if response > dec_len - 1:
            stats[3] += 1
    return rows


def fill_pair_layout(
    pairs, row_starts, doc_starts, prompt_lengths, seed, epoch, enc_len, dec_len, window
) -> dict[str, int]:
    """Epoch `epoch`'s layout into pairs (N,) and row_starts (at least rows + 1 of N + 1);
    returns its scalars (PairIndex's total_rows and counts). Transient: the permutation and
    each pair's row, 8 B/pair below 2^32 pairs."""
    perm = epoch_permutation(doc_starts.size - 1, seed, epoch)
    row_of = np.empty(perm.size, dtype=perm.dtype)  # rows <= pairs: the ids' dtype holds them
    stats = np.zeros(4, dtype=np.int64)
    args = (enc_len, dec_len, window, row_of, stats)
    rows = int(pair_rows(perm, doc_starts, prompt_lengths, *args))
    group_rows(perm, row_of, rows, pairs, row_starts[: rows + 1])
    names = ("enc_tokens", "dec_tokens", "cut_prompts", "cut_responses")
    return {"total_rows": rows, **{k: int(v) for k, v in zip(names, stats, strict=True)}}


@dataclass(frozen=True)
class PairIndex:
    """One epoch's pair layout: pair ids row after row, and where each row starts (12 B/pair)."""

    epoch: int
    seed: int
    enc_len: int
    dec_len: int
    window: int  # open rows of the first-fit (pair_rows)
    pairs: np.ndarray  # (N,) pair (document) ids in row order: uint32, int64 past 2^32 pairs
    row_starts: np.ndarray  # (total_rows + 1,) int64 index into pairs of each row's first pair
    total_rows: int
    enc_tokens: int  # encoder positions holding a token, over the epoch
    dec_tokens: int  # decoder positions holding a token (= label tokens)
    cut_prompts: int  # prompts longer than enc_len, truncated
    cut_responses: int  # responses longer than dec_len - 1, truncated

    @classmethod
    def build(
        cls, doc_starts, prompt_lengths, seed, epoch, enc_len, dec_len, window=PACK_WINDOW
    ) -> PairIndex:
        """A private layout, held by this process alone."""
        n = doc_starts.size - 1
        pairs = np.empty(n, dtype=perm_dtype(n))
        row_starts = np.empty(n + 1, dtype=np.int64)
        args = (doc_starts, prompt_lengths, seed, epoch, enc_len, dec_len, window)
        scalars = fill_pair_layout(pairs, row_starts, *args)
        row_starts = row_starts[: scalars["total_rows"] + 1].copy()
        return cls(epoch, seed, enc_len, dec_len, window, pairs, row_starts, **scalars)

    @classmethod
    def shared(
        cls, folder, fingerprint, doc_starts, prompt_lengths, seed, epoch, enc_len, dec_len, window
    ) -> PairIndex:
        """The layout in the node's index file (pipeline/index_cache.py), built by the first
        process that needs it and mapped read-only by every rank."""
        n = doc_starts.size - 1
        stem = f"pairs-{fingerprint}-s{seed}-E{enc_len}-D{dec_len}-w{window}"
        key = {
            "kind": "pairs",
            "fingerprint": fingerprint,
            "num_docs": n,
            "seed": seed,
            "epoch": epoch,
            "enc_len": enc_len,
            "dec_len": dec_len,
            "window": window,
        }
        fields = [("pairs", perm_dtype(n), n), ("row_starts", np.dtype(np.int64), n + 1)]

        def write(arrays: dict[str, np.ndarray]) -> dict:
            args = (doc_starts, prompt_lengths, seed, epoch, enc_len, dec_len, window)
            scalars = fill_pair_layout(arrays["pairs"], arrays["row_starts"], *args)
            # The build read every offset and prompt length: hand those pages back so this rank
            # keeps no more of them resident than the ranks that only mapped the file.
            index_cache.release_pages(doc_starts)
            index_cache.release_pages(prompt_lengths)
            return scalars

        arrays, scalars = index_cache.epoch_file(folder, stem, epoch, key, fields, write)
        scalars = {k: int(v) for k, v in scalars.items()}
        row_starts = arrays["row_starts"][: scalars["total_rows"] + 1]
        return cls(epoch, seed, enc_len, dec_len, window, arrays["pairs"], row_starts, **scalars)

    def padding_pct(self) -> tuple[float, float]:
        """(encoder, decoder) share of the epoch's row positions that are padding, in %."""
        e = 100.0 * (1 - self.enc_tokens / max(self.total_rows * self.enc_len, 1))
        d = 100.0 * (1 - self.dec_tokens / max(self.total_rows * self.dec_len, 1))
        return e, d


def pair_row_lens(
    dataset, max_len: int, window: int = PACK_WINDOW, sample_pairs: int = LENS_SAMPLE_PAIRS
) -> tuple[int, int]:
    """(enc_len, dec_len) for rows of at most `max_len` tokens: the side holding more tokens over
    the dataset (prompts; or responses + 1) gets max_len. The other side's length is the
    multiple of 8 whose first-fit layout needs the fewest positions, rows x (enc_len + dec_len),
    on `sample_pairs` pairs drawn with a fixed seed; never less than its longest item (up to
    max_len), so only what exceeds max_len is ever truncated. Proportional sizing (the short
    side's share of max_len) left one side's rows short of room where items come in lumps,
    e.g. two prompts of 20 in rows of 40. A function of the data alone, hence the same on
    every rank; about 1 ms per candidate (sample_pairs x window steps), 0.2 s at max_len 2048."""
    starts, prompts = dataset.doc_starts, dataset.prompt_lengths
    enc_sum, dec_sum, enc_max, dec_max = (int(x) for x in _side_totals(starts, prompts))
    order = (
        np.random.default_rng(0).integers(0, len(prompts), sample_pairs)
        if len(prompts) > sample_pairs
        else np.arange(len(prompts))
    )
    enc_is_long = enc_sum >= dec_sum
    low = _round8(min(dec_max if enc_is_long else enc_max, max_len))
    candidates = list(range(min(low, max_len), max_len + 1, 8))
    if candidates[-1] != max_len:
        candidates.append(max_len)
    row_of = np.empty(order.size, dtype=np.int64)
    best: tuple[int, int, int] | None = None
    for short in candidates:
        enc_len, dec_len = (max_len, short) if enc_is_long else (short, max_len)
        args = (enc_len, dec_len, window, row_of, np.zeros(4, np.int64))
        rows = pair_rows(order, starts, prompts, *args)
        positions = rows * (enc_len + dec_len)
        if best is None or positions < best[0]:
            best = (positions, enc_len, dec_len)
    return best[1], best[2]


@numba.njit(nogil=True, cache=True)
def _side_totals(doc_starts, prompt_lengths):
    """(encoder tokens, decoder tokens, longest encoder part, longest decoder part) over all
    pairs, untruncated: an empty prompt is one EOS, a decoder part is start token + response."""
    enc_sum = dec_sum = enc_max = dec_max = 0
    for i in range(prompt_lengths.shape[0]):
        p = np.int64(prompt_lengths[i])
        e = max(p, 1)
        d = doc_starts[i + 1] - doc_starts[i] - p + 1
        enc_sum += e
        dec_sum += d
        enc_max = max(enc_max, e)
        dec_max = max(dec_max, d)
    return enc_sum, dec_sum, enc_max, dec_max


def _round8(n: int) -> int:
    return -(-n // 8) * 8
