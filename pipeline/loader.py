"""`Loader`: rank-sharded, exactly-once, resumable batches of [B, L] token rows.

A global step takes `batch_size * world_size` consecutive rows of the epoch's row layout
(pipeline/sampler.py); rank k takes rows [start + k*B, start + (k+1)*B). The state is a few
integers -- epoch, global rows consumed in that epoch, seed -- so a loader built with another
world size or batch size that loads it continues from the same global row: over the rest of the
epoch every token is delivered exactly once across all ranks. The last step of an epoch may be
partial; the rows it lacks are padding (labels -100) so every rank still gets [B, L] and no rank
waits on a collective the others skipped.

One pass of `for batch in loader` is one epoch (from the current position); the next pass starts
the next epoch. The Prefetcher uses the lower-level `tasks()` / `fill()` / `commit()` to fill its
own pinned buffers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pipeline import collate
from pipeline.dataset import TokenDataset
from lowmem_core.errors import CheckpointError, ConfigError, PipelineError
from pipeline.sampler import EpochIndex
from pipeline.workers import ordered_map

STATE_VERSION = 1
BATCH_KEYS = ("input_ids", "labels", "position_ids")


@dataclass(frozen=True)
class BatchTask:
    """One global step as seen by this rank: which rows to fill, and the state once it is consumed."""

    index: EpochIndex
    step: int  # global step within the epoch
    row_start: int  # first global row of this rank's share
    row_end: int  # one past the last global row (clipped to the epoch; may equal row_start)
    state_after: tuple[int, int]  # (epoch, consumed_rows) once this step is consumed


class _Scratch(threading.local):
    """Per-reader-thread segment arrays and (ultra-low-mem) token staging buffer."""

    def __init__(self, capacity: int, token_dtype: np.dtype):
        self.seg = np.empty((5, capacity), dtype=np.int64)
        self.staging = np.empty(capacity, dtype=token_dtype)


class Loader:
    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        packing: bool = True,
        drop_last: bool = False,
        num_readers: int = 1,
    ):
        _check_int("batch_size", batch_size, 1)
        _check_int("seq_len", seq_len, 2)
        _check_int("world_size", world_size, 1)
        _check_int("num_readers", num_readers, 1)
        _check_int("seed", seed, 0)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}; check the launcher's ranks")
        if len(dataset) == 0 or dataset.num_tokens == 0:
            raise PipelineError(f"dataset {dataset.path} holds no tokens; build it from non-empty inputs")
        self.dataset = dataset
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.packing, self.drop_last = seed, packing, drop_last
        self.num_readers = num_readers
        self._epoch = 0
        self._consumed_rows = 0
        self._index: EpochIndex | None = None
        # Capacity: a packing batch of B*L stream positions touches at most B*L+1 documents.
        self._scratch = _Scratch(batch_size * seq_len + 2, dataset.token_dtype)

    # -- layout -----------------------------------------------------------------------------
    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        return self._epoch

    def _epoch_index(self, epoch: int) -> EpochIndex:
        if self._index is None or self._index.epoch != epoch:
            self._index = EpochIndex.build(self.dataset.doc_starts, self.seed, epoch, self.seq_len, self.packing)
        return self._index

    def _steps_in(self, index: EpochIndex) -> int:
        full, partial = divmod(index.total_rows, self.rows_per_step)
        return full if self.drop_last else full + (partial > 0)

    def __len__(self) -> int:
        """Global steps in one full epoch."""
        return self._steps_in(self._epoch_index(self._epoch))

    def steps_remaining(self) -> int:
        """Global steps left in the current epoch from the current position."""
        index = self._epoch_index(self._epoch)
        return max(0, self._steps_in(index) - -(-self._consumed_rows // self.rows_per_step))

    # -- iteration --------------------------------------------------------------------------
    def tasks(self) -> Iterator[BatchTask]:
        """The remaining steps of the current epoch, as this rank sees them."""
        if self.steps_remaining() == 0:  # the state sits at the very end of an epoch: start the next
            self._epoch, self._consumed_rows = self._epoch + 1, 0
        epoch, consumed = self._epoch, self._consumed_rows
        index = self._epoch_index(epoch)
        end_rows = self._steps_in(index) * self.rows_per_step
        first_step = -(-consumed // self.rows_per_step)
        for step_start in range(consumed, end_rows, self.rows_per_step):
            next_rows = step_start + self.rows_per_step
            last = next_rows >= end_rows
            r0 = min(step_start + self.rank * self.batch_size, index.total_rows)
            r1 = min(r0 + self.batch_size, index.total_rows)
            yield BatchTask(
                index=index,
                step=first_step + (step_start - consumed) // self.rows_per_step,
                row_start=r0,
                row_end=r1,
                state_after=(epoch + 1, 0) if last else (epoch, next_rows),
            )

    def new_buffers(self, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """Three int64 [B, L] CPU tensors to `fill`; pinned when asked (and CUDA exists)."""
        shape = (self.batch_size, self.seq_len)
        return {k: torch.empty(shape, dtype=torch.int64, pin_memory=pin_memory) for k in BATCH_KEYS}

    def fill(self, task: BatchTask, buffers: dict[str, torch.Tensor]) -> int:
        """Write `task`'s batch into `buffers`; return its useful (label != -100) token count.

        Safe to call from several threads at once; the kernels release the GIL.
        """
        ids = buffers["input_ids"].numpy().reshape(-1)
        labels = buffers["labels"].numpy().reshape(-1)
        pos = buffers["position_ids"].numpy().reshape(-1)
        seg = self._scratch.seg
        src, n, dst, doc0, eos = seg[0], seg[1], seg[2], seg[3], seg[4]
        index, L = task.index, self.seq_len
        ds = self.dataset
        if self.packing:
            s0 = task.row_start * L
            s1 = min(task.row_end * L, index.total_stream_tokens)
            nseg = collate.packing_segments(index.perm, index.cum, ds.doc_starts, s0, s1, src, n, dst, doc0, eos) if s1 > s0 else 0
            valid_end = max(s1 - s0, 0)
        else:
            nseg = collate.padding_segments(index.perm, index.cum, ds.doc_starts, task.row_start, task.row_end, L, src, n, dst, doc0, eos)
            valid_end = 0
        if nseg:
            self._emit_tokens(nseg, ids, labels, pos)
        return int(collate.finish_rows(ids, labels, pos, L, n, dst, doc0, eos, nseg, ds.eos_id, ds.pad_id, not self.packing, valid_end))

    def _emit_tokens(self, nseg: int, ids, labels, pos) -> None:
        ds = self.dataset
        src, n, dst, doc0 = (self._scratch.seg[k] for k in range(4))
        first_tokens = ds.chunk_first_token
        if len(ds.chunks) == 1:
            touched = [0]
        else:
            live = n[:nseg] > 0  # EOS-only segments read nothing (and may point one past their chunk)
            touched = np.unique(np.searchsorted(first_tokens, src[:nseg][live], side="right") - 1).tolist()
        staging = self._scratch.staging
        for c in touched:
            chunk = ds.chunks[c]
            lo, hi = int(first_tokens[c]), int(first_tokens[c + 1])
            if not ds.ultra_low_mem:
                collate.emit_tokens(chunk.values, chunk.first_token, False, lo, hi, src, n, dst, doc0, nseg,
                                    self.seq_len, ids, labels, pos)
                continue
            nbytes = collate.pread_tokens(ds.fd_of(chunk), chunk.values_file_offset, ds.token_dtype.itemsize,
                                          chunk.first_token, lo, hi, src, n, dst, nseg, staging)
            if nbytes < 0:
                raise PipelineError(f"short read from {chunk.path} (file changed or truncated while open); rebuild the dataset")
            ds.account_read(nbytes)
        if ds.ultra_low_mem:
            collate.emit_tokens(staging, 0, True, 0, ds.num_tokens, src, n, dst, doc0, nseg, self.seq_len, ids, labels, pos)

    def commit(self, task: BatchTask) -> None:
        """Record that the consumer has taken `task`'s batch."""
        self._epoch, self._consumed_rows = task.state_after

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        def produce(task: BatchTask):
            buffers = self.new_buffers()
            self.fill(task, buffers)
            return task, buffers

        produced = map(produce, self.tasks()) if self.num_readers == 1 else ordered_map(produce, self.tasks(), self.num_readers)
        for task, buffers in produced:
            self.commit(task)
            yield buffers

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """epoch, global rows consumed in it, seed, and what the row layout depends on."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "consumed_rows": self._consumed_rows,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "packing": self.packing,
            "total_rows": self._epoch_index(self._epoch).total_rows,
            "fingerprint": self.dataset.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`'s global position; world size and batch size may differ."""
        missing = [k for k in ("epoch", "consumed_rows", "seed", "seq_len", "packing", "fingerprint") if k not in state]
        if missing:
            raise CheckpointError(f"loader state lacks {', '.join(missing)}; it was not written by this Loader")
        mismatched = [
            f"{key}: state has {state[key]!r}, loader has {mine!r}"
            for key, mine in (("fingerprint", self.dataset.fingerprint), ("seed", self.seed),
                              ("seq_len", self.seq_len), ("packing", self.packing))
            if state[key] != mine
        ]
        if mismatched:
            raise CheckpointError(
                "loader state does not match this data order (" + "; ".join(mismatched) +
                "); resume with the same dataset, seed, seq_len and packing, or start a new run"
            )
        index = self._epoch_index(int(state["epoch"]))
        if not 0 <= int(state["consumed_rows"]) <= index.total_rows:
            raise CheckpointError(
                f"loader state consumed_rows={state['consumed_rows']} is outside the epoch's {index.total_rows} rows"
            )
        self._epoch, self._consumed_rows = int(state["epoch"]), int(state["consumed_rows"])


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
