"""`Prefetcher`: the loader's batches filled ahead of the consumer into a fixed buffer pool.

It owns the data path's threads: a feeder hands free buffer sets, in step order, to reader
threads (`pipeline.workers.ordered_map`) that run `loader.fill` (the numba kernels release the
GIL), at most `depth` steps ahead. The pool holds `depth + 1` (pinned) host buffer sets,
allocated once and counted in `lowmem_core.memory.PINNED_BYTES`. With a CUDA device, `depth + 1`
device sets too: the feeder copies each filled host set on a side stream and records an event
the compute stream waits on; a host set is refilled only after its copy completed, a device set
overwritten only after the consumer asked for a later batch and an event recorded on the compute
stream at that moment completed.

Deadlock freedom: buffer sets are acquired in step order by one thread and at most `depth` fills
are outstanding, so with `depth + 1` sets one is always free or about to be freed by the consumer
(or, with CUDA, by a copy that needs nothing from the feeder to complete).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator

import torch

from lowmem_core.errors import ConfigError
from lowmem_core.memory import PINNED_BYTES, PinnedBytesCounter, format_bytes
from lowmem_core.stateful import Stateful
from pipeline.loader import Batch
from pipeline.workers import ordered_map

log = logging.getLogger(__name__)

Buffers = dict[str, torch.Tensor]
POISON = -0xDEADBEEF  # what a released buffer set holds with poison_released: no valid id or label
POISON_ENV = "LOWMEM_DEBUG_POISON"


class _Stop(Exception):
    """Raised inside the feeder when the pass is being closed."""


_END = object()


def pool_depth_for_cap(
    depth: int, set_bytes: int, pinned_pool_bytes: int | None
) -> tuple[int, str | None]:
    """The prefetch depth whose depth + 1 pinned buffer sets fit the cap, and a note when lowered.

    Raises ConfigError when not even two sets (depth 1) fit.
    """
    if depth < 1:
        raise ConfigError(f"prefetch depth must be >= 1, got {depth}")
    if pinned_pool_bytes is None or (depth + 1) * set_bytes <= pinned_pool_bytes:
        return depth, None
    sets = pinned_pool_bytes // set_bytes
    if sets < 2:
        raise ConfigError(
            f"pinned_pool_bytes {format_bytes(pinned_pool_bytes)} holds {sets} buffer set(s) of "
            f"{format_bytes(set_bytes)}; the prefetcher needs at least 2 (depth 1): raise it to "
            f">= {2 * set_bytes} bytes or lower the batch size"
        )
    note = (
        f"prefetch depth lowered from {depth} to {sets - 1}: pinned_pool_bytes "
        f"{format_bytes(pinned_pool_bytes)} holds {sets} buffer sets of {format_bytes(set_bytes)}"
    )
    return sets - 1, note


class _Pass:
    """One pass over the loader: the feeder thread, its queues and its shutdown."""

    def __init__(self, owner: Prefetcher):
        self.owner = owner
        self.cuda = owner._device is not None
        self.free_host: queue.Queue = queue.Queue()
        for host_set in owner._host_sets:
            self.free_host.put(host_set)
        self.copying: deque = deque()  # (host set, copy event), oldest first; feeder thread only
        self.free_device: queue.Queue = queue.Queue()
        if self.cuda:
            compute = torch.cuda.current_stream(owner._device)
            for device_set in owner._device_sets:
                # Whatever the previous pass left in flight on these buffers is ordered before this
                # event.
                device_set["release"] = torch.cuda.Event()
                device_set["release"].record(compute)
                self.free_device.put(device_set)
        # (task, host set, its Batch, device set | None, copy event | None)
        self.ready: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(
            target=self._feed, name="lowmem-prefetch-feeder", daemon=True
        )
        self.thread.start()

    # -- feeder thread ----------------------------------------------------------------------
    def _acquire_host(self) -> Buffers:
        if self.cuda:
            try:
                host_set = self.free_host.get_nowait()
            except queue.Empty:
                host_set, copied = self.copying.popleft()  # never empty: see the module docstring
                copied.synchronize()
        else:
            host_set = self.free_host.get()
        if host_set is None:
            raise _Stop
        return host_set

    def _jobs(self):
        for task in self.owner.loader.tasks():
            if self.stopping.is_set():
                raise _Stop
            yield task, self._acquire_host()

    def _fill(self, job) -> tuple:
        task, host_set = job
        return task, host_set, self.owner.loader.fill(task, host_set)

    def _copy(self, host_set: Buffers) -> tuple[dict, torch.cuda.Event]:
        device_set = self.free_device.get()
        if device_set is None:
            raise _Stop
        stream = self.owner._copy_stream
        with torch.cuda.stream(stream):
            stream.wait_event(device_set["release"])
            for key, tensor in host_set.items():
                device_set["buffers"][key].copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        self.copying.append((host_set, copied))
        return device_set, copied

    def _feed(self) -> None:
        owner = self.owner
        if self.cuda:
            torch.cuda.set_device(owner._device)
        filled = ordered_map(self._fill, self._jobs(), owner.num_readers, max_in_flight=owner.depth)
        try:
            for task, host_set, batch in filled:
                if self.stopping.is_set():
                    return
                if self.cuda:
                    device_set, copied = self._copy(host_set)
                    self.ready.put((task, host_set, batch, device_set, copied))
                else:
                    self.ready.put((task, host_set, batch, None, None))
            self.ready.put(_END)
        except _Stop:
            return
        except BaseException as exc:  # re-raised in the consumer
            self.ready.put(exc)
        finally:
            filled.close()  # cancels fills not started, joins the reader threads

    # -- consumer side ----------------------------------------------------------------------
    def next_item(self):
        return self.ready.get()

    def release(self, host_set: Buffers, device_set: dict | None) -> None:
        """The consumer has moved past this batch."""
        if self.owner.poison_released:
            _poison(host_set if device_set is None else device_set["buffers"])
        if device_set is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.owner._device))
            device_set["release"] = event
            self.free_device.put(device_set)
        else:
            self.free_host.put(host_set)

    def close(self) -> None:
        if self.stopping.is_set() and not self.thread.is_alive():
            return
        self.stopping.set()
        # Wake the feeder wherever it blocks on a free buffer set, and a consumer waiting on it.
        self.free_host.put(None)
        self.free_device.put(None)
        self.thread.join()
        self.ready.put(_END)
        if self.cuda:
            self.owner._copy_stream.synchronize()  # no copy may still write into the pool


class Prefetcher(Stateful):
    """Iterate a `pipeline.Loader` with batches prepared ahead into a fixed buffer pool.

    A yielded Batch is valid until the next one is requested: its tensors are the pool's
    buffers, refilled with later batches. To keep batches across requests (micro-batches of one
    optimizer step, a list for later), pass `copy=True` (each batch is cloned: 3 x B x L int64)
    or clone them yourself. `poison_released=True`, or LOWMEM_DEBUG_POISON=1 in the environment,
    fills every released buffer set with POISON (negative ids and labels), so a batch kept past
    its life fails loudly instead of silently turning into a later batch.

    `device`: a CUDA device to copy batches to on a side stream, or None / "cpu" for host batches.
    `depth`: batches prepared ahead of the consumer; the pool holds `depth + 1` buffer sets.
    `pinned_pool_bytes`: cap on the pinned pool; a smaller cap lowers the depth (logged and kept
    in `depth_note`), and a cap below two buffer sets raises ConfigError.
    `num_readers`: threads filling buffers; at most `depth` fills run at once, so readers beyond
    the depth add nothing.
    `pin_memory`: defaults to True exactly when copying to CUDA.
    `pinned_counter`: where pinned bytes are counted; the process-wide PINNED_BYTES by default.

    As the loader: one pass is one epoch from the current position, `len()` is the global steps
    of a full epoch, `steps_remaining()`, `set_epoch(e)`; `state_dict()` is the loader's state
    after the last batch handed to the consumer (batches waiting in the pool are not counted).
    `last_wait_s` / `wait_s_total`: how long the consumer waited for batches.
    """

    def __init__(
        self,
        loader,
        device: torch.device | str | None = None,
        depth: int = 2,
        pinned_pool_bytes: int | None = None,
        num_readers: int = 1,
        *,
        pin_memory: bool | None = None,
        copy: bool = False,
        poison_released: bool = False,
        pinned_counter: PinnedBytesCounter = PINNED_BYTES,
    ):
        _check_int("num_readers", num_readers, 1)
        _check_int("prefetch depth", depth, 1)
        if pinned_pool_bytes is not None and pinned_pool_bytes < 0:
            raise ConfigError(f"pinned_pool_bytes must be >= 0, got {pinned_pool_bytes}")
        self.loader = loader
        self.num_readers = num_readers
        self._device = _cuda_device_or_none(device)
        self.pin_memory = self._device is not None if pin_memory is None else bool(pin_memory)
        self.copy = bool(copy)
        self.poison_released = bool(poison_released) or os.environ.get(POISON_ENV) == "1"
        self.pinned_pool_bytes = pinned_pool_bytes
        self._counter = pinned_counter
        probe = loader.new_buffers(pin_memory=False)
        self.set_bytes = sum(t.nbytes for t in probe.values())
        del probe
        self.depth, self.depth_note = depth, None
        if self.pin_memory:
            self.depth, self.depth_note = pool_depth_for_cap(
                depth, self.set_bytes, pinned_pool_bytes
            )
        if self.depth_note:
            log.warning(self.depth_note)
        self._host_sets: list[Buffers] = []
        self._device_sets: list[dict] = []
        self._pinned_held_bytes = 0
        self._copy_stream = None
        self._pass_ref = None
        self.last_wait_s = 0.0
        self.wait_s_total = 0.0
        self.steps = 0
        self._allocate()

    # -- the pool ---------------------------------------------------------------------------
    def _allocate(self) -> None:
        for _ in range(self.depth + 1):
            try:
                buffers = self.loader.new_buffers(pin_memory=self.pin_memory)
            except RuntimeError as exc:
                if not self.pin_memory:
                    raise
                self._free_pool()
                raise ConfigError(
                    f"cannot allocate pinned host buffers ({exc}); pass pin_memory=False"
                ) from exc
            if self.pin_memory:
                self._counter.add(self.set_bytes)
                self._pinned_held_bytes += self.set_bytes
            self._host_sets.append(buffers)
        if self._device is not None:
            self._copy_stream = torch.cuda.Stream(self._device)
            for host_set in self._host_sets:
                device_buffers = {
                    k: torch.empty_like(t, device=self._device) for k, t in host_set.items()
                }
                self._device_sets.append({"buffers": device_buffers, "release": None})

    def _free_pool(self) -> None:
        self._host_sets.clear()
        self._device_sets.clear()
        self._copy_stream = None
        if self._pinned_held_bytes:
            self._counter.release(self._pinned_held_bytes)
            self._pinned_held_bytes = 0

    @property
    def pinned_bytes(self) -> int:
        """Page-locked bytes this prefetcher holds now."""
        return self._pinned_held_bytes

    # -- iteration --------------------------------------------------------------------------
    def __len__(self) -> int:
        """Global steps in one full epoch."""
        return len(self.loader)

    def steps_remaining(self) -> int:
        """Steps the next pass yields, or the pass in progress still yields."""
        return self.loader.steps_remaining()

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of epoch `epoch` (a no-op within it); a pass in progress is stopped."""
        self._close_pass()
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        self._close_pass()
        if not self._host_sets:
            self._allocate()
        run = _Pass(self)
        # The pass is referenced only by this generator, so a `break` (which drops the
        # generator) closes it at once; the weak reference lets close() reach it too.
        self._pass_ref = weakref.ref(run)
        return self._iterate(run)

    def _iterate(self, run: _Pass) -> Iterator[Batch]:
        held = None
        try:
            while not run.stopping.is_set():
                if held is not None:  # asking for the next batch ends the previous one's validity
                    run.release(*held)
                    held = None
                started = time.perf_counter()
                item = run.next_item()
                waited = time.perf_counter() - started
                if item is _END or run.stopping.is_set():
                    return
                if isinstance(item, BaseException):
                    raise item
                task, host_set, batch, device_set, copied = item
                if device_set is not None:
                    torch.cuda.current_stream(self._device).wait_event(copied)
                    batch = Batch(device_set["buffers"], batch.num_tokens, batch.num_loss_tokens)
                self.loader.commit(task)
                self.last_wait_s = waited
                self.wait_s_total += waited
                self.steps += 1
                held = (host_set, device_set)
                if self.copy:
                    batch = batch.clone()
                    run.release(*held)
                    held = None
                yield batch
        finally:
            if held is not None and self.poison_released:
                _poison(held[0] if held[1] is None else held[1]["buffers"])
            run.close()

    def _close_pass(self) -> None:
        run = self._pass_ref() if self._pass_ref is not None else None
        if run is not None:
            run.close()
        self._pass_ref = None

    def close(self) -> None:
        """Stop the current pass (joining its threads) and free the buffer pool."""
        self._close_pass()
        self._free_pool()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_pinned_held_bytes", 0):
            self._counter.release(self._pinned_held_bytes)
            self._pinned_held_bytes = 0

    # -- state and stats --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The loader's state after the last batch handed to the consumer."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; a pass in progress is stopped (its prepared batches dropped)."""
        self._close_pass()
        self.loader.load_state_dict(state)

    def stats(self) -> dict:
        """Steps handed out, consumer wait times (s), pool shape and pinned bytes."""
        return {
            "steps": self.steps,
            "wait_s_total": self.wait_s_total,
            "last_wait_s": self.last_wait_s,
            "mean_wait_s": self.wait_s_total / self.steps if self.steps else 0.0,
            "depth": self.depth,
            "buffer_sets": self.depth + 1,
            "num_readers": self.num_readers,
            "pin_memory": self.pin_memory,
            "pinned_bytes": self._pinned_held_bytes,
            "set_bytes": self.set_bytes,
            "depth_note": self.depth_note,
        }


def _poison(buffers: Buffers) -> None:
    """Overwrite a released buffer set (a device set on the current, compute, stream)."""
    for tensor in buffers.values():
        tensor.fill_(POISON)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _cuda_device_or_none(device) -> torch.device | None:
    """The CUDA device (with its index) batches go to, or None for host batches."""
    device = None if device is None else torch.device(device)
    if device is None or device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ConfigError(f"the prefetcher copies to CUDA devices or none, got {device}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {device} was asked for but CUDA is not available; pass device=None"
        )
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
