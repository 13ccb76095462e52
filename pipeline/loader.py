"""`Loader`: rank-sharded, exactly-once, resumable batches of [B, L] token rows.

A global step takes `batch_size * world_size` consecutive rows of the epoch's row layout
(pipeline/sampler.py); rank k takes rows [start + k*B, start + (k+1)*B). The state is a few
integers -- epoch, global rows consumed in that epoch, seed -- so a loader built with another
world size or batch size that loads it continues from the same global row: over the rest of the
epoch every token is delivered exactly once across all ranks. The last step of an epoch may be
partial; the rows it lacks are padding (labels -100) so every rank still gets [B, L] and no rank
waits on a collective the others skipped.

Prompt/response datasets (`dataset.prompt_lengths` is not None): prompt tokens get label -100 in
every layout (in a chat with several supervised turns every token outside its labelled spans,
`dataset.label_spans(i)`), so the labelled tokens of an epoch are the response tokens (the
assistant turns) plus one EOS per sample
(none after a response the build cut to fit, `dataset.response_cut`: the model must not learn
to stop there), and packing places whole samples in rows, best-fit by default (the layouts are
in pipeline/sampler.py); `split_samples` counts the samples too long for one row. A loader
that loads a state saved on another layout (`samples`, before best-fit) continues on that
layout, so a resumed run keeps its data order.

The Loader is a single-threaded batch source: one pass of `for batch in loader` is one epoch
(from the current position), the next pass the next epoch. The Prefetcher runs its lower-level
`tasks()` / `fill()` / `commit()` in reader threads to fill a pool of (pinned) buffers ahead.

Epoch indexes are files shared by the node (pipeline/index_cache.py): the first rank to need one
builds it, the others map it. Once 90% of an epoch's rows are handed out, a background thread
prepares the next epoch's index, so crossing the epoch boundary does not wait for a build.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
import torch

from lowmem_core.errors import CheckpointError, ConfigError, PipelineError
from lowmem_core.format import IGNORE_INDEX
from lowmem_core.stateful import Stateful
from pipeline import collate, index_cache
from pipeline.dataset import TokenDataset
from pipeline.rows import BatchTask, RowSource, check_int
from pipeline.sampler import LAYOUTS, EpochIndex, layout_name

STATE_VERSION = 3  # 2: padding rows end each document with EOS; 3: the layout is named
BATCH_KEYS = ("input_ids", "labels", "position_ids")
_STATE_KEYS = ("version", "epoch", "consumed_rows", "seed", "seq_len", "packing", "fingerprint")


class Batch(dict):
    """`input_ids`, `labels`, `position_ids`: int64 [B, L] tensors (a plain dict, so
    `model(**batch)` works), with two counts made by the fill:

    - `num_tokens`: positions whose label is not -100 (tokens and EOS; prompt tokens and
      padding excluded);
    - `num_loss_tokens`: positions with a next-token target, `(labels[:, 1:] != -100).sum()`.
    """

    __slots__ = ("num_tokens", "num_loss_tokens")

    def __init__(self, tensors: Mapping[str, torch.Tensor], num_tokens: int, num_loss_tokens: int):
        super().__init__(tensors)
        self.num_tokens = num_tokens
        self.num_loss_tokens = num_loss_tokens

    def clone(self) -> Batch:
        """A copy whose tensors own their memory (on the same device)."""
        return Batch({k: v.clone() for k, v in self.items()}, self.num_tokens, self.num_loss_tokens)


class _Scratch(threading.local):
    """Each reader thread's segment arrays."""

    def __init__(self, capacity: int):
        self.segs = collate.Segments.empty(capacity)


class Loader(RowSource, Stateful):
    """This rank's batches of `dataset`: [batch_size, seq_len] rows, packed or padded.

    `len(loader)`: global steps in one full epoch. `steps_remaining()`: steps the next pass (or
    the pass in progress) still yields. `set_epoch(e)`: go to the start of epoch e.
    `state_dict()` / `load_state_dict()`: the position, resumable with another world size or
    batch size. Batches from `for batch in loader` are freshly allocated: the caller may keep them.
    `split_samples`: documents of the current epoch's layout spread over more than one row.
    `layout`: the row layout (a name in sampler.LAYOUTS); None gives the default for the data
    and `packing` (sampler.layout_name), a loaded state the one it was saved with.
    """

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
        layout: str | None = None,
    ):
        check_int("batch_size", batch_size, 1)
        check_int("seq_len", seq_len, 2)
        check_int("world_size", world_size, 1)
        check_int("seed", seed, 0)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(
                f"rank must be in [0, world_size={world_size}), got {rank}; "
                "check the launcher's ranks"
            )
        if len(dataset) == 0 or dataset.num_tokens == 0:
            raise PipelineError(
                f"dataset {dataset.path} holds no tokens; build it from non-empty inputs"
            )
        prompt_lengths = getattr(dataset, "prompt_lengths", None)
        if prompt_lengths is not None and np.shape(prompt_lengths) != (len(dataset),):
            raise PipelineError(
                f"dataset {dataset.path} has prompt lengths of shape {np.shape(prompt_lengths)} "
                f"for {len(dataset)} documents; rebuild it with `python -m pipeline build --sft`"
            )
        self.dataset = dataset
        # (num_docs,) int64 prompt tokens per document; empty when nothing is masked.
        self._prompt_lengths = np.ascontiguousarray(
            prompt_lengths if prompt_lengths is not None else (), dtype=np.int64
        )
        # (num_docs + 1,) int64 rows of the (S, 2) `spans` per document; empty without spans.
        span_starts = getattr(dataset, "span_starts", None)
        self._span_starts = np.ascontiguousarray(
            span_starts if span_starts is not None else (), dtype=np.int64
        )
        self._spans = getattr(dataset, "spans", None)
        # (num_docs,) uint8, 1 where the EOS is no target; None when every EOS is one.
        cut = getattr(dataset, "response_cut", None)
        self._response_cut = cut if cut is not None and cut.any() else None
        super().__init__(batch_size, rank, world_size, drop_last)
        self.seq_len, self.seed, self.packing = seq_len, seed, packing
        self.layout = layout_name(packing, prompt_lengths is not None)
        if layout is not None:
            self._check_layout(layout)
            self.layout = layout
        # Capacity: a packing batch of B*L stream positions touches at most B*L+1 documents.
        self._scratch = _Scratch(batch_size * seq_len + 2)

    # -- layout -----------------------------------------------------------------------------
    def _open_index(self, epoch: int) -> EpochIndex:
        """The node's shared index of `epoch` (a private one for a dataset without a folder)."""
        ds = self.dataset
        args = (self.seed, epoch, self.seq_len, self.layout)
        folder = getattr(ds, "index_folder", None)
        if folder is None:
            return EpochIndex.build(ds.doc_starts, *args)
        return index_cache.epoch_index(folder, ds.fingerprint, ds.doc_starts, *args)

    def _layouts(self) -> list[str]:
        """The layouts of this loader's `packing` (padding rows, or one of the packings)."""
        return [name for name in LAYOUTS if (name == "rows") != self.packing]

    def _check_layout(self, layout: str) -> None:
        if layout not in self._layouts():
            raise ConfigError(
                f"layout {layout!r} is not one of {self._layouts()}, the layouts with packing="
                f"{self.packing}; pick one of them or leave the layout to the loader"
            )

    @property
    def split_samples(self) -> int:
        """Documents of the current epoch spread over more than one row (for sft datasets in
        both layouts: the samples whose tokens plus EOS exceed seq_len)."""
        return self._epoch_index(self._epoch).split_samples

    # -- filling ----------------------------------------------------------------------------
    def new_buffers(self, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """Three int64 [B, L] CPU tensors to `fill`; pinned when asked (and CUDA exists)."""
        shape = (self.batch_size, self.seq_len)
        return {k: torch.empty(shape, dtype=torch.int64, pin_memory=pin_memory) for k in BATCH_KEYS}

    def fill(self, task: BatchTask, buffers: dict[str, torch.Tensor]) -> Batch:
        """Write `task`'s batch into `buffers`; return them as a Batch with its token counts.

        Safe to call from several threads at once; the kernels release the GIL.
        """
        ids = buffers["input_ids"].numpy().reshape(-1)  # (B*L,) views of the [B, L] buffers
        labels = buffers["labels"].numpy().reshape(-1)
        pos = buffers["position_ids"].numpy().reshape(-1)
        segs = self._scratch.segs
        index, L, ds, prompts = task.index, self.seq_len, self.dataset, self._prompt_lengths
        span_starts = self._span_starts
        if self.packing:
            s0 = task.row_start * L
            s1 = min(task.row_end * L, index.stream_end)
            count = 0
            if s1 > s0:
                count = collate.packing_segments(
                    index.perm, index.cum, ds.doc_starts, prompts, span_starts, s0, s1, *segs
                )
        else:
            count = collate.padding_segments(
                index.perm,
                index.cum,
                ds.doc_starts,
                prompts,
                span_starts,
                task.row_start,
                task.row_end,
                L,
                *segs,
            )
        if count:
            ds.read_segments(segs, count, L, ids, labels, pos)
        num_tokens = int(
            collate.finish_rows(
                ids,
                labels,
                pos,
                L,
                segs.n,
                segs.dst,
                segs.doc0,
                segs.eos,
                segs.prompt,
                count,
                ds.eos_id,
                ds.pad_id,
            )
        )
        if self._spans is not None and count:
            num_tokens -= int(
                collate.mask_outside_spans(
                    labels,
                    ds.doc_starts,
                    span_starts,
                    self._spans,
                    segs.src,
                    segs.n,
                    segs.dst,
                    segs.doc,
                    count,
                )
            )
        if self._response_cut is not None and count:
            num_tokens -= self._unlabel_cut_eos(segs, count, labels)
        # A row's first label is nobody's target: (labels[:, 1:] != -100) counts the rest.
        row_heads = int(np.count_nonzero(labels[::L] != IGNORE_INDEX))
        return Batch(buffers, num_tokens, num_tokens - row_heads)

    def _unlabel_cut_eos(self, segs, count: int, labels: np.ndarray) -> int:
        """Label -100 on the EOS of each document of the batch whose response was cut; returns
        how many."""
        eos = segs.eos[:count]
        hit = (eos >= 0) & (self._response_cut[segs.doc[:count]] != 0)
        labels[eos[hit]] = IGNORE_INDEX
        return int(hit.sum())

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
            "layout": self.layout,
            "total_rows": self._epoch_index(self._epoch).total_rows,
            "fingerprint": self.dataset.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`'s global position; world size and batch size may differ."""
        if not isinstance(state, dict):
            raise CheckpointError(
                f"loader state must be the dict state_dict() returned, got "
                f"{type(state).__name__}; pass a saved state or start without one"
            )
        # Version 1 text packing lays rows out as versions 2 and 3 do: those states resume.
        same_layout = state.get("version") == 1 and state.get("packing") is True
        same_layout = same_layout and getattr(self.dataset, "prompt_lengths", None) is None
        if "version" in state and state["version"] not in (2, STATE_VERSION) and not same_layout:
            raise CheckpointError(
                f"loader state version {state['version']!r} is not 2 or {STATE_VERSION}, the "
                "versions this Loader reads; resume with the release that wrote it, or start a "
                "new run"
            )
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise CheckpointError(
                f"loader state lacks {', '.join(missing)}; it was not written by this Loader"
            )
        mismatched = [
            f"{key}: state has {state[key]!r}, loader has {mine!r}"
            for key, mine in (
                ("fingerprint", self.dataset.fingerprint),
                ("seed", self.seed),
                ("seq_len", self.seq_len),
                ("packing", self.packing),
            )
            if state[key] != mine
        ]
        if mismatched:
            raise CheckpointError(
                "loader state does not match this data order (" + "; ".join(mismatched) + "); "
                "resume with the same dataset, seed, seq_len and packing, or start a new run"
            )
        layout = self._saved_layout(state)
        if layout != self.layout:
            self.layout = layout  # the run goes on in the data order it started with
            self._forget_index()
        self._restore_position(int(state["epoch"]), int(state["consumed_rows"]), "loader")

    def _saved_layout(self, state: dict) -> str:
        if state["version"] == STATE_VERSION and state.get("layout") not in self._layouts():
            raise CheckpointError(
                f"loader state layout {state.get('layout')!r} is not one of "
                f"{self._layouts()}; it was not written by this Loader"
            )
        return saved_layout(state, self.dataset)


def saved_layout(state: dict, dataset) -> str:
    """The row layout a loader state was saved on: named from version 3; before, whole samples
    in permutation order for prompt/response packing, else what that packing still is. A run
    sizes its schedule on it, so a resumed run counts the rows it will really see."""
    if state.get("version") == STATE_VERSION and "layout" in state:
        return state["layout"]
    sft = getattr(dataset, "prompt_lengths", None) is not None
    packing = bool(state.get("packing", True))
    return "samples" if packing and sft else layout_name(packing, sft)
