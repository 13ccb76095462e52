"""Encoder-decoder batches: (prompt, response) pairs packed on both sides, `PairLoader`.

Each document of a prompt/response dataset is one pair: its first `prompt_lengths[i]` tokens
feed the encoder, the rest (the response) the decoder. A global row is a pair of rows, encoder
`enc_len` (Le) tokens and decoder `dec_len` (Ld) tokens (`pair_row_lens` sizes both from the
data under one limit, --max_seq_len). Pairs are taken in the epoch's permutation order (seed,
epoch; as pipeline/sampler.py) and placed first-fit: into the first of up to PACK_WINDOW open
rows where both the prompt fits what is left of the encoder row and the decoder part what is
left of the decoder row; when none has room, the fullest open row is closed and a new one
opens. No sort, one pass of O(pairs x window); the layout is the pair ids row after row plus
where each row starts (16 B/pair, like EpochIndex). Next-fit (one open row) left rows of
responses about half the row length half empty.

A pair's encoder part is its prompt (an empty prompt is one EOS, as T5 tokenizers encode ""); its
decoder part is the decoder start token + response, labels = response + EOS (already aligned,
no shift). Truncation, as a tokenizer with `truncation=True, max_length=...` does it: a prompt
over Le keeps its first Le tokens; a response over Ld - 1 keeps its first Ld - 1 tokens and still
ends with EOS. `PairIndex` counts both (the trainer logs them).

Everything else is the Loader's: a global step takes `batch_size * world_size` consecutive rows,
rank k rows [start + k*B, start + (k+1)*B); the state is (epoch, consumed global rows), so a
loader with another world size or batch size continues from the same row; the partial last step
is padding. The kernels below are tested against numpy in tests/pipeline/test_pairs.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numba
import numpy as np
import torch

from lowmem_core.errors import CheckpointError, ConfigError, PipelineError
from lowmem_core.format import IGNORE_INDEX
from lowmem_core.stateful import Stateful
from pipeline.collate import Segments
from pipeline.loader import Batch
from pipeline.rows import BatchTask, RowSource
from pipeline.sampler import epoch_permutation

STATE_VERSION = 2  # 2 adds pack_window; a version 1 state was written by next-fit (window 1)
PACK_WINDOW = 16  # open rows of the first-fit: fuller rows than next-fit, O(pairs x window)
LENS_SAMPLE_PAIRS = 65_536  # pairs pair_row_lens lays out to choose the shorter row length
PAIR_KEYS = ("input_ids", "position_ids", "decoder_input_ids", "decoder_position_ids", "labels")
_STATE_KEYS = ("version", "epoch", "consumed_rows", "seed", "enc_len", "dec_len", "fingerprint")


@numba.njit(nogil=True, cache=True)
def pair_rows(lengths, prompt_lengths, enc_len, dec_len, window, row_of, stats):
    """First-fit of the permuted pairs into at most `window` open rows. lengths, prompt_lengths:
    (N,) int64 of the permuted pairs.

    A pair goes into the first open row where both its parts fit; if none has room, a new row
    opens, and when `window` rows are already open the fullest of them is closed for it (window
    1 is next-fit: each row is a run of consecutive pairs). Writes row_of[k] = the row of
    permuted pair k, rows numbered in the order they open, and stats = (encoder tokens, decoder
    tokens, prompts cut, responses cut); returns the number of rows.
    """
    n = lengths.shape[0]
    slot_row = np.empty(window, dtype=np.int64)
    used_e = np.zeros(window, dtype=np.int64)
    used_d = np.zeros(window, dtype=np.int64)
    open_rows = 0
    rows = 0
    for k in range(n):
        p = prompt_lengths[k]
        e = max(min(p, enc_len), 1)
        d = min(lengths[k] - p, dec_len - 1) + 1
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
        if lengths[k] - p > dec_len - 1:
            stats[3] += 1
    return rows


@numba.njit(nogil=True, cache=True)
def group_rows(perm, row_of, rows, pairs, row_starts):
    """Counting sort of the permuted pairs by row, stable: pairs = the pair ids row after row
    (each row's pairs in permutation order), row_starts[r] = index in pairs of row r's first."""
    row_starts[:] = 0
    for k in range(row_of.shape[0]):
        row_starts[row_of[k] + 1] += 1
    for r in range(rows):
        row_starts[r + 1] += row_starts[r]
    fill = row_starts[:rows].copy()
    for k in range(row_of.shape[0]):
        r = row_of[k]
        pairs[fill[r]] = perm[k]
        fill[r] += 1


@numba.njit(nogil=True, cache=True)
def pair_segments(
    pairs, row_starts, doc_starts, prompt_lengths, r0, r1, enc_len, dec_len, enc, dec
):
    """Segments of rows [r0, r1): enc[0..3] / dec[0..3] = (src, n, dst, doc0) arrays as
    collate.Segments (dst flat in the [B, L] output). A decoder segment is the response tokens,
    placed one after its pair's start token (doc0). Returns the pairs written."""
    c = 0
    for r in range(r0, r1):
        x_e = (r - r0) * enc_len
        x_d = (r - r0) * dec_len
        for k in range(row_starts[r], row_starts[r + 1]):
            doc = pairs[k]
            start = doc_starts[doc]
            p = prompt_lengths[doc]
            enc[0][c] = start
            enc[1][c] = min(p, enc_len)
            enc[2][c] = x_e
            enc[3][c] = x_e
            dec[0][c] = start + p
            dec[1][c] = min(doc_starts[doc + 1] - start - p, dec_len - 1)
            dec[2][c] = x_d + 1
            dec[3][c] = x_d
            x_e += max(enc[1][c], 1)
            x_d += dec[1][c] + 1
            c += 1
    return c


@numba.njit(nogil=True, cache=True)
def finish_pairs(
    enc_ids,
    enc_pos,
    dec_ids,
    labels,
    dec_pos,
    enc_n,
    enc_dst,
    dec_n,
    dec_dst,
    count,
    start_id,
    eos_id,
):
    """After the tokens are read: EOS for empty prompts, each pair's start token, its labels
    (response shifted left, then EOS). Returns the label tokens written."""
    useful = 0
    for i in range(count):
        if enc_n[i] == 0:
            enc_ids[enc_dst[i]] = eos_id
            enc_pos[enc_dst[i]] = 0
        d0 = dec_dst[i] - 1
        n = dec_n[i]
        dec_ids[d0] = start_id
        dec_pos[d0] = 0
        for j in range(n):
            labels[d0 + j] = dec_ids[d0 + 1 + j]
        labels[d0 + n] = eos_id
        useful += n + 1
    return useful


@dataclass(frozen=True)
class PairIndex:
    """One epoch's pair layout: pair ids row after row, and where each row starts (16 B/pair)."""

    epoch: int
    seed: int
    enc_len: int
    dec_len: int
    window: int  # open rows of the first-fit (pair_rows)
    pairs: np.ndarray  # (N,) int64 pair (document) ids in row order
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
        perm = epoch_permutation(doc_starts.size - 1, seed, epoch)
        lengths = doc_starts[perm + 1] - doc_starts[perm]  # (N,) int64, transient
        row_of = np.empty(perm.size, dtype=np.int64)
        stats = np.zeros(4, dtype=np.int64)
        rows = pair_rows(lengths, prompt_lengths[perm], enc_len, dec_len, window, row_of, stats)
        del lengths
        pairs = np.empty(perm.size, dtype=np.int64)
        row_starts = np.empty(rows + 1, dtype=np.int64)
        group_rows(perm, row_of, rows, pairs, row_starts)
        return cls(
            epoch,
            seed,
            enc_len,
            dec_len,
            window,
            pairs,
            row_starts,
            int(rows),
            *(int(s) for s in stats),
        )

    def padding_pct(self) -> tuple[float, float]:
        """(encoder, decoder) share of the epoch's row positions that are padding, in %."""
        e = 100.0 * (1 - self.enc_tokens / max(self.total_rows * self.enc_len, 1))
        d = 100.0 * (1 - self.dec_tokens / max(self.total_rows * self.dec_len, 1))
        return e, d


class _Scratch(threading.local):
    """Each reader thread's segments (encoder, decoder) and the encoder's throwaway labels."""

    def __init__(self, pairs: int, enc_positions: int):
        self.enc = Segments.empty(pairs)
        self.dec = Segments.empty(pairs)
        self.enc_labels = np.empty(enc_positions, dtype=np.int64)


class PairLoader(RowSource, Stateful):
    """This rank's encoder-decoder batches of a prompt/response `dataset` (see the module
    docstring): the Loader's interface (`len`, `steps_remaining`, `set_epoch`, iteration,
    `tasks` / `new_buffers` / `fill` / `commit` for the Prefetcher, `state_dict`), with batches
    of `PAIR_KEYS` (int64 [B, enc_len] and [B, dec_len]; position -1 at padding)."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        enc_len: int,
        dec_len: int,
        *,
        start_id: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = False,
        pack_window: int = PACK_WINDOW,
    ):
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("pack_window", pack_window, 1),
            ("enc_len", enc_len, 1),
            ("dec_len", dec_len, 2),
            ("world_size", world_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}; check the launcher")
        if dataset.prompt_lengths is None or len(dataset) == 0:
            raise PipelineError(
                f"dataset {dataset.path} holds no prompt/response pairs; build it with "
                "`python -m pipeline build --sft`"
            )
        self.dataset = dataset
        self._prompts = np.ascontiguousarray(dataset.prompt_lengths, dtype=np.int64)
        super().__init__(batch_size, rank, world_size, drop_last)
        self.enc_len, self.dec_len, self.seed, self.start_id = enc_len, dec_len, seed, start_id
        self.pack_window = pack_window
        self._index: PairIndex | None = None
        # Every pair takes at least one position of each row.
        self._scratch = _Scratch(batch_size * min(enc_len, dec_len), batch_size * enc_len)

    @property
    def index(self) -> PairIndex:
        """The current epoch's layout (its padding and truncation counts)."""
        return self._epoch_index(self._epoch)

    def _epoch_index(self, epoch: int) -> PairIndex:
        index = self._index
        if index is None or index.epoch != epoch or index.window != self.pack_window:
            self._index = PairIndex.build(
                self.dataset.doc_starts,
                self._prompts,
                self.seed,
                epoch,
                self.enc_len,
                self.dec_len,
                self.pack_window,
            )
        return self._index

    def new_buffers(self, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """Five int64 CPU tensors: encoder [B, enc_len] x 2, decoder [B, dec_len] x 3."""
        b = self.batch_size
        shapes = (self.enc_len,) * 2 + (self.dec_len,) * 3
        return {
            k: torch.empty((b, n), dtype=torch.int64, pin_memory=pin_memory)
            for k, n in zip(PAIR_KEYS, shapes, strict=True)
        }

    def fill(self, task: BatchTask, buffers: dict[str, torch.Tensor]) -> Batch:
        """Write `task`'s rows into `buffers`; thread-safe (the kernels release the GIL)."""
        v = {k: t.numpy().reshape(-1) for k, t in buffers.items()}  # flat views
        ds, s, index = self.dataset, self._scratch, task.index
        v["input_ids"].fill(ds.pad_id)
        v["decoder_input_ids"].fill(ds.pad_id)
        v["position_ids"].fill(-1)
        v["decoder_position_ids"].fill(-1)
        v["labels"].fill(IGNORE_INDEX)
        count = pair_segments(
            index.pairs,
            index.row_starts,
            ds.doc_starts,
            self._prompts,
            task.row_start,
            task.row_end,
            self.enc_len,
            self.dec_len,
            s.enc[:4],
            s.dec[:4],
        )
        if count == 0:
            return Batch(buffers, 0, 0)
        enc_labels = s.enc_labels[: v["input_ids"].size]
        ds.read_segments(s.enc, count, self.enc_len, v["input_ids"], enc_labels, v["position_ids"])
        ds.read_segments(
            s.dec,
            count,
            self.dec_len,
            v["decoder_input_ids"],
            v["labels"],
            v["decoder_position_ids"],
        )
        useful = int(
            finish_pairs(
                v["input_ids"],
                v["position_ids"],
                v["decoder_input_ids"],
                v["labels"],
                v["decoder_position_ids"],
                s.enc.n,
                s.enc.dst,
                s.dec.n,
                s.dec.dst,
                count,
                self.start_id,
                ds.eos_id,
            )
        )
        return Batch(buffers, useful, useful)

    def state_dict(self) -> dict:
        """epoch, global rows consumed in it, seed, and what the row layout depends on."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "consumed_rows": self._consumed_rows,
            "seed": self.seed,
            "enc_len": self.enc_len,
            "dec_len": self.dec_len,
            "pack_window": self.pack_window,
            "total_rows": self.index.total_rows,
            "fingerprint": self.dataset.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`'s global row; world size and batch size may differ."""
        missing = [k for k in _STATE_KEYS if k not in state] if isinstance(state, dict) else None
        if missing is None or missing or state["version"] not in (1, STATE_VERSION):
            found = f"lacks {', '.join(missing)}" if missing else "is not a pair loader state"
            raise CheckpointError(
                f"loader state {found}; resume a state written by this trainer's "
                "encoder-decoder path, or start a new run"
            )
        mine = {
            "fingerprint": self.dataset.fingerprint,
            "seed": self.seed,
            "enc_len": self.enc_len,
            "dec_len": self.dec_len,
        }
        bad = [f"{k}: state {state[k]!r}, loader {v!r}" for k, v in mine.items() if state[k] != v]
        if bad:
            raise CheckpointError(
                f"pair loader state does not match this data order ({'; '.join(bad)}); resume "
                "with the same dataset, seed and row lengths, or start a new run"
            )
        # The window decides the row layout but no buffer size: adopt the state's, so a run
        # started before first-fit packing (version 1: next-fit) resumes its own order.
        window = state.get("pack_window", 1)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise CheckpointError(f"pair loader state has pack_window {window!r}; start a new run")
        self.pack_window = window
        self._restore_position(int(state["epoch"]), int(state["consumed_rows"]), "pair loader")


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
    prompts = np.asarray(dataset.prompt_lengths, dtype=np.int64)
    lengths = np.diff(np.asarray(dataset.doc_starts, dtype=np.int64))
    enc = np.maximum(prompts, 1)  # an empty prompt is one EOS
    dec = lengths - prompts + 1  # start token + response
    if prompts.size > sample_pairs:
        pick = np.random.default_rng(0).integers(0, prompts.size, sample_pairs)
        lengths, prompts = lengths[pick], prompts[pick]
    enc_is_long = int(enc.sum()) >= int(dec.sum())
    low = _round8(min(int((dec if enc_is_long else enc).max()), max_len))
    candidates = list(range(min(low, max_len), max_len + 1, 8))
    if candidates[-1] != max_len:
        candidates.append(max_len)
    row_of = np.empty(prompts.size, dtype=np.int64)
    best: tuple[int, int, int] | None = None
    for short in candidates:
        enc_len, dec_len = (max_len, short) if enc_is_long else (short, max_len)
        rows = pair_rows(lengths, prompts, enc_len, dec_len, window, row_of, np.zeros(4, np.int64))
        positions = rows * (enc_len + dec_len)
        if best is None or positions < best[0]:
            best = (positions, enc_len, dec_len)
    return best[1], best[2]


def _round8(n: int) -> int:
    return -(-n // 8) * 8
