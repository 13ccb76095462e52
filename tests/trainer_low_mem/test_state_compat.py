"""Training states written by the previous release resume exactly.

data/state_positional_objects holds what that release wrote (its objects registered with
accelerate as custom_checkpoint_<i>.pkl, before objects were saved by name): the state at step 4
of a 6-step run of the tiny preset, the dataset it trained on, and the six losses of the same
run made without a stop. (States this release writes resume bit-equal: test_loop.py.)

The loss kernel has since changed its order of summation (only labelled positions reach the
head, in other chunks), so the resumed losses equal that release's to float32 rounding, not to
the bit; a schedule, optimizer or data position off by one step moves them by a thousand times
more, which the test checks too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer_low_mem.cli import parse_job_config
from trainer_low_mem.loop import train

FIXTURE = Path(__file__).parent / "data" / "state_positional_objects"


def _flags(root: Path, steps: int, *extra: str):
    return parse_job_config(
        [
            "--data",
            str(root / "tokens"),
            "--output_dir",
            str(root / "model_save"),
            "--model_preset",
            "tiny",
            "--max_seq_len",
            "64",
            "--auto_plan=False",
            "--batch_size_per_gpu",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--max_steps",
            str(steps),
            "--lr",
            "3e-3",
            "--warmup_steps",
            "2",
            "--save_every",
            "0",
            "--progress_bar=False",
            "--num_readers",
            "1",
            *extra,
        ]
    )


def test_a_state_with_positional_objects_resumes_bit_equal(tmp_path):
    root = tmp_path / "run"
    shutil.copytree(FIXTURE, root)
    straight = json.loads((root / "straight_losses.json").read_text())

    result = train(_flags(root, 6, "--is_keep_training=True"))

    assert result.final_step == 6
    tolerance = 1e-6
    assert result.losses == pytest.approx(straight[4:], rel=tolerance)
    step_changes = [abs(b - a) / abs(a) for a, b in zip(straight[:-1], straight[1:], strict=True)]
    assert min(step_changes) > 1000 * tolerance  # an off-by-one resume could not pass
    state = root / "model_save" / "train_latest_state"
    assert (state / "scheduler.pt").is_file()  # saved again by name
    assert not list(state.glob("custom_checkpoint_*.pkl"))
    record = json.loads((state / "training_state.json").read_text())
    assert record["step"] == 6
