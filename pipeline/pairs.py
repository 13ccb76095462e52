"""Encoder-decoder batches of (prompt, response) pairs, `PairLoader`.

The rows come from the epoch's layout (pipeline/pair_layout.py: pairs packed first-fit into
encoder rows of `enc_len` and decoder rows of `dec_len` tokens). A pair's encoder part is its
prompt (an empty prompt is one EOS, as T5 tokenizers encode ""); its decoder part is the decoder
start token + response, labels = response + EOS (already aligned, no shift). Truncation, as a
tokenizer with `truncation=True, max_length=...` does it: a prompt over Le keeps its first Le
tokens; a response over Ld - 1 keeps its first Ld - 1 tokens and still ends with EOS. A
response the build already cut to fit (`dataset.response_cut`) gets no EOS label: the model
must not learn to stop there.
`PairIndex` counts both (the trainer logs them).
A chat with several supervised turns splits at its prompt length, the start of its last span
(lowmem_core/format.py LABEL_SPANS_COLUMN): the encoder reads the conversation up to the last
reply, the decoder learns that reply. An encoder-decoder has one output per input, so the
earlier replies are input, not targets.

Everything else is the Loader's (pipeline/rows.py): a global step takes `batch_size *
world_size` consecutive rows, rank k rows [start + k*B, start + (k+1)*B); the state is (epoch,
consumed global rows), so a loader with another world size or batch size continues from the
same row; the partial last step is padding; the next epoch's layout is prepared in the
background near the end of each epoch. The kernels below are tested against Python in
tests/pipeline/test_pairs.py.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch

from lowmem_core.errors import CheckpointError, ConfigError, PipelineError
from lowmem_core.format import IGNORE_INDEX
from lowmem_core.stateful import Stateful
from pipeline.collate import Segments
from pipeline.loader import Batch
from pipeline.pair_layout import PACK_WINDOW, PairIndex, pair_parts
from pipeline.rows import BatchTask, RowSource, check_int

STATE_VERSION = 2  # 2 adds pack_window; a version 1 state was written by next-fit (window 1)
PAIR_KEYS = ("input_ids", "position_ids", "decoder_input_ids", "decoder_position_ids", "labels")
_STATE_KEYS = ("version", "epoch", "consumed_rows", "seed", "enc_len", "dec_len", "fingerprint")


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
            p, _, prompt_n, response_n = pair_parts(
                doc, doc_starts, prompt_lengths, enc_len, dec_len
            )
            enc[0][c] = doc_starts[doc]
            enc[1][c] = prompt_n
            enc[2][c] = x_e
            enc[3][c] = x_e
            dec[0][c] = doc_starts[doc] + p
            dec[1][c] = response_n
            dec[2][c] = x_d + 1
            dec[3][c] = x_d
            x_e += max(prompt_n, 1)  # an empty prompt is one EOS
            x_d += response_n + 1  # the start token
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
            check_int(name, value, low)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}; check the launcher")
        if dataset.prompt_lengths is None or len(dataset) == 0:
            raise PipelineError(
                f"dataset {dataset.path} holds no prompt/response pairs; build it with "
                "`python -m pipeline build --sft`"
            )
        self.dataset = dataset
        self._prompts = np.ascontiguousarray(dataset.prompt_lengths, dtype=np.int64)
        cut = getattr(dataset, "response_cut", None)
        self._response_cut = cut if cut is not None and cut.any() else None
        super().__init__(batch_size, rank, world_size, drop_last)
        self.enc_len, self.dec_len, self.seed, self.start_id = enc_len, dec_len, seed, start_id
        self.pack_window = pack_window
        # Every pair takes at least one position of each row.
        self._scratch = _Scratch(batch_size * min(enc_len, dec_len), batch_size * enc_len)

    @property
    def index(self) -> PairIndex:
        """The current epoch's layout (its padding and truncation counts)."""
        return self._epoch_index(self._epoch)

    def _open_index(self, epoch: int) -> PairIndex:
        """The node's shared layout of `epoch` (a private one for a dataset without a folder)."""
        ds = self.dataset
        args = (self.seed, epoch, self.enc_len, self.dec_len, self.pack_window)
        folder = getattr(ds, "index_folder", None)
        if folder is None:
            return PairIndex.build(ds.doc_starts, self._prompts, *args)
        return PairIndex.shared(folder, ds.fingerprint, ds.doc_starts, self._prompts, *args)

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
        if self._response_cut is not None:
            # Pair c of the batch is pairs[row_starts[r0] + c]; its EOS label follows its response.
            first = int(index.row_starts[task.row_start])
            cut = self._response_cut[index.pairs[first : first + count]] != 0
            v["labels"][(s.dec.dst[:count] - 1 + s.dec.n[:count])[cut]] = IGNORE_INDEX
            useful -= int(cut.sum())
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
        # started before first-fit packing resumes its own order.
        window = saved_layout(state)[2]
        if window != self.pack_window:
            self.pack_window = window
            self._forget_index()
        self._restore_position(int(state["epoch"]), int(state["consumed_rows"]), "pair loader")


def saved_layout(state: dict) -> tuple[int, int, int]:
    """(enc_len, dec_len, pack_window) a saved pair loader state was laid out with; a version 1
    state, written before first-fit packing, was laid out next-fit (window 1)."""
    window = state.get("pack_window", 1)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise CheckpointError(f"pair loader state has pack_window {window!r}; start a new run")
    return int(state["enc_len"]), int(state["dec_len"]), window
