"""The training loop on CPU, single process: exact resume, split-independent loss, OOM backoff,
signals, and the guards around an output directory."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_core.errors import CheckpointError, ConfigError, MemoryLimitError, StoppedError
from lowmem_core.memory import effective_host_limit_bytes
from trainer_low_mem import loop, oom, signals
from trainer_low_mem.checkpoint import Checkpointer, verify_state_dir
from trainer_low_mem.cli import parse_job_config
from trainer_low_mem.distributed import RankContext

REPO = Path(__file__).resolve().parents[2]


def _config(data: Path, out: Path, *extra: str, micro: int = 4, accum: int = 2, steps: int = 8):
    return parse_job_config(
        [
            "--data",
            str(data),
            "--output_dir",
            str(out),
            "--model_preset",
            "tiny",
            "--max_seq_len",
            "64",
            "--auto_plan=False",
            "--batch_size_per_gpu",
            str(micro),
            "--gradient_accumulation_steps",
            str(accum),
            "--max_steps",
            str(steps),
            "--lr",
            "3e-3",
            "--warmup_steps",
            "2",
            "--log_every",
            "2",
            "--save_every",
            "0",
            "--progress_bar=False",
            "--num_readers",
            "1",
            *extra,
        ]
    )


def _stop_after(monkeypatch, step: int, signum: int = signal.SIGTERM):
    """Deliver `signum` to this process once optimizer step `step` has run."""
    original = loop._Run._train_step

    def train_step(self):
        outcome = original(self)
        if self.progress.step + 1 == step and not isinstance(outcome, str):
            signal.raise_signal(signum)
        return outcome

    monkeypatch.setattr(loop._Run, "_train_step", train_step)


def test_resume_after_a_signal_is_bit_exact(tmp_path, sample_dataset_dir, monkeypatch):
    straight = loop.train(_config(sample_dataset_dir, tmp_path / "straight", steps=10))
    assert straight.exit_code == 0 and straight.final_step == 10 and len(straight.losses) == 10

    with monkeypatch.context() as patch:
        _stop_after(patch, 4)
        first = loop.train(_config(sample_dataset_dir, tmp_path / "resumed", steps=10))
    assert first.exit_code == signals.EXIT_CODE_SIGTERM and first.final_step == 4
    assert first.export_dir is None  # a signalled run saves its state, not final weights
    resumed = loop.train(
        _config(sample_dataset_dir, tmp_path / "resumed", "--is_keep_training=True", steps=10)
    )
    assert resumed.exit_code == 0 and resumed.final_step == 10
    assert first.losses + resumed.losses == straight.losses  # exact float equality
    assert resumed.loader_state == straight.loader_state
    assert resumed.tokens_seen == straight.tokens_seen
    a = load_file(str(straight.export_dir / "model.safetensors"))
    b = load_file(str(resumed.export_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_exit_code(tmp_path, sample_dataset_dir, monkeypatch):
    _stop_after(monkeypatch, 2, signal.SIGINT)
    result = loop.train(_config(sample_dataset_dir, tmp_path / "run", steps=6))
    assert (result.exit_code, result.final_step) == (signals.EXIT_CODE_SIGINT, 2)
    assert verify_state_dir(result.state_dir)["step"] == 2


def test_loss_falls_on_the_sample_corpus(tmp_path, sample_dataset_dir):
    result = loop.train(
        _config(
            sample_dataset_dir,
            tmp_path / "run",
            "--lr",
            "1e-2",
            "--warmup_steps",
            "3",
            micro=8,
            accum=1,
            steps=40,
        )
    )
    first, last = result.losses[0], sum(result.losses[-5:]) / 5
    assert math.isclose(
        first, math.log(259), rel_tol=0.05
    )  # uniform over the byte vocabulary at init
    assert last < first - 2.0, result.losses


def test_loss_and_weights_do_not_depend_on_the_split(tmp_path, sample_dataset_dir):
    # Padded rows hold different numbers of targets: only a token-weighted mean is split-invariant.
    one = loop.train(
        _config(sample_dataset_dir, tmp_path / "a", "--packing=False", micro=8, accum=1, steps=4)
    )
    four = loop.train(
        _config(sample_dataset_dir, tmp_path / "b", "--packing=False", micro=2, accum=4, steps=4)
    )
    assert one.tokens_seen == four.tokens_seen
    assert one.loader_state == four.loader_state
    for x, y in zip(one.losses, four.losses, strict=True):
        assert math.isclose(x, y, rel_tol=1e-5)
    a, b = (
        load_file(str(one.export_dir / "model.safetensors")),
        load_file(str(four.export_dir / "model.safetensors")),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)  # Adam amplifies rounding


def test_injected_oom_halves_the_micro_batch_and_keeps_batch_and_position(
    tmp_path, sample_dataset_dir, monkeypatch
):
    reference = loop.train(_config(sample_dataset_dir, tmp_path / "ref", steps=6))
    monkeypatch.setenv(oom.INJECT_OOM_ENV, "3")
    result = loop.train(_config(sample_dataset_dir, tmp_path / "oom", steps=6))
    assert result.backoffs == [
        "out of memory at step 3 (rank 0, micro-batch 0 forward: injected out-of-memory error at "
        f"step 3 ({oom.INJECT_OOM_ENV})): micro-batch 4 -> 2, accumulation 2 -> 4, global batch 8 "
        "unchanged; retrying the step from the same data position"
    ]
    assert (result.plan["micro_batch_per_rank"], result.plan["grad_accum_steps"]) == (2, 4)
    assert result.final_step == 6 and result.loader_state == reference.loader_state
    assert result.tokens_seen == reference.tokens_seen
    assert result.losses[:2] == reference.losses[:2]
    for x, y in zip(result.losses, reference.losses, strict=True):
        assert math.isclose(x, y, rel_tol=1e-5)


def test_host_ram_watchdog_shrinks_prefetch_then_goes_ultra_low_mem_then_saves_and_stops(
    tmp_path, sample_dataset_dir, monkeypatch
):
    straight = loop.train(_config(sample_dataset_dir, tmp_path / "straight", steps=16))
    limit = effective_host_limit_bytes(None, safety_frac=0.0)
    # Readings at steps 10 (due), then every step once above the soft threshold (85%).
    readings = iter([0.90, 0.90, 0.90, 0.97])
    monkeypatch.setattr(
        loop, "job_memory_bytes", lambda gather, ranks_per_node: int(next(readings) * limit)
    )
    result = loop.train(_config(sample_dataset_dir, tmp_path / "run", steps=16))
    assert (result.exit_code, result.final_step) == (MemoryLimitError.exit_code, 13)
    assert result.plan["prefetch_depth"] == 1 and result.plan["ultra_low_mem"] is True
    assert result.export_dir is None
    # Rebuilding the data path twice lost and repeated nothing: the same losses, bit for bit.
    assert result.losses == straight.losses[:13]
    state = (
        Checkpointer(tmp_path / "run", RankContext.single()).find_resumable()[0]
        / "training_state.json"
    )
    history = json.loads(state.read_text())["watchdog"]["history"]
    assert [(d["action"], d["step"]) for d in history] == [
        ("shrink_prefetch", 10),
        ("ultra_low_mem", 11),
        ("save_and_stop", 13),
    ]


def test_resume_with_another_micro_batch_keeps_the_data_position(
    tmp_path, sample_dataset_dir, monkeypatch
):
    straight = loop.train(_config(sample_dataset_dir, tmp_path / "straight", steps=6))
    with monkeypatch.context() as patch:
        _stop_after(patch, 3)
        loop.train(_config(sample_dataset_dir, tmp_path / "run", steps=6))
    resumed = loop.train(
        _config(sample_dataset_dir, tmp_path / "run", "--resume=True", micro=1, accum=8, steps=6)
    )
    assert resumed.loader_state == straight.loader_state
    assert resumed.tokens_seen == straight.tokens_seen
    for x, y in zip(resumed.losses, straight.losses[3:], strict=True):
        assert math.isclose(x, y, rel_tol=1e-4)


def test_epochs_set_the_number_of_steps(tmp_path, make_dataset):
    data = make_dataset(num_docs=40, median_len=60)
    config = _config(data, tmp_path / "run", steps=1)
    config.training.max_steps = None
    config.training.epochs = 1.5
    result = loop.train(config)
    rows = result.loader_state["total_rows"]
    assert result.final_step == math.ceil(1.5 * rows / 8)
    assert result.loader_state["epoch"] == 1  # the run crossed into the second pass


def test_existing_state_needs_resume_flag(tmp_path, sample_dataset_dir):
    loop.train(_config(sample_dataset_dir, tmp_path / "run", steps=2))
    with pytest.raises(ConfigError, match="pass --is_keep_training=True to resume"):
        loop.train(_config(sample_dataset_dir, tmp_path / "run", steps=2))


def test_resume_refuses_another_sequence_length(tmp_path, sample_dataset_dir):
    loop.train(_config(sample_dataset_dir, tmp_path / "run", steps=2))
    with pytest.raises(CheckpointError, match="max_seq_len: saved 64, now 32"):
        loop.train(
            _config(
                sample_dataset_dir,
                tmp_path / "run",
                "--max_seq_len",
                "32",
                "--is_keep_training=True",
            )
        )


def test_resume_without_a_state(tmp_path, sample_dataset_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        loop.train(_config(sample_dataset_dir, tmp_path / "empty", "--is_keep_training=True"))


def test_sigterm_in_a_subprocess_saves_and_exits_143(tmp_path, sample_dataset_dir):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "train_low_mem.py"),
        "train",
        "--data",
        str(sample_dataset_dir),
        "--output_dir",
        str(out),
        "--model_preset",
        "tiny",
        "--max_seq_len",
        "64",
        "--auto_plan=False",
        "--batch_size_per_gpu",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--max_steps",
        "100000",
        "--log_every",
        "1",
        "--save_every",
        "0",
        "--progress_bar=False",
        "--num_readers",
        "1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step: 3/"):
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert proc.returncode == signals.EXIT_CODE_SIGTERM, log
    assert "received SIGTERM" in log and "exiting with code 143" in log
    path, manifest = Checkpointer(out, RankContext.single()).find_resumable()
    assert manifest["step"] >= 3
    assert not (out / "final").exists()


def test_eval_runs_at_step_zero_every_n_and_at_the_end(tmp_path, make_dataset, capsys):
    out = tmp_path / "out"
    train, held_out = make_dataset(300), make_dataset(40, seed=1)
    cfg = _config(train, out, "--eval_data", str(held_out), "--eval_every", "3", steps=4)
    result = loop.train(cfg)
    assert result.exit_code == 0
    text = capsys.readouterr()
    text = text.out + text.err
    assert "trainable parameters:" in text
    # The log line names lr, the gradient norm, elapsed time and ETA.
    assert re.search(r"step: 4/4, loss: [0-9.]+, lr: \S+, grad norm: [0-9.e+-]+, elapsed: ", text)
    evals = re.findall(r"step: (\d+)/4, eval_loss: ([0-9.]+)", text)
    assert [int(s) for s, _ in evals] == [0, 3, 4]
    losses = [float(v) for _, v in evals]
    assert all(math.isfinite(v) for v in losses)


def test_a_due_save_comes_before_the_eval_so_a_crash_in_the_eval_loses_no_step(
    tmp_path, make_dataset, monkeypatch
):
    out = tmp_path / "out"
    train, held_out = make_dataset(300), make_dataset(40, seed=1)
    original = loop._Run._evaluate

    def crash_at_step_2(self):
        if self.progress.step == 2:
            raise RuntimeError("killed during the eval")
        return original(self)

    monkeypatch.setattr(loop._Run, "_evaluate", crash_at_step_2)
    extra = ("--eval_data", str(held_out), "--eval_every", "2", "--save_every", "2")
    with pytest.raises(RuntimeError, match="killed during the eval"):
        loop.train(_config(train, out, *extra, steps=4))
    _, manifest = Checkpointer(out, RankContext.single()).find_resumable()
    assert manifest["step"] == 2


def test_the_last_state_is_saved_before_the_final_eval(tmp_path, make_dataset, monkeypatch):
    out = tmp_path / "out"
    train, held_out = make_dataset(300), make_dataset(40, seed=1)
    original = loop._Run._evaluate

    def crash_at_the_end(self):
        if self.progress.step == 3:
            raise RuntimeError("killed during the final eval")
        return original(self)

    monkeypatch.setattr(loop._Run, "_evaluate", crash_at_the_end)
    with pytest.raises(RuntimeError, match="final eval"):
        loop.train(_config(train, out, "--eval_data", str(held_out), steps=3))
    _, manifest = Checkpointer(out, RankContext.single()).find_resumable()
    assert manifest["step"] == 3


def test_a_save_is_due_by_time_as_well_as_by_steps_and_every_save_is_logged(
    tmp_path, make_dataset, capsys
):
    out = tmp_path / "out"
    # --save_every 0 (only at the end) with a time bound below one step: every step saves.
    cfg = _config(make_dataset(300), out, "--save_every_minutes", "0.00001", steps=3)
    assert loop.train(cfg).exit_code == 0
    saves = re.findall(r"saved the state at step (\d+) to (\S+) \(", capsys.readouterr().out)
    assert [int(step) for step, _ in saves] == [1, 2, 3]
    assert {Path(path) for _, path in saves} == {out / "train_latest_state"}

    quiet = _config(make_dataset(300), tmp_path / "quiet", steps=3)  # default: 10 minutes
    assert loop.train(quiet).exit_code == 0
    saves = re.findall(r"saved the state at step (\d+)", capsys.readouterr().out)
    assert saves == ["3"]  # only the final state


def test_a_collective_failing_after_a_stop_signal_is_one_line_with_the_signals_code(
    tmp_path, make_dataset, monkeypatch
):
    def first_step_after_a_rank_left(self):
        signal.raise_signal(signal.SIGTERM)  # the launcher stops the job ...
        raise RuntimeError("Connection closed by peer")  # ... and a rank is already gone

    monkeypatch.setattr(loop._Run, "run", first_step_after_a_rank_left)
    with pytest.raises(StoppedError) as exc:
        loop.train(_config(make_dataset(300), tmp_path / "out", steps=3))
    assert exc.value.exit_code == signals.EXIT_CODE_SIGTERM
    assert str(exc.value).startswith("stopped by SIGTERM before the job could save")
