"""The run's data path: the dataset opened once, loader + prefetcher built from a Plan.

The batches are the model's `BatchSpec` (pipeline/batch_spec.py: token rows, or an
encoder-decoder's prompt/response pairs), which makes the loaders; the rest is the same.
The OOM backoff and the host-RAM watchdog rebuild the loader and prefetcher (new micro-batch,
prefetch depth or reader mode) at the data position of the last completed optimizer step, so no
batch is lost or repeated.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lowmem_core.errors import LowMemError, PipelineError
from lowmem_core.format import INDEX_NAME
from pipeline import open_dataset
from pipeline.batch_spec import BatchSpec
from pipeline.loader import Loader
from pipeline.pairs import PairLoader
from pipeline.prefetch import Prefetcher
from trainer_low_mem.distributed import RankContext

SHARD_CHECK_EVERY_S = 10.0


class TrainData:
    """This rank's batches: `next_batch()` pass after pass, `state_dict()` after the last one."""

    def __init__(
        self,
        path: Path,
        *,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device,
        shard_check_every_s: float = SHARD_CHECK_EVERY_S,
    ):
        self.dataset = open_dataset(path)
        self.shard_check_every_s = shard_check_every_s
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.batch_spec: BatchSpec | None = None  # set by `configure`, from the model's kind
        self.loader: Loader | PairLoader | None = None
        self.prefetcher: Prefetcher | None = None
        self._plan = None
        self._batches = None
        self._closed_wait_s = 0.0  # wait of prefetchers already closed
        self._next_size_check = 0.0

    # -- building ---------------------------------------------------------------------------
    def configure(self, plan, batch_spec: BatchSpec | None = None) -> None:
        """Make the loader for `plan` (reader mode, micro-batch) and `batch_spec` (kept from
        the last call when None); the data path must be closed."""
        self.batch_spec = batch_spec or self.batch_spec
        if plan.ultra_low_mem and not self.dataset.ultra_low_mem:
            previous, self.dataset = self.dataset, self.dataset.reopen(ultra_low_mem=True)
            previous.close()
        self._plan = plan
        self.loader = self.make_loader(self.dataset, plan.micro_batch_per_rank)

    def make_loader(self, dataset, batch_size: int) -> Loader | PairLoader:
        """This rank's loader of `dataset` (the training set, or an eval set for one epoch)."""
        return self.batch_spec.loader(
            dataset, batch_size, rank=self.rank, world_size=self.world_size, seed=self.seed
        )

    @property
    def rows_per_epoch(self) -> int:
        """Rows (sequences of seq_len) in one epoch; the same in every epoch."""
        return self.loader.state_dict()["total_rows"]

    def summary(self) -> str:
        """One line on how the dataset is laid out into rows."""
        return self.batch_spec.summary(self.loader, self.dataset)

    def start(self, loader_state: dict[str, Any] | None) -> None:
        """Start the prefetcher at `loader_state` (None: the beginning of the first epoch)."""
        plan = self._plan
        if loader_state is not None:
            self.loader.load_state_dict(loader_state)
        self.prefetcher = Prefetcher(
            self.loader,
            device=self.device,
            depth=plan.prefetch_depth,
            pinned_pool_bytes=plan.pinned_pool_bytes,
            num_readers=plan.num_readers,
            copy=True,
        )
        self._batches = self._passes(self.prefetcher)

    def restart(self, plan, loader_state: dict[str, Any]) -> None:
        """Rebuild loader and prefetcher for `plan` at `loader_state`."""
        self.close()
        self.configure(plan)
        self.start(loader_state)

    def close(self) -> None:
        """Stop the prefetcher (joining its reader threads) and free its buffers."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None
        if self.prefetcher is not None:
            self._closed_wait_s += self.prefetcher.wait_s_total
            self.prefetcher.close()
            self.prefetcher = None

    # -- reading ----------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch of this rank; the caller may keep it across requests (the
        prefetcher hands out copies: 3 x B x L int64, kilobytes)."""
        now = time.monotonic()
        if now >= self._next_size_check:
            # Reading a mapped shard truncated under the job ends in SIGBUS: look every few
            # seconds, so such a change is one clear error in all but a short window.
            check_shard_sizes(self.dataset.path)
            self._next_size_check = now + self.shard_check_every_s
        return next(self._batches)

    def state_dict(self) -> dict[str, Any]:
        """The data position after the last batch handed out."""
        return self.prefetcher.state_dict()

    @property
    def wait_s_total(self) -> float:
        """Seconds the loop waited for batches, over every prefetcher of the run."""
        current = self.prefetcher.wait_s_total if self.prefetcher is not None else 0.0
        return self._closed_wait_s + current

    @staticmethod
    def _passes(prefetcher: Prefetcher):
        while True:
            yielded = False
            for batch in prefetcher:
                yielded = True
                yield batch
            if not yielded:
                raise PipelineError(
                    "the loader produced an empty epoch; check the dataset and --max_seq_len"
                )


def verify_dataset(path: Path, ctx: RankContext) -> None:
    """Collective: rank 0 checks the shards' sha256 (cached per shard by mtime and size)."""
    from pipeline.manifest import read_manifest, verify_checksums

    failure = None
    if ctx.is_main and (Path(path) / INDEX_NAME).is_file():
        try:
            verify_checksums(path, read_manifest(path))
        except LowMemError as exc:
            failure = exc
    if ctx.all_reduce_max(int(failure is not None)) if ctx.world_size > 1 else failure:
        raise failure or PipelineError(f"--data {path} failed its checksum check on rank 0")


def check_shard_sizes(path: Path) -> None:
    """Before each save: a shard truncated or replaced under a running job is one clear error
    (reading a truncated mapped shard would end in SIGBUS), not a state built on it."""
    from pipeline.manifest import read_manifest

    if not (Path(path) / INDEX_NAME).is_file():
        return
    for entry in read_manifest(path).files:
        shard = Path(path) / entry.name
        size = shard.stat().st_size if shard.is_file() else -1
        if size != entry.bytes:
            raise PipelineError(
                f"{shard} changed during training ({size} bytes, {INDEX_NAME} says "
                f"{entry.bytes}); the last saved state is intact: restore or rebuild the "
                "dataset, then resume with --is_keep_training=True"
            )
