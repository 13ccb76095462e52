"""Atomic training state: exact round trip, crash leftovers, corruption, mismatches, weights."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lowmem_core.errors import CheckpointError
from trainer_low_mem.checkpoint import (
    MANIFEST_NAME,
    MODEL_NAME,
    STATE_DIR_NAME,
    Checkpointer,
    TrainingState,
    check_compatible,
    save_final_weights,
    verify_state_dir,
)
from trainer_low_mem.distributed import RankContext, create_accelerator
from trainer_low_mem.model import build_model

COMPAT = {
    "model": {"preset": "tiny", "d_model": 64},
    "dataset_fingerprint": "abc",
    "max_seq_len": 32,
    "packing": True,
    "seed": 0,
    "global_batch": 4,
}


@dataclass
class _Progress:
    """Any object with state_dict/load_state_dict, registered for checkpointing."""

    step: int = 0
    loader_state: dict | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "loader_state": self.loader_state}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.loader_state = state["step"], state["loader_state"]


class _Run:
    """A model, optimizer and schedule prepared by an accelerator, with a registered progress."""

    def __init__(self, output_dir, seed: int = 0):
        torch.manual_seed(seed)
        self.accelerator = create_accelerator(mixed_precision="no", cpu_multiprocess=False)
        model = build_model("tiny")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.progress = _Progress()
        self.accelerator.register_for_checkpointing(self.scheduler, self.progress)
        self.ckpt = Checkpointer(output_dir, RankContext.single(), self.accelerator)

    def train_a_step(self):
        ids = torch.randint(0, 259, (2, 16))
        self.model(ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def save(self, step: int):
        self.progress.step = step
        self.progress.loader_state = _state(step).loader_state
        return self.ckpt.save(_state(step))


def _state(step: int) -> TrainingState:
    return TrainingState(
        step=step,
        total_steps=10,
        tokens_seen=100 * step,
        loader_state={"epoch": 0, "consumed_rows": 4 * step, "seed": 0},
        world_size=1,
        compat=COMPAT,
        plan={"micro_batch": 2},
        config={"training": {"max_steps": 10}},
        config_hash="h",
        watchdog={"host_ram_limit_bytes": 1 << 30, "peak_used_bytes": 0, "history": []},
    )


def test_round_trip_restores_everything_exactly(tmp_path):
    run = _Run(tmp_path)
    run.train_a_step()
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    latest = run.save(3)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())
    assert latest == tmp_path / STATE_DIR_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_DIR_NAME]  # no temp or .prev left

    fresh = _Run(tmp_path, seed=1)
    path, manifest = fresh.ckpt.find_resumable()
    assert path == latest and manifest["step"] == 3 and manifest["dataset_fingerprint"] == "abc"
    assert fresh.ckpt.load(path, manifest, compat=COMPAT) == _state(3)
    assert fresh.progress == run.progress  # registered objects come back through load_state
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws
    for a, b in zip(
        run.model.state_dict().values(), fresh.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert fresh.scheduler.state_dict()["last_epoch"] == 1
    # Both continue identically: same optimizer moments and schedule.
    torch.manual_seed(11)
    run.train_a_step()
    torch.manual_seed(11)
    fresh.train_a_step()
    for a, b in zip(run.model.parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_leftover_temp_dir_is_ignored_and_cleaned(tmp_path):
    run = _Run(tmp_path)
    ckpt = run.ckpt
    run.save(1)
    crashed = tmp_path / f"{STATE_DIR_NAME}.tmp-99999"
    shutil.copytree(tmp_path / STATE_DIR_NAME, crashed)
    (crashed / MANIFEST_NAME).unlink()  # killed before the manifest was written
    path, manifest = ckpt.find_resumable()
    assert path == tmp_path / STATE_DIR_NAME and manifest["step"] == 1
    run.save(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_DIR_NAME]


def test_corrupt_latest_falls_back_to_prev(tmp_path):
    run = _Run(tmp_path)
    ckpt = run.ckpt
    run.save(1)
    step1 = tmp_path / "step1"
    shutil.copytree(tmp_path / STATE_DIR_NAME, step1)
    run.train_a_step()
    run.save(2)
    # The window between "tmp -> latest" and "remove .prev": both exist; then latest gets damaged.
    step1.rename(ckpt.prev_dir)
    weights = ckpt.latest_dir / MODEL_NAME
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    path, manifest = ckpt.find_resumable()
    assert path == ckpt.prev_dir and manifest["step"] == 1


def test_missing_latest_after_first_rename_uses_prev(tmp_path):
    run = _Run(tmp_path)
    ckpt = run.ckpt
    run.save(4)
    ckpt.latest_dir.rename(ckpt.prev_dir)  # crash after "latest -> prev", before "tmp -> latest"
    path, manifest = ckpt.find_resumable()
    assert path == ckpt.prev_dir and manifest["step"] == 4
    run.save(5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_DIR_NAME]
    assert ckpt.find_resumable()[1]["step"] == 5


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "truncated state"),
        ("flip", "does not match its sha256"),
        ("no_manifest", "incomplete state"),
        ("missing_file", "lacks optimizer.bin"),
        ("bad_manifest", "not valid JSON"),
    ],
)
def test_broken_state_without_fallback_says_what_is_wrong(tmp_path, damage, message):
    run = _Run(tmp_path)
    ckpt = run.ckpt
    run.save(1)
    latest = ckpt.latest_dir
    if damage == "truncate":
        data = (latest / MODEL_NAME).read_bytes()
        (latest / MODEL_NAME).write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray((latest / MODEL_NAME).read_bytes())
        data[100] ^= 0x01
        (latest / MODEL_NAME).write_bytes(bytes(data))
    elif damage == "no_manifest":
        (latest / MANIFEST_NAME).unlink()
    elif damage == "missing_file":
        (latest / "optimizer.bin").unlink()
    else:
        (latest / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=message):
        ckpt.find_resumable()
    with pytest.raises(CheckpointError):
        verify_state_dir(latest)


def test_no_state_at_all(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; start without it"):
        Checkpointer(tmp_path / "nothing", RankContext.single()).find_resumable()


def test_mismatch_lists_every_differing_field(tmp_path):
    other = json.loads(json.dumps(COMPAT))
    other["model"]["d_model"] = 128
    other["dataset_fingerprint"] = "xyz"
    with pytest.raises(CheckpointError) as info:
        check_compatible(COMPAT, other, tmp_path)
    text = str(info.value)
    assert "dataset_fingerprint: saved 'abc', now 'xyz'" in text
    assert "model.d_model: saved 64, now 128" in text
    assert "max_seq_len" not in text
    check_compatible(COMPAT, json.loads(json.dumps(COMPAT)), tmp_path)


def test_load_refuses_a_mismatched_run(tmp_path):
    run = _Run(tmp_path)
    run.save(1)
    path, manifest = run.ckpt.find_resumable()
    with pytest.raises(CheckpointError, match="global_batch: saved 4, now 8"):
        run.ckpt.load(path, manifest, compat={**COMPAT, "global_batch": 8})


def test_load_refuses_a_state_whose_registered_objects_differ(tmp_path):
    run = _Run(tmp_path)
    run.save(1)
    path, manifest = run.ckpt.find_resumable()
    (path / "custom_checkpoint_1.pkl").unlink()  # saved by a run that registered one object less
    with pytest.raises(CheckpointError, match=f"cannot load the training state in {path}"):
        _Run(tmp_path).ckpt.load(path, manifest, compat=COMPAT)


def test_final_weights_are_safetensors_with_config(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny")
    path = save_final_weights(tmp_path, model, {"preset": "tiny", "d_model": 64})
    tensors = load_file(str(path))
    assert torch.equal(tensors["embed.weight"], model.embed.weight.detach())
    assert json.loads((tmp_path / "config.json").read_text()) == {"preset": "tiny", "d_model": 64}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
