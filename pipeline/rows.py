"""`RowSource`: the position bookkeeping shared by every batch source that cuts an epoch's global
rows into steps and shares each step among ranks (token rows in pipeline/loader.py, encoder-decoder
pairs in pipeline/pairs.py).

A global step takes `batch_size * world_size` consecutive rows; rank k takes rows
[start + k*B, start + (k+1)*B). The position is (epoch, global rows consumed in it), so a source
built with another world size or batch size continues from the same global row. A subclass
supplies the epoch's layout (`_open_index(epoch)`, anything with `epoch` and `total_rows`),
`new_buffers` and `fill`; everything about steps, passes and positions lives here once, and so
does keeping the current epoch's layout and preparing the next one's in a background thread once
AHEAD_FRACTION of the epoch's rows are handed out, so crossing the boundary waits for no build.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowmem_core.errors import CheckpointError, ConfigError

AHEAD_FRACTION = 0.9  # of an epoch's rows handed out when the next epoch's layout is prepared


@dataclass(frozen=True)
class BatchTask:
    """One global step as seen by this rank: which rows to fill, and the state once consumed."""

    index: Any  # the epoch's layout the rows come from
    step: int  # global step within the epoch
    row_start: int  # first global row of this rank's share
    row_end: int  # one past the last global row (clipped to the epoch; may equal row_start)
    state_after: tuple[int, int]  # (epoch, consumed_rows) once this step is consumed


class RowSource(ABC):
    """Steps, passes and the (epoch, consumed rows) position over a subclass's row layout."""

    def __init__(self, batch_size: int, rank: int, world_size: int, drop_last: bool):
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.drop_last = drop_last
        self._epoch = 0
        self._consumed_rows = 0
        self._moves = 0  # bumped when the position is set from outside: a pass in progress ends
        self._index = None  # the current epoch's layout
        self._ahead: tuple[int, Future] | None = None  # the next epoch's, being prepared
        self._index_lock = threading.Lock()

    # -- what a subclass supplies -------------------------------------------------------------
    @abstractmethod
    def _open_index(self, epoch: int):
        """Epoch `epoch`'s row layout (called from a background thread too)."""

    @abstractmethod
    def new_buffers(self, pin_memory: bool = False):
        """One set of the buffers `fill` writes a batch into."""

    @abstractmethod
    def fill(self, task: BatchTask, buffers):
        """Write `task`'s rows into `buffers`; returns the Batch."""

    # -- layouts ------------------------------------------------------------------------------
    def _epoch_index(self, epoch: int):
        with self._index_lock:
            if self._index is None or self._index.epoch != epoch:
                ahead, self._ahead = self._ahead, None
                index = None
                if ahead is not None and ahead[0] == epoch:
                    try:
                        index = ahead[1].result()
                    except Exception:
                        index = None  # built again below, raising in this thread if it fails
                self._index = index or self._open_index(epoch)
            return self._index

    def _forget_index(self) -> None:
        """Drop the layouts held (what they depend on changed)."""
        with self._index_lock:
            self._index, self._ahead = None, None

    def _prepare_ahead(self, epoch: int) -> None:
        """Build or map `epoch`'s layout in a background thread (once)."""
        with self._index_lock:
            if (self._ahead is not None and self._ahead[0] == epoch) or (
                self._index is not None and self._index.epoch == epoch
            ):
                return
            future: Future = Future()
            self._ahead = (epoch, future)

        def run() -> None:
            try:
                future.set_result(self._open_index(epoch))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=run, name="epoch-index-ahead", daemon=True).start()

    def _before_step(self, epoch: int, next_rows: int, end_rows: int) -> None:
        if next_rows >= AHEAD_FRACTION * end_rows:
            self._prepare_ahead(epoch + 1)

    # -- steps --------------------------------------------------------------------------------
    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        return self._epoch

    def _steps_in(self, index) -> int:
        full, partial = divmod(index.total_rows, self.rows_per_step)
        return full if self.drop_last else full + (partial > 0)

    def __len__(self) -> int:
        """Global steps in one full epoch (the same in every epoch)."""
        return self._steps_in(self._epoch_index(self._epoch))

    def steps_remaining(self) -> int:
        """Steps the next pass yields, or the pass in progress still yields."""
        return len(self) - -(-self._consumed_rows // self.rows_per_step)

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of epoch `epoch`. A no-op when the position is already in that epoch,
        so a resumed mid-epoch position survives `set_epoch(e)` at the top of an epoch loop."""
        check_int("epoch", epoch, 0)
        if epoch != self._epoch:
            self._epoch, self._consumed_rows = epoch, 0
            self._moves += 1

    # -- iteration ----------------------------------------------------------------------------
    def tasks(self) -> Iterator[BatchTask]:
        """The remaining steps of the current epoch, as this rank sees them."""
        epoch, consumed = self._epoch, self._consumed_rows
        index = self._epoch_index(epoch)
        end_rows = self._steps_in(index) * self.rows_per_step
        first_step = -(-consumed // self.rows_per_step)
        for step_start in range(consumed, end_rows, self.rows_per_step):
            next_rows = step_start + self.rows_per_step
            self._before_step(epoch, next_rows, end_rows)
            r0 = min(step_start + self.rank * self.batch_size, index.total_rows)
            yield BatchTask(
                index=index,
                step=first_step + (step_start - consumed) // self.rows_per_step,
                row_start=r0,
                row_end=min(r0 + self.batch_size, index.total_rows),
                state_after=(epoch + 1, 0) if next_rows >= end_rows else (epoch, next_rows),
            )

    def commit(self, task: BatchTask) -> None:
        """Record that the consumer has taken `task`'s batch."""
        self._epoch, self._consumed_rows = task.state_after

    def __iter__(self):
        moves = self._moves
        for task in self.tasks():
            if self._moves != moves:  # load_state_dict / set_epoch during the pass: it ends
                return
            batch = self.fill(task, self.new_buffers())
            self.commit(task)
            yield batch

    # -- position -----------------------------------------------------------------------------
    def _restore_position(self, epoch: int, consumed: int, what: str) -> None:
        """Continue at (epoch, consumed rows) of a saved state, after its keys were checked."""
        index = self._epoch_index(max(epoch, 0))
        if epoch < 0 or not 0 <= consumed <= index.total_rows:
            raise CheckpointError(
                f"{what} state epoch={epoch}, consumed_rows={consumed} is outside the epoch's "
                f"{index.total_rows} rows; it was not written for this dataset"
            )
        if consumed >= self._steps_in(index) * self.rows_per_step:
            epoch, consumed = epoch + 1, 0  # nothing of that epoch is left for this source
        self._epoch, self._consumed_rows = epoch, consumed
        self._moves += 1


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
