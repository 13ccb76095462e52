"""Fixtures of the trainer tests: prompt/response datasets built for a sample model, and a run
stopped after a given step as a SIGTERM stops it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from pipeline.build import build_dataset
from pipeline.config import BuildConfig
from pipeline.sample_corpus import write_sample_sft


@pytest.fixture(scope="session")
def build_sample_sft():
    """A function: the sample prompt/response records under `root`, built with `model`'s
    tokenizer into `train_sft` / `eval_sft` datasets; returns the model, the record files and
    the datasets by name (model, train, eval, train_data, eval_data)."""

    def build(root: Path, model: Path, num_train: int, num_eval: int) -> dict[str, Path]:
        records = write_sample_sft(root, num_train=num_train, num_eval=num_eval)
        out = {"model": model, **records}
        for split in ("train", "eval"):
            out[f"{split}_data"] = root / f"{split}_sft"
            cfg = BuildConfig(
                inputs=[records[split]], out=out[f"{split}_data"], tokenizer=str(model), sft=True
            )
            build_dataset(cfg, progress=False)
        return out

    return build


@pytest.fixture(scope="session")
def stop_after_step():
    """A function: with `patch` (a monkeypatch, or its `.context()` so the resume runs
    unpatched), the next training run receives SIGTERM once it has finished optimizer step
    `step` (counted from 1), as a user's stop or a scheduler's preemption does."""
    from trainer_low_mem import loop

    def arm(patch: pytest.MonkeyPatch, step: int) -> None:
        original = loop._Run._train_step

        def train_step(self):
            outcome = original(self)
            if self.progress.step + 1 == step:
                signal.raise_signal(signal.SIGTERM)
            return outcome

        patch.setattr(loop._Run, "_train_step", train_step)

    return arm
