"""HostRamWatchdog: when it reads, the order it escalates in, what it says, and its saved state."""

from __future__ import annotations

import numpy as np
import pytest

from lowmem_core.errors import ConfigError
from trainer_low_mem.watchdog import (
    HostRamWatchdog,
    WatchdogAction,
    WatchdogDecision,
    job_memory_bytes,
)

MIB = 1 << 20


class ScriptedReadings:
    """A reader returning the given byte counts in order, counting how often it was called."""

    def __init__(self, values: list[int]):
        self.values = list(values)
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.values.pop(0)


class DataPath:
    """Stands in for the trainer's prefetcher and dataset: applies the watchdog's decisions."""

    def __init__(self, prefetch_depth: int = 4, ultra_low_mem: bool = False):
        self.prefetch_depth = prefetch_depth
        self.ultra_low_mem = ultra_low_mem
        self.stopped = False

    def apply(self, decision: WatchdogDecision | None) -> None:
        if decision is None:
            return
        if decision.action is WatchdogAction.SHRINK_PREFETCH:
            self.prefetch_depth = decision.prefetch_depth
        elif decision.action is WatchdogAction.ULTRA_LOW_MEM:
            self.ultra_low_mem = True
        else:
            self.stopped = True

    def check(self, watchdog: HostRamWatchdog, step: int) -> WatchdogDecision | None:
        decision = watchdog.check(
            step, prefetch_depth=self.prefetch_depth, ultra_low_mem=self.ultra_low_mem
        )
        self.apply(decision)
        return decision


def test_reads_every_n_steps_while_below_the_soft_threshold():
    reader = ScriptedReadings([100] * 3)
    watchdog = HostRamWatchdog(1000, check_every_steps=10, read_used_bytes=reader)
    data = DataPath()
    decisions = [data.check(watchdog, step) for step in range(1, 31)]
    assert decisions == [None] * 30
    assert reader.calls == 3  # steps 10, 20, 30
    assert watchdog.last_used_bytes == 100


def test_escalates_shrink_then_ultra_low_mem_then_save_and_stop():
    # limit 1000 B: soft threshold 850, hard threshold 950.
    reader = ScriptedReadings([500, 860, 870, 880, 900, 940, 960])
    watchdog = HostRamWatchdog(1000, check_every_steps=5, read_used_bytes=reader)
    data = DataPath(prefetch_depth=4)
    actions = {}
    for step in range(1, 21):
        decision = data.check(watchdog, step)
        if decision is not None:
            actions[step] = (decision.action, decision.prefetch_depth, decision.used_bytes)
        if data.stopped:
            break
    # Below soft at step 5; 860 at step 10 puts the watchdog on alert, so it reads at every step
    # after.
    assert actions == {
        10: (WatchdogAction.SHRINK_PREFETCH, 2, 860),
        11: (WatchdogAction.SHRINK_PREFETCH, 1, 870),
        12: (WatchdogAction.ULTRA_LOW_MEM, None, 880),
        15: (WatchdogAction.SAVE_AND_STOP, None, 960),
    }
    assert reader.calls == 7 and reader.values == []
    assert (data.prefetch_depth, data.ultra_low_mem, data.stopped) == (1, True, True)
    assert [d.action for d in watchdog.history] == [
        WatchdogAction.SHRINK_PREFETCH,
        WatchdogAction.SHRINK_PREFETCH,
        WatchdogAction.ULTRA_LOW_MEM,
        WatchdogAction.SAVE_AND_STOP,
    ]


def test_stop_message_gives_usage_limit_and_what_was_tried():
    reader = ScriptedReadings([900 * MIB, 990 * MIB])
    watchdog = HostRamWatchdog(1024 * MIB, check_every_steps=1, read_used_bytes=reader)
    data = DataPath(prefetch_depth=1)
    first = data.check(watchdog, 7)
    stop = data.check(watchdog, 8)
    assert first.action is WatchdogAction.ULTRA_LOW_MEM
    assert first.message == (
        "host RAM 900.00 MiB is 87.9% of the 1.00 GiB limit (soft threshold 85%) at step 7: "
        "switching the dataset readers to ultra-low-mem mode"
    )
    assert stop.action is WatchdogAction.SAVE_AND_STOP
    assert stop.message == (
        "host RAM 990.00 MiB is 96.7% of the 1.00 GiB limit (stop threshold 95%) at step 8 after "
        "trying ultra-low-mem readers at step 7 (87.9%): saving the state and stopping before the "
        "host runs out of memory; raise --host_ram_limit, lower --num_readers, or free host "
        "memory, then resume with --is_keep_training=True"
    )
    assert stop.used_frac == pytest.approx(990 / 1024)


def test_a_jump_past_the_hard_threshold_stops_at_once_and_says_nothing_was_tried():
    watchdog = HostRamWatchdog(1000, check_every_steps=1, read_used_bytes=ScriptedReadings([999]))
    decision = DataPath(prefetch_depth=8).check(watchdog, 3)
    assert decision.action is WatchdogAction.SAVE_AND_STOP
    assert (
        "after no earlier action (the usage crossed the stop threshold between two checks)"
        in decision.message
    )


def test_never_asks_for_an_action_already_in_effect():
    # Depth 1 and ultra-low-mem already: between the thresholds there is nothing left to do.
    reader = ScriptedReadings([900, 910, 920, 951])
    watchdog = HostRamWatchdog(1000, check_every_steps=1, read_used_bytes=reader)
    data = DataPath(prefetch_depth=1, ultra_low_mem=True)
    assert [data.check(watchdog, s) for s in (1, 2, 3)] == [None, None, None]
    assert data.check(watchdog, 4).action is WatchdogAction.SAVE_AND_STOP


def test_odd_prefetch_depth_halves_down_to_the_minimum():
    reader = ScriptedReadings([900, 900, 900])
    watchdog = HostRamWatchdog(
        1000, check_every_steps=1, read_used_bytes=reader, min_prefetch_depth=2
    )
    data = DataPath(prefetch_depth=5)
    depths = [data.check(watchdog, s).prefetch_depth for s in (1, 2)]
    assert depths == [2, None]  # 5 -> 2 (the minimum), then ultra-low-mem
    assert data.ultra_low_mem


def test_falls_back_to_every_n_steps_when_usage_drops_below_soft():
    reader = ScriptedReadings([900, 500, 500])
    watchdog = HostRamWatchdog(1000, check_every_steps=4, read_used_bytes=reader)
    data = DataPath()
    for step in range(1, 12):
        data.check(watchdog, step)
    # Reads at 4 (on alert), at 5 (below soft again, alert off), then only at 8.
    assert reader.calls == 3 and reader.values == []
    assert watchdog.due(12) and not watchdog.due(13)


def test_state_dict_round_trip_keeps_history_and_peak():
    reader = ScriptedReadings([860, 870])
    watchdog = HostRamWatchdog(1000, check_every_steps=1, read_used_bytes=reader)
    data = DataPath(prefetch_depth=2)
    data.check(watchdog, 1)
    data.check(watchdog, 2)
    state = watchdog.state_dict()
    assert state == {
        "host_ram_limit_bytes": 1000,
        "peak_used_bytes": 870,
        "history": [d.to_dict() for d in watchdog.history],
    }
    assert [h["action"] for h in state["history"]] == ["shrink_prefetch", "ultra_low_mem"]
    restored = HostRamWatchdog(2000, check_every_steps=1, read_used_bytes=ScriptedReadings([]))
    restored.load_state_dict(state)
    assert restored.history == watchdog.history
    assert restored.peak_used_bytes == 870
    assert restored.host_ram_limit_bytes == 2000  # the limit in force is the new run's


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(host_ram_limit_bytes=0), "must be greater than 0 bytes, got 0"),
        (dict(host_ram_limit_bytes=100, check_every_steps=0), "at least 1 step, got 0"),
        (
            dict(host_ram_limit_bytes=100, soft_frac=0.96, hard_frac=0.95),
            "0 < soft (0.96) < hard (0.95) < 1",
        ),
        (
            dict(host_ram_limit_bytes=100, min_prefetch_depth=0),
            "minimum prefetch depth must be at least 1, got 0",
        ),
    ],
)
def test_rejects_impossible_settings(kwargs, message):
    with pytest.raises(ConfigError) as info:
        HostRamWatchdog(**kwargs)
    assert message in str(info.value)


def test_job_memory_counts_an_allocation_of_this_process(monkeypatch):
    import mmap

    from trainer_low_mem import watchdog

    # The cgroup floor counts every process of the machine's cgroup (a busy test run's too) and
    # is refreshed lazily: take this process's own reading.
    monkeypatch.setattr(watchdog, "cgroup_unreclaimable_bytes", lambda: 0)
    before = job_memory_bytes()
    # Fresh anonymous pages, every one written: a heap allocation could reuse pages a long test
    # run already holds, and then nothing would grow.
    hog = mmap.mmap(-1, 64 * MIB)
    hog.write(b"\x01" * (64 * MIB))
    after = job_memory_bytes()
    assert after - before >= 60 * MIB
    hog.close()


def test_real_memory_hog_escalates_in_order_and_stops_before_the_limit():
    """A leak in this process grows 4 MiB a step against a limit 256 MiB above today's usage."""
    baseline = job_memory_bytes()
    limit = baseline + 256 * MIB
    watchdog = HostRamWatchdog(limit, check_every_steps=2)
    data = DataPath(prefetch_depth=4)
    leak = []
    for step in range(1, 1000):
        leak.append(np.ones(4 * MIB, dtype=np.uint8))
        decision = data.check(watchdog, step)
        if data.stopped:
            break
    else:
        pytest.fail("the watchdog never stopped the run")
    actions = [d.action for d in watchdog.history]
    assert actions == [
        WatchdogAction.SHRINK_PREFETCH,
        WatchdogAction.SHRINK_PREFETCH,
        WatchdogAction.ULTRA_LOW_MEM,
        WatchdogAction.SAVE_AND_STOP,
    ]
    assert [d.prefetch_depth for d in watchdog.history[:2]] == [2, 1]
    # Every soft action came at or above 85% and below 95%; the stop at or above 95%, below the
    # limit.
    for d in watchdog.history[:3]:
        assert 0.85 * limit <= d.used_bytes < 0.95 * limit
    assert 0.95 * limit <= decision.used_bytes < limit
    leaked = 4 * MIB * len(leak)
    assert leaked >= 0.95 * limit - baseline - 16 * MIB
    del leak


def test_job_memory_sums_ranks_per_node_and_takes_the_busiest_node():
    own = job_memory_bytes()
    # Four ranks on two nodes: node 0 holds ranks 0-1, node 1 ranks 2-3.
    readings = [1 * MIB, 2 * MIB, 4 * MIB, 8 * MIB]
    gathered = []

    def gather(value: float) -> list[float]:
        gathered.append(value)
        return [float(r) for r in readings]

    assert job_memory_bytes(gather, ranks_per_node=2) == 12 * MIB  # the busiest node
    assert job_memory_bytes(gather, ranks_per_node=4) == 15 * MIB
    assert job_memory_bytes(gather, ranks_per_node=1) == 8 * MIB
    # Each call contributed this process's own reading to the collective.
    assert len(gathered) == 3 and all(abs(g - own) < 64 * MIB for g in gathered)
