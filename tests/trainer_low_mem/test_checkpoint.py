"""Atomic training state: exact round trip, crash leftovers, corruption, mismatches, weights."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from lowmem_core.errors import CheckpointError, ConfigError, DivergenceError
from trainer_low_mem.checkpoint import (
    MANIFEST_NAME,
    MODEL_NAME,
    STATE_DIR_NAME,
    Checkpointer,
    TrainingState,
    check_compatible,
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
        self.ckpt = Checkpointer(output_dir, RankContext.single(), self.accelerator)
        self.ckpt.register("scheduler", self.scheduler)
        self.ckpt.register("progress", self.progress)

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
    assert fresh.progress == run.progress  # registered objects come back by name
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
    (path / "progress.pt").unlink()  # saved by a run that registered one object less
    with pytest.raises(CheckpointError, match=f"cannot load the training state in {path}"):
        _Run(tmp_path).ckpt.load(path, manifest, compat=COMPAT)


def _rewrite_listed(state_dir, name: str, data: bytes) -> None:
    """Replace a file and update its manifest entry, as a manifest-consistent bad writer would."""
    from lowmem_core.durable import file_sha256

    (state_dir / name).write_bytes(data)
    manifest = json.loads((state_dir / MANIFEST_NAME).read_text())
    for entry in manifest["files"]:
        if entry["name"] == name:
            entry["bytes"], entry["sha256"] = len(data), file_sha256(state_dir / name)
    (state_dir / MANIFEST_NAME).write_text(json.dumps(manifest))


def _latest_and_prev(tmp_path):
    run = _Run(tmp_path)
    run.save(1)
    step1 = tmp_path / "step1"
    shutil.copytree(tmp_path / STATE_DIR_NAME, step1)
    run.save(2)
    step1.rename(run.ckpt.prev_dir)
    return run


@pytest.mark.parametrize(
    "manifest",
    [
        {"format": "lowmem-train-state/2", "files": "x", "step": 2},
        {"format": "lowmem-train-state/2"},
        {"format": "lowmem-train-state/2", "step": 2, "files": [{"name": 3}]},
        [],
    ],
)
def test_malformed_manifest_falls_back_to_prev(tmp_path, manifest):
    run = _latest_and_prev(tmp_path)
    (run.ckpt.latest_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    path, found = run.ckpt.find_resumable()
    assert path == run.ckpt.prev_dir and found["step"] == 1
    with pytest.raises(CheckpointError, match="corrupt state|format"):
        verify_state_dir(run.ckpt.latest_dir)


@pytest.mark.parametrize("payload", [b"[]", b"{not json", b'{"step": 2}'])
def test_malformed_training_state_falls_back_to_prev(tmp_path, payload):
    run = _latest_and_prev(tmp_path)
    _rewrite_listed(run.ckpt.latest_dir, "training_state.json", payload)
    path, found = run.ckpt.find_resumable()
    assert path == run.ckpt.prev_dir and found["step"] == 1


def test_save_after_resuming_from_prev_keeps_prev_until_the_new_state_lands(tmp_path, monkeypatch):
    import trainer_low_mem.checkpoint as checkpoint

    run = _latest_and_prev(tmp_path)
    weights = run.ckpt.latest_dir / MODEL_NAME
    weights.write_bytes(weights.read_bytes()[:100])  # latest damaged: resume from .prev
    path, _ = run.ckpt.locate_resume(keep_training=True)
    assert path == run.ckpt.prev_dir
    real_rename = os.rename

    def crash_before_the_new_state_lands(src, dst):
        if ".tmp-" in str(src):
            raise KeyboardInterrupt  # killed between "old state out" and "new state in"
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", crash_before_the_new_state_lands)
    with pytest.raises(KeyboardInterrupt):
        run.save(3)
    path, found = run.ckpt.find_resumable()
    assert path == run.ckpt.prev_dir and found["step"] == 1  # the good state survived
    monkeypatch.setattr(checkpoint.os, "rename", real_rename)
    run.save(3)
    assert run.ckpt.find_resumable()[1]["step"] == 3


def test_save_never_deletes_a_live_runs_temp_dir(tmp_path):
    run = _Run(tmp_path)
    live = tmp_path / f"{STATE_DIR_NAME}.tmp-{os.getppid()}"  # a running process's pid
    live.mkdir()
    (live / "optimizer.bin").write_bytes(b"being written")
    run.save(1)
    assert (live / "optimizer.bin").read_bytes() == b"being written"


def test_output_dir_lock_refuses_a_second_run_and_dies_with_kill_9(tmp_path):
    from trainer_low_mem.run_lock import lock_output_dir

    out = tmp_path / "out"
    lock = lock_output_dir(out, RankContext.single())
    with pytest.raises(ConfigError, match=f"--output_dir {out} is in use by another process"):
        lock_output_dir(out, RankContext.single())
    lock.release()
    assert not out.exists()  # created by the lock and left empty: removed again
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK.format(out=str(out))], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match="in use by another process"):
        lock_output_dir(out, RankContext.single())
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock_output_dir(out, RankContext.single()).release()  # no stale lock after kill -9


_HOLD_LOCK = """
import time
from trainer_low_mem.run_lock import lock_output_dir
from trainer_low_mem.distributed import RankContext
lock_output_dir({out!r}, RankContext.single())
print("locked", flush=True)
time.sleep(600)
"""


def test_output_dir_that_is_a_file_or_read_only_fails_at_start(tmp_path):
    from trainer_low_mem.run_lock import lock_output_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="--output_dir .* is a file"):
        lock_output_dir(tmp_path / "f", RankContext.single())
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="is not writable"):
            lock_output_dir(tmp_path / "ro", RankContext.single())


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    from trainer_low_mem.step import Stepper

    run = _Run(tmp_path)
    stepper = Stepper(
        run.accelerator,
        RankContext.single(),
        run.model,
        run.optimizer,
        run.scheduler,
        max_grad_norm=1.0,
        max_bad_steps=3,
    )
    ids = torch.randint(0, 259, (2, 16))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(16).expand(2, 16)}
    stepper.run([batch], 1)
    assert not stepper.skipped
    before = [p.detach().clone() for p in run.model.parameters()]
    lr_before = run.scheduler.get_last_lr()
    good_forward = stepper._forward
    stepper._forward = lambda mb, step, i: good_forward(mb, step, i) * float("nan")
    for step in (2, 3):
        stepper.run([batch], step)
        assert stepper.skipped and stepper.bad_steps == step - 1
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters(), strict=True))
    assert run.scheduler.get_last_lr() == lr_before  # no schedule step for a skipped step
    assert all(p.grad is None for p in run.model.parameters())
    with pytest.raises(DivergenceError, match="3 consecutive steps up to step 4"):
        stepper.run([batch], 4)
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_resume_settings_refuse_other_optimizer_flags_and_a_used_up_budget():
    from trainer_low_mem.progress import check_resume_settings

    saved = {"optim": {"lr": 0.001, "weight_decay": 0.1}}
    check_resume_settings(saved, {"optim": {"lr": 0.001, "weight_decay": 0.1}}, 12, 12)
    with pytest.raises(ConfigError, match=r"got --lr 0.5 \(saved 0.001\); drop those flags"):
        check_resume_settings(saved, {"optim": {"lr": 0.5, "weight_decay": 0.1}}, 3, 12)
    with pytest.raises(ConfigError, match="at step 12 but this run stops at step 5"):
        check_resume_settings(saved, saved, 12, 5)


def test_second_stop_signal_does_not_abort_the_save_a_third_does():
    from trainer_low_mem.signals import StopSignals

    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # launchers forward SIGINT then SIGTERM
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_shard_truncated_during_training_is_one_clear_error(tmp_path):
    from lowmem_core.errors import PipelineError
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig
    from trainer_low_mem.data import check_shard_sizes

    (tmp_path / "in.txt").write_text("hello world\n\nsecond document here\n")
    build_dataset(BuildConfig(inputs=[tmp_path / "in.txt"], out=tmp_path / "ds"), progress=False)
    check_shard_sizes(tmp_path / "ds")
    shard = next((tmp_path / "ds").glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(PipelineError, match="changed during training .* the last saved state"):
        check_shard_sizes(tmp_path / "ds")


def test_a_shard_truncated_mid_run_is_found_by_the_periodic_check(make_dataset):
    from types import SimpleNamespace

    from lowmem_core.errors import PipelineError
    from pipeline.batch_spec import TokenRows
    from trainer_low_mem.data import TrainData

    path = make_dataset(200)
    data = TrainData(
        path, seed=0, rank=0, world_size=1, device=torch.device("cpu"), shard_check_every_s=0.0
    )
    # pread readers: the batches read ahead of the check meet a short read, not SIGBUS (which
    # would end this process, as it ends a training run in mmap mode).
    plan = SimpleNamespace(
        ultra_low_mem=True, micro_batch_per_rank=2, prefetch_depth=2, pinned_pool_bytes=0,
        num_readers=1,
    )  # fmt: skip
    data.configure(plan, TokenRows(seq_len=32))
    data.start(None)
    data.next_batch()
    shard = next(path.glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated under the running job
    with pytest.raises(PipelineError, match="changed during training"):
        data.next_batch()
    data.close()


def test_a_flipped_token_bit_is_found_before_training(tmp_path, capsys):
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig
    from trainer_low_mem.cli import main

    (tmp_path / "in.txt").write_text("hello world\n\nsecond document here\n")
    build_dataset(BuildConfig(inputs=[tmp_path / "in.txt"], out=tmp_path / "ds"), progress=False)
    shard = next((tmp_path / "ds").glob("shard-*"))
    from pipeline import open_dataset

    with open_dataset(tmp_path / "ds") as ds:
        tokens = np.asarray(ds[1]).astype(ds.token_dtype).tobytes()
    data = bytearray(shard.read_bytes())
    data[data.index(tokens) + 2] ^= 0x01  # a token id, same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    argv = [
        "train",
        "--data",
        str(tmp_path / "ds"),
        "--output_dir",
        str(tmp_path / "out"),
        "--model_preset",
        "tiny",
        "--max_seq_len",
        "16",
        "--max_steps",
        "1",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^error: .*{shard.name}.*sha256", err, re.M), err
    assert not (tmp_path / "out").exists()  # refused before any step; nothing written
