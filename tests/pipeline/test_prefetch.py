"""Prefetcher: same batches as the loader, exact resume state, bounded pool, pinned cap, clean
shutdown."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lowmem_core.errors import ConfigError
from lowmem_core.memory import PinnedBytesCounter
from pipeline import Loader, open_dataset
from pipeline.prefetch import Prefetcher, pool_depth_for_cap

# A lost buffer release would hang the pipeline: fail fast instead of at the suite's timeout.
pytestmark = pytest.mark.timeout(60)

B, L = 4, 32


def copies(batches):
    return [{k: v.clone() for k, v in batch.items()} for batch in batches]


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"batch {i} differs in {key}"


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lowmem-")]


@pytest.fixture
def dataset(make_dataset):
    with open_dataset(make_dataset(num_docs=200, seed=3, median_len=40)) as ds:
        yield ds


def new_loader(ds, **kw) -> Loader:
    return Loader(ds, batch_size=B, seq_len=L, seed=7, **kw)


class RecordingLoader:
    """A real Loader seen through the prefetcher's interface, recording fills and pinned
    requests."""

    def __init__(self, loader: Loader, fail_at_step: int | None = None):
        self.loader = loader
        self.fail_at_step = fail_at_step
        self.fills = 0
        self.pin_requests: list[bool] = []
        self._lock = threading.Lock()

    def new_buffers(self, pin_memory: bool = False):
        self.pin_requests.append(pin_memory)
        return self.loader.new_buffers(pin_memory=False)  # no pinned allocator without CUDA

    def fill(self, task, buffers):
        if self.fail_at_step is not None and task.step == self.fail_at_step:
            raise RuntimeError(f"disk error at step {task.step}")
        with self._lock:
            self.fills += 1
        return self.loader.fill(task, buffers)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)


@pytest.mark.parametrize("depth,num_readers", [(1, 1), (2, 1), (3, 3)])
def test_yields_exactly_the_loaders_batches_in_order_epoch_after_epoch(dataset, depth, num_readers):
    reference = new_loader(dataset)
    expected_epoch0, expected_epoch1 = copies(reference), copies(reference)
    with Prefetcher(new_loader(dataset), depth=depth, num_readers=num_readers) as prefetcher:
        assert len(prefetcher) == len(expected_epoch0)
        assert_same_batches(copies(prefetcher), expected_epoch0)
        assert_same_batches(copies(prefetcher), expected_epoch1)
        assert prefetcher.steps == 2 * len(expected_epoch0)
        assert prefetcher.state_dict() == reference.state_dict()


def test_state_after_k_batches_resumes_at_batch_k_despite_prefetching(dataset):
    expected = copies(new_loader(dataset))
    k = 5
    prefetcher = Prefetcher(new_loader(dataset), depth=3, num_readers=2)
    batches = iter(prefetcher)
    for _ in range(k):
        next(batches)
    time.sleep(0.05)  # let the readers run ahead: the pool now holds later batches
    state = prefetcher.state_dict()
    assert state["consumed_rows"] == k * B
    batches.close()

    resumed_loader = new_loader(dataset)
    resumed_loader.load_state_dict(state)
    assert_same_batches(copies(resumed_loader), expected[k:])

    resumed = Prefetcher(new_loader(dataset), depth=3, num_readers=2)
    resumed.load_state_dict(state)
    assert len(resumed) == len(expected)  # len: a full epoch; steps_remaining: from here
    assert resumed.steps_remaining() == len(expected) - k
    assert_same_batches(copies(resumed), expected[k:])


def test_load_state_dict_during_a_pass_drops_the_prepared_batches(dataset):
    expected = copies(new_loader(dataset))
    prefetcher = Prefetcher(new_loader(dataset), depth=2)
    batches = iter(prefetcher)
    for _ in range(4):
        next(batches)
    state = prefetcher.state_dict()
    for _ in range(3):
        next(batches)
    prefetcher.load_state_dict(state)
    assert list(batches) == []  # the interrupted pass ends instead of yielding stale buffers
    assert_same_batches(copies(prefetcher), expected[4:])
    assert prefetch_threads() == []


def test_buffers_are_a_fixed_pool_reused_round_robin(dataset):
    depth = 2
    prefetcher = Prefetcher(new_loader(dataset), depth=depth)
    pointers = {batch["input_ids"].data_ptr() for batch in prefetcher}
    assert len(pointers) == depth + 1
    assert pointers == {s["input_ids"].data_ptr() for s in prefetcher._host_sets}


def test_readers_stay_at_most_depth_batches_ahead_of_a_slow_consumer(dataset):
    depth = 3
    loader = RecordingLoader(new_loader(dataset))
    prefetcher = Prefetcher(loader, depth=depth, num_readers=2)
    batches = iter(prefetcher)
    next(batches)
    time.sleep(0.2)
    assert (
        loader.fills == 1 + depth
    )  # the batch in hand plus `depth` prepared, then the pool is full
    next(batches)
    time.sleep(0.2)
    assert loader.fills == 2 + depth
    batches.close()


def test_wait_timing_is_recorded_per_step(dataset):
    prefetcher = Prefetcher(new_loader(dataset), depth=2)
    waits = []
    for _ in prefetcher:
        waits.append(prefetcher.last_wait_s)
    assert prefetcher.steps == len(waits) == len(new_loader(dataset))
    assert all(w >= 0.0 for w in waits)
    assert prefetcher.wait_s_total == pytest.approx(sum(waits))
    stats = prefetcher.stats()
    assert stats["steps"] == len(waits)
    assert stats["mean_wait_s"] == pytest.approx(sum(waits) / len(waits))
    assert stats["buffer_sets"] == 3


def test_set_bytes_counts_the_three_int64_tensors(dataset):
    assert Prefetcher(new_loader(dataset)).set_bytes == 3 * B * L * 8


# -- pinned pool cap -------------------------------------------------------------------------


def test_pool_depth_for_cap_arithmetic():
    assert pool_depth_for_cap(2, 100, None) == (2, None)
    assert pool_depth_for_cap(2, 100, 300) == (2, None)
    depth, note = pool_depth_for_cap(4, 100, 299)
    assert depth == 1
    assert "lowered from 4 to 1" in note
    with pytest.raises(ConfigError, match="needs at least 2"):
        pool_depth_for_cap(2, 100, 199)


def test_pinned_pool_is_counted_and_never_exceeds_its_cap(dataset):
    counter = PinnedBytesCounter()
    loader = RecordingLoader(new_loader(dataset))
    set_bytes = 3 * B * L * 8
    cap = int(2.5 * set_bytes)
    prefetcher = Prefetcher(
        loader, depth=4, pinned_pool_bytes=cap, pin_memory=True, pinned_counter=counter
    )
    assert prefetcher.depth == 1
    assert "lowered from 4 to 1" in prefetcher.depth_note
    assert loader.pin_requests.count(True) == 2
    assert counter.current() == prefetcher.pinned_bytes == 2 * set_bytes
    for _ in prefetcher:
        assert counter.current() == 2 * set_bytes
    assert counter.peak() == 2 * set_bytes <= cap
    prefetcher.close()
    assert counter.current() == 0
    # A closed prefetcher allocates its pool again when iterated again, within the same cap.
    counter.reset_peak()
    assert len(copies(prefetcher)) == len(new_loader(dataset))
    assert counter.peak() == 2 * set_bytes
    prefetcher.close()
    assert counter.current() == 0


def test_pinned_cap_below_two_sets_is_a_config_error(dataset):
    with pytest.raises(ConfigError, match="needs at least 2"):
        Prefetcher(
            RecordingLoader(new_loader(dataset)),
            pinned_pool_bytes=3 * B * L * 8,
            pin_memory=True,
            pinned_counter=PinnedBytesCounter(),
        )


def test_unpinned_pool_counts_no_pinned_bytes(dataset):
    counter = PinnedBytesCounter()
    prefetcher = Prefetcher(new_loader(dataset), pinned_pool_bytes=1, pinned_counter=counter)
    assert prefetcher.pin_memory is False
    assert prefetcher.depth == 2
    assert counter.current() == 0


# -- shutdown --------------------------------------------------------------------------------


def test_early_break_stops_all_threads(dataset):
    prefetcher = Prefetcher(new_loader(dataset), depth=3, num_readers=3)
    for i, _ in enumerate(prefetcher):
        if i == 2:
            break
    assert prefetch_threads() == []
    assert prefetcher.state_dict()["consumed_rows"] == 3 * B


def test_reader_exception_is_raised_in_the_consumer_and_threads_stop(dataset):
    prefetcher = Prefetcher(
        RecordingLoader(new_loader(dataset), fail_at_step=3), depth=2, num_readers=2
    )
    seen = 0
    with pytest.raises(RuntimeError, match="disk error at step 3"):
        for _ in prefetcher:
            seen += 1
    assert seen == 3
    assert prefetch_threads() == []
    assert prefetcher.state_dict()["consumed_rows"] == 3 * B


def test_consumer_exception_inside_with_block_stops_threads_and_frees_pool(dataset):
    counter = PinnedBytesCounter()
    with (
        pytest.raises(ValueError, match="consumer failed"),
        Prefetcher(
            RecordingLoader(new_loader(dataset)),
            depth=2,
            num_readers=2,
            pin_memory=True,
            pinned_counter=counter,
        ) as prefetcher,
    ):
        for _ in prefetcher:
            raise ValueError("consumer failed")
    assert prefetch_threads() == []
    assert counter.current() == 0


def test_starting_a_new_pass_closes_the_previous_one(dataset):
    expected = copies(new_loader(dataset))
    prefetcher = Prefetcher(new_loader(dataset), depth=2, num_readers=2)
    first = iter(prefetcher)
    next(first)
    next(first)
    assert_same_batches(copies(prefetcher), expected[2:])
    assert list(first) == []
    assert prefetch_threads() == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_cuda_device_or_pinned_memory_without_cuda_is_a_config_error(dataset):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Prefetcher(new_loader(dataset), device="cuda")
    counter = PinnedBytesCounter()
    with pytest.raises(ConfigError, match="cannot allocate pinned host buffers"):
        Prefetcher(new_loader(dataset), pin_memory=True, pinned_counter=counter)
    assert counter.current() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_the_loaders_and_pinned_bytes_are_counted(dataset):
    counter = PinnedBytesCounter()
    expected = copies(new_loader(dataset))
    with Prefetcher(
        new_loader(dataset), device="cuda", depth=2, num_readers=2, pinned_counter=counter
    ) as prefetcher:
        assert counter.current() == 3 * 3 * B * L * 8
        got = []
        for batch in prefetcher:
            assert batch["input_ids"].is_cuda
            torch.cuda._sleep(200_000)  # a slow compute stream must not see its buffer overwritten
            got.append({k: v.cpu() for k, v in batch.items()})
        assert_same_batches(got, expected)
    assert counter.current() == 0
