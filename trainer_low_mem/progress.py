"""A run's progress: the counters a resume continues from, the result it reports, how many
steps it takes, which settings a resume may not change, and the step bar rank 0 shows."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lowmem_core.errors import ConfigError
from trainer_low_mem.config import JobConfig


@dataclass
class TrainResult:
    """What a finished (or signalled) run reports."""

    final_step: int
    total_steps: int
    losses: list[float]  # global token-mean loss of each optimizer step this process ran
    tokens_seen: int  # counted target tokens over the whole run, resumed part included
    loader_state: dict[str, Any]  # data position after the last completed optimizer step
    plan: dict[str, Any]
    world_size: int
    state_dir: Path | None
    export_dir: Path | None
    exit_code: int = 0
    backoffs: list[str] = field(default_factory=list)  # one reason per OOM backoff


@dataclass
class RunProgress:
    """What a resume continues from: optimizer steps done, counted target tokens, and the data
    position after the last completed step (saved in the state's record, training_state.json)."""

    step: int = 0
    tokens_seen: int = 0
    loader_state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.loader_state = state["loader_state"]


def total_steps(config: JobConfig, rows_per_epoch: int, global_batch: int) -> int:
    """--max_steps, or ceil(epochs * rows per epoch / global batch), whichever is smaller."""
    t = config.training
    epochs = t.epochs if t.epochs is not None else (None if t.max_steps is not None else 1.0)
    candidates = [t.max_steps] if t.max_steps is not None else []
    if epochs is not None:
        candidates.append(max(1, math.ceil(epochs * rows_per_epoch / global_batch)))
    return min(candidates)


def check_resume_settings(
    saved: dict[str, Any], now: dict[str, Any], step: int, total_steps: int
) -> None:
    """Resume refuses optimizer flags other than the saved ones (the restored optimizer and
    schedule would silently keep the saved values) and a step budget already used up."""
    old, new = saved.get("optim") or {}, now.get("optim") or {}
    diffs = [
        f"--{k} {new[k]!r} (saved {old[k]!r})"
        for k in sorted(set(old) & set(new))
        if k != "max_bad_steps" and old[k] != new[k]
    ]
    if diffs:
        raise ConfigError(
            f"resume keeps the saved optimizer settings but got {', '.join(diffs)}; drop those "
            "flags (or pass the saved values) to resume, or start a new run in another --output_dir"
        )
    if step > total_steps:
        raise ConfigError(
            f"the resumed state is at step {step} but this run stops at step {total_steps} "
            "(--max_steps or --epochs); raise --max_steps above the saved step to train on"
        )


def clock(seconds: float) -> str:
    """H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def eta_seconds(elapsed_s: float, steps_done: int, steps_left: int) -> float:
    """Seconds to the last step at the run's average wall time per step so far (evals and
    saves included, as they will recur)."""
    return elapsed_s / max(steps_done, 1) * max(steps_left, 0)


class StepBar:
    """The optimizer-step progress bar. Its ETA is the log line's (`advance` is given it):
    tqdm's own rate and remaining time, from a smoothed rate of its own, are left out."""

    FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, total_steps: int, initial_step: int, enabled: bool):
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            unit="step",
            dynamic_ncols=True,
            bar_format=self.FORMAT,
            disable=not enabled,
        )

    def advance(self, eta_s: float) -> None:
        """One more step done; `eta_s` to go."""
        self._bar.set_postfix_str(f"eta {clock(eta_s)}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
