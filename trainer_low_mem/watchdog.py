"""The host-RAM watchdog: act before the job reaches its host-memory limit.

Every `check_every_steps` optimizer steps the trainer asks `HostRamWatchdog.check` what to do.
The watchdog reads the job's memory (by default `job_memory_bytes`: the private memory (USS) of
the ranks' processes and their children on the busiest node, and at least the cgroup's
unreclaimable usage when a cgroup limit applies) and escalates, one action per check so that each
action's effect is read before the next is taken:

1. at `soft_frac` of the limit (85%): halve the prefetch depth, down to 1 buffer;
2. still at or above `soft_frac` with the prefetch depth at 1: reopen the dataset in
   ultra-low-mem mode (no long-lived mapping, page cache dropped as it is read);
3. at `hard_frac` of the limit (95%), whatever was tried: save the state and stop, with a message
   giving the usage, the limit and the actions already taken.

Once a reading is at or above `soft_frac` the watchdog reads at every step instead of every
`check_every_steps`, because memory that is climbing can cover the last 10% quickly.

The policy is a pure function of the readings, so ranks that feed it the same job-wide reading
(the trainer gathers the ranks' readings in one collective) take the same action at the same
step. The limit is the job's: `--host_ram_limit`, else the cgroup limit, else the machine's RAM.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from lowmem_core.errors import ConfigError
from lowmem_core.memory import format_bytes, process_memory, read_cgroup_memory


class WatchdogAction(str, enum.Enum):
    """What the trainer must do after a check, in the order the watchdog escalates."""

    SHRINK_PREFETCH = "shrink_prefetch"
    ULTRA_LOW_MEM = "ultra_low_mem"
    SAVE_AND_STOP = "save_and_stop"


@dataclass(frozen=True)
class WatchdogDecision:
    """One action requested at `step`, with the reading that caused it."""

    action: WatchdogAction
    step: int
    used_bytes: int
    limit_bytes: int
    prefetch_depth: int | None  # the new depth for SHRINK_PREFETCH, else None
    message: str

    @property
    def used_frac(self) -> float:
        return self.used_bytes / self.limit_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["action"] = self.action.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WatchdogDecision:
        return cls(**{**d, "action": WatchdogAction(d["action"])})


def cgroup_unreclaimable_bytes() -> int:
    """The cgroup's usage less its page cache when a cgroup memory limit applies, else 0.

    Page cache is reclaimable, so it is left out; what remains is what the cgroup's
    out-of-memory killer weighs against the limit.
    """
    cgroup = read_cgroup_memory()
    if cgroup is None or cgroup.limit_bytes is None or cgroup.current_bytes is None:
        return 0
    return max(0, cgroup.current_bytes - (cgroup.page_cache_bytes or 0))


def job_memory_bytes(
    gather: Callable[[float], list[float]] | None = None, ranks_per_node: int = 1
) -> int:
    """The job's host memory on its busiest node, in bytes.

    Each rank counts the private memory (USS) of its process and their children: what would be
    freed if they exited. Memory-mapped dataset pages are shared by the ranks and reclaimable, so
    they are not counted. With `gather` (a collective returning every rank's value, indexed by
    rank; ranks of one node are consecutive, as torchrun numbers them) the readings are summed
    per node of `ranks_per_node` ranks and the largest sum is taken. When a cgroup limit applies,
    the cgroup's unreclaimable usage is the floor.
    """
    used = float(process_memory().uss_bytes)
    if gather is not None:
        per_rank = gather(used)
        used = max(
            sum(per_rank[i : i + ranks_per_node]) for i in range(0, len(per_rank), ranks_per_node)
        )
    return int(max(used, cgroup_unreclaimable_bytes()))


class HostRamWatchdog:
    """Escalating host-RAM guard; see the module docstring for the policy.

    `read_used_bytes` returns the job's current host memory in bytes; the trainer passes one that
    sums the ranks' readings, tests pass their own.
    """

    def __init__(
        self,
        host_ram_limit_bytes: int,
        check_every_steps: int = 10,
        *,
        soft_frac: float = 0.85,
        hard_frac: float = 0.95,
        read_used_bytes: Callable[[], int] = job_memory_bytes,
        min_prefetch_depth: int = 1,
    ):
        if host_ram_limit_bytes <= 0:
            raise ConfigError(
                f"the host-RAM limit must be greater than 0 bytes, got {host_ram_limit_bytes}"
            )
        if check_every_steps < 1:
            raise ConfigError(
                f"the watchdog's check interval must be at least 1 step, got {check_every_steps}"
            )
        if not 0.0 < soft_frac < hard_frac < 1.0:
            raise ConfigError(
                f"watchdog thresholds must satisfy 0 < soft ({soft_frac}) < hard ({hard_frac}) < 1"
            )
        if min_prefetch_depth < 1:
            raise ConfigError(
                f"the minimum prefetch depth must be at least 1, got {min_prefetch_depth}"
            )
        self.host_ram_limit_bytes = int(host_ram_limit_bytes)
        self.check_every_steps = check_every_steps
        self.soft_frac = soft_frac
        self.hard_frac = hard_frac
        self.min_prefetch_depth = min_prefetch_depth
        self._read_used_bytes = read_used_bytes
        self.history: list[WatchdogDecision] = []
        self.last_used_bytes: int | None = None
        self.peak_used_bytes = 0
        self._alert = False  # the last reading was at or above the soft threshold

    @property
    def soft_limit_bytes(self) -> int:
        return int(self.soft_frac * self.host_ram_limit_bytes)

    @property
    def hard_limit_bytes(self) -> int:
        return int(self.hard_frac * self.host_ram_limit_bytes)

    def due(self, step: int) -> bool:
        """True when `check(step, ...)` will take a reading."""
        return self._alert or step % self.check_every_steps == 0

    def check(
        self, step: int, *, prefetch_depth: int, ultra_low_mem: bool
    ) -> WatchdogDecision | None:
        """Read the job's memory when due and return the action the trainer must take, if any.

        `prefetch_depth` and `ultra_low_mem` describe the data path as it runs now, so the
        watchdog never asks for an action that is already in effect.
        """
        if not self.due(step):
            return None
        used = int(self._read_used_bytes())
        self.last_used_bytes = used
        self.peak_used_bytes = max(self.peak_used_bytes, used)
        self._alert = used >= self.soft_limit_bytes
        limit = self.host_ram_limit_bytes
        reading = (
            f"host RAM {format_bytes(used)} is {100 * used / limit:.1f}% of the "
            f"{format_bytes(limit)} limit"
        )
        if used >= self.hard_limit_bytes:
            decision = WatchdogDecision(
                WatchdogAction.SAVE_AND_STOP,
                step,
                used,
                limit,
                None,
                f"{reading} (stop threshold {100 * self.hard_frac:.0f}%) at step {step} after "
                f"{self._tried()}: saving the state and stopping before the host runs out of "
                "memory; raise --host_ram_limit, lower --num_readers, or free host memory, then "
                "resume with --is_keep_training=True",
            )
        elif not self._alert:
            return None
        elif prefetch_depth > self.min_prefetch_depth:
            new_depth = max(self.min_prefetch_depth, prefetch_depth // 2)
            decision = WatchdogDecision(
                WatchdogAction.SHRINK_PREFETCH,
                step,
                used,
                limit,
                new_depth,
                f"{reading} (soft threshold {100 * self.soft_frac:.0f}%) at step {step}: prefetch "
                f"depth {prefetch_depth} -> {new_depth}",
            )
        elif not ultra_low_mem:
            decision = WatchdogDecision(
                WatchdogAction.ULTRA_LOW_MEM,
                step,
                used,
                limit,
                None,
                f"{reading} (soft threshold {100 * self.soft_frac:.0f}%) at step {step}: switching "
                "the dataset readers to ultra-low-mem mode",
            )
        else:
            # Nothing cheaper is left; keep reading every step and stop at the hard threshold.
            return None
        self.history.append(decision)
        return decision

    def _tried(self) -> str:
        done = [d for d in self.history if d.action is not WatchdogAction.SAVE_AND_STOP]
        if not done:
            return "no earlier action (the usage crossed the stop threshold between two checks)"
        parts = []
        for d in done:
            what = (
                f"prefetch depth -> {d.prefetch_depth}"
                if d.action is WatchdogAction.SHRINK_PREFETCH
                else "ultra-low-mem readers"
            )
            parts.append(f"{what} at step {d.step} ({100 * d.used_frac:.1f}%)")
        return "trying " + ", ".join(parts)

    # -- Stateful ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "host_ram_limit_bytes": self.host_ram_limit_bytes,
            "peak_used_bytes": self.peak_used_bytes,
            "history": [d.to_dict() for d in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the actions taken so far (the limit in force is this run's, not the saved
        one)."""
        self.peak_used_bytes = int(state["peak_used_bytes"])
        self.history = [WatchdogDecision.from_dict(d) for d in state["history"]]
