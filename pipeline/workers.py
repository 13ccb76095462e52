"""The reader pool: an ordered, bounded map over a thread pool.

Readers are threads, not processes: the numba collate kernels release the GIL, and threads share
the dataset's memory mapping (or file descriptors) without a per-worker copy of anything.
Results come back in submission order, at most `max_in_flight` items are being worked on or
waiting, and closing the generator (a `break`, an exception) cancels what has not started and
joins the threads before returning.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    num_threads: int,
    max_in_flight: int | None = None,
) -> Iterator[R]:
    """Yield `fn(item)` for each item, in order, computed by `num_threads` threads.

    An exception raised by `fn` is re-raised here when its item's turn comes.
    """
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    max_in_flight = max(1, max_in_flight or 2 * num_threads)
    with ThreadPoolExecutor(num_threads, thread_name_prefix="lowmem-reader") as executor:
        pending = deque()
        try:
            for item in items:
                pending.append(executor.submit(fn, item))
                if len(pending) >= max_in_flight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
