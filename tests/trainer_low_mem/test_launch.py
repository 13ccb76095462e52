"""Multi-process CPU runs through `accelerate launch`: one gloo group, resume with another world
size, and DeepSpeed ZeRO-2 with CPU optimizer offload. Slow: each launch starts fresh
interpreters."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer_low_mem.checkpoint import Checkpointer
from trainer_low_mem.distributed import RankContext

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = (
    Path(sys.executable).parent / "accelerate"
)  # the console script of this interpreter's env
ZERO2_CONFIG = REPO / "accelerate_configs" / "zero2_offload_3gpu.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(
    num_processes: int, data: Path, out: Path, *flags: str, config_file: Path | None = None
) -> list[str]:
    launcher = [
        str(ACCELERATE),
        "launch",
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(_free_port()),
    ]
    launcher += (
        ["--config_file", str(config_file)]
        if config_file
        else [
            "--multi_gpu",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
    )
    return [
        *launcher,
        str(REPO / "train_low_mem.py"),
        "train",
        "--data",
        str(data),
        "--output_dir",
        str(out),
        "--model_preset",
        "tiny",
        "--max_seq_len",
        "64",
        "--progress_bar=False",
        "--warmup_steps",
        "2",
        *flags,
    ]


ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _launch(
    num_processes: int,
    data: Path,
    out: Path,
    *flags: str,
    config_file: Path | None = None,
    timeout_s: int = 900,
) -> subprocess.CompletedProcess:
    cmd = _command(num_processes, data, out, *flags, config_file=config_file)
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout_s)


def _state(out: Path) -> dict:
    path, manifest = Checkpointer(out, RankContext.single()).find_resumable()
    return {**manifest, **json.loads((path / "training_state.json").read_text())}


def _spreads(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"\(spread ([0-9.]+)%\)", log)]


def test_three_cpu_ranks_train_as_one_group_then_resume_with_two(
    tmp_path, sample_dataset_dir, monkeypatch
):
    out = tmp_path / "model_save"
    # Rank 1 alone runs out of memory at step 3: all three ranks must back off together.
    monkeypatch.setitem(ENV, "LOWMEM_INJECT_OOM_AT_STEP", "3")
    monkeypatch.setitem(ENV, "LOWMEM_INJECT_OOM_RANK", "1")
    first = _launch(
        3,
        sample_dataset_dir,
        out,
        "--global_batch",
        "24",
        "--max_steps",
        "24",
        "--log_every",
        "6",
        "--save_every",
        "12",
    )
    monkeypatch.delitem(ENV, "LOWMEM_INJECT_OOM_AT_STEP")
    log = first.stdout + first.stderr
    assert first.returncode == 0, log
    assert (
        first.stdout.count(
            "out of memory at step 3 (rank 1, micro-batch 0 forward: injected out-of-memory "
            "error at step 3 (LOWMEM_INJECT_OOM_AT_STEP)): micro-batch 8 -> 4, "
            "accumulation 1 -> 2, global batch 24 unchanged"
        )
        == 1
    ), log
    assert first.stdout.count("world_size: 3, device: cpu") == 1, (
        log
    )  # one job, printed by rank 0 only
    assert "DistributedType.MULTI_CPU" in first.stdout
    step_lines = [line for line in first.stdout.splitlines() if line.startswith("step: ")]
    assert [line.split(",")[0] for line in step_lines] == [
        "step: 6/24",
        "step: 12/24",
        "step: 18/24",
        "step: 24/24",
    ]
    assert all(
        len(re.search(r"rank step s: ([0-9. ]+) \(", line).group(1).split()) == 3
        for line in step_lines
    )
    print("3-rank step-time spreads (%):", _spreads(first.stdout))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "final",
        "train_latest_state",
    ]
    state = _state(out)
    assert (state["step"], state["world_size"]) == (24, 3)
    assert state["loader_state"]["consumed_rows"] == 24 * 24
    assert state["plan"]["micro_batch_per_rank"] == 4
    assert sorted(p.name for p in (out / "train_latest_state").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
        "random_states_2.pkl",
    ]

    second = _launch(
        2,
        sample_dataset_dir,
        out,
        "--global_batch",
        "24",
        "--max_steps",
        "30",
        "--log_every",
        "6",
        "--is_keep_training=True",
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming a 3-rank state with 2 ranks" in second.stdout
    assert (
        "resumed from" in second.stdout
        and "at step 24 (epoch 0, row 576 of the epoch)" in second.stdout
    )
    assert second.stdout.count("world_size: 2, device: cpu") == 1
    state = _state(out)
    assert (state["step"], state["world_size"]) == (30, 2)
    assert (
        state["loader_state"]["consumed_rows"] == 30 * 24
    )  # rows 576..719 once, none skipped or repeated
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "final",
        "train_latest_state",
    ]


def test_zero2_cpu_offload_trains_resumes_and_refuses_resharding(
    tmp_path, sample_dataset_dir, monkeypatch
):
    out = tmp_path / "model_save"
    common = ("--global_batch", "12", "--log_every", "2", "--save_every", "2")
    # Rank 1 alone runs out of memory in step 3's first forward: the engine takes the halved sizes.
    monkeypatch.setitem(ENV, "LOWMEM_INJECT_OOM_AT_STEP", "3")
    monkeypatch.setitem(ENV, "LOWMEM_INJECT_OOM_RANK", "1")
    first = _launch(
        2,
        sample_dataset_dir,
        out,
        *common,
        "--batch_size_per_gpu",
        "6",
        "--max_steps",
        "4",
        config_file=ZERO2_CONFIG,
    )
    monkeypatch.delitem(ENV, "LOWMEM_INJECT_OOM_AT_STEP")
    log = first.stdout + first.stderr
    assert first.returncode == 0, log
    assert (
        "out of memory at step 3 (rank 1, micro-batch 0 forward: injected out-of-memory error at "
        "step 3 (LOWMEM_INJECT_OOM_AT_STEP)): micro-batch 6 -> 3, accumulation 1 -> 2"
    ) in first.stdout, log
    assert (
        "DistributedType.DEEPSPEED" in first.stdout
        and "DeepSpeedZeroOptimizer > DeepSpeedCPUAdam" in first.stdout
    )
    state = _state(out)
    assert (state["step"], state["world_size"], state["deepspeed"]) == (4, 2, True)
    shards = sorted(p.name for p in (out / "train_latest_state" / "pytorch_model").iterdir())
    assert shards == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]

    second = _launch(
        2,
        sample_dataset_dir,
        out,
        *common,
        "--max_steps",
        "6",
        "--is_keep_training=True",
        config_file=ZERO2_CONFIG,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "at step 4 (epoch 0, row 48 of the epoch)" in second.stdout
    state = _state(out)
    assert (state["step"], state["loader_state"]["consumed_rows"]) == (6, 72)

    third = _launch(
        3,
        sample_dataset_dir,
        out,
        *common,
        "--max_steps",
        "8",
        "--is_keep_training=True",
        config_file=ZERO2_CONFIG,
    )
    assert third.returncode != 0
    assert (
        "holds ZeRO-2 optimizer shards of 2 ranks and cannot be re-sharded for 3; resume with "
        "--num_processes 2"
    ) in third.stderr
    assert _state(out)["step"] == 6  # the refused resume left the state alone


def test_sigterm_to_the_launcher_saves_one_state_from_all_ranks(tmp_path, sample_dataset_dir):
    out = tmp_path / "model_save"
    cmd = _command(
        3,
        sample_dataset_dir,
        out,
        "--global_batch",
        "12",
        "--max_steps",
        "100000",
        "--log_every",
        "2",
        "--save_every",
        "0",
    )
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO
    )
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step: 4/"):
            proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
            break
        assert time.monotonic() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    # Each rank exits 143 after the save; torchrun itself then reports the signal as a failure (1).
    assert proc.returncode != 0
    match = re.search(
        r"received SIGTERM: saving the state at step (\d+) and exiting with code 143", log
    )
    assert match, log
    state = _state(out)
    assert state["step"] == int(match.group(1)) >= 4 and state["world_size"] == 3
    assert state["loader_state"]["consumed_rows"] == 12 * state["step"]
    assert sorted(p.name for p in out.iterdir()) == ["train_latest_state"]


def test_zero2_cpu_offload_trains_lora_launched_from_another_folder(tmp_path, build_sample_sft):
    """LoRA leaves no parameter without weight decay: the optimizer has one group, and the
    schedule must match it. The accelerate config names its DeepSpeed JSON relative to the
    project root, and the job is launched from elsewhere."""
    from trainer_low_mem.sample_model import write_sample_model

    data = build_sample_sft(tmp_path, write_sample_model(tmp_path / "model"), 48, 2)
    cmd = _command(
        2,
        data["train_data"],
        tmp_path / "out",
        "--model",
        str(data["model"]),
        "--lora_rank",
        "4",
        "--global_batch",
        "4",
        "--max_steps",
        "2",
        config_file=ZERO2_CONFIG,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=elsewhere, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DeepSpeedZeroOptimizer > DeepSpeedCPUAdam" in proc.stdout
    state = _state(tmp_path / "out")
    assert (state["step"], state["world_size"], state["deepspeed"]) == (2, 2, True)
    assert (tmp_path / "out" / "final" / "config.json").is_file()


def _start_long_run(out: Path, data: Path) -> tuple[subprocess.Popen, list[str]]:
    """Two CPU ranks training for a long time; returns once step 4 is logged."""
    cmd = _command(2, data, out, "--global_batch", "8", "--max_steps", "100000", "--log_every", "2")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        cwd=REPO,
        start_new_session=True,
    )
    lines, deadline = [], time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step: 4/"):
            return proc, lines
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError("".join(lines))


def _wait_gone(pids: list[int], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"ranks {pids} still running"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A re-parented zombie still answers kill(pid, 0) until reaped.
    return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_stop_signals_every_rank_of_the_run_which_saves_and_exits(tmp_path, sample_dataset_dir):
    from trainer_low_mem.stop import run_pids

    out = tmp_path / "model_save"
    proc, _ = _start_long_run(out, sample_dataset_dir)
    pids = run_pids(out)
    assert len(pids) == 2  # both ranks, rank 0 first
    stop = subprocess.run(
        [sys.executable, str(REPO / "train_low_mem.py"), "stop", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == (
        f"sent SIGTERM to ranks {pids[0]}, {pids[1]}; the run saved its state and stopped"
    )
    proc.communicate(timeout=120)
    assert _state(out)["step"] >= 4 and run_pids(out) == []
    again = subprocess.run(
        [sys.executable, str(REPO / "train_low_mem.py"), "stop", str(out)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "no training run holds" in again.stderr


def test_ranks_save_and_stop_when_the_launcher_is_killed(tmp_path, sample_dataset_dir):
    from trainer_low_mem.stop import run_pids

    out = tmp_path / "model_save"
    proc, _ = _start_long_run(out, sample_dataset_dir)
    pids = run_pids(out)
    proc.kill()  # kill -9 of `accelerate launch`: it can forward nothing
    proc.communicate(timeout=60)
    _wait_gone(pids)  # the ranks do not train on, re-parented
    state = _state(out)
    assert state["step"] >= 4 and state["world_size"] == 2
    assert state["loader_state"]["consumed_rows"] == 8 * state["step"]


def test_a_ranks_one_line_error_is_the_root_cause_in_the_launchers_report(
    tmp_path, sample_dataset_dir
):
    out = tmp_path / "model_save"
    proc = _launch(2, sample_dataset_dir, out, "--global_batch", "8", "--is_keep_training=True")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # torchrun's report, printed after the ranks' own `error:` lines, names the same line.
    assert re.search(r"traceback\s*:\s*error: --is_keep_training=True but \S+ does not exist", log)
    assert "exitcode  : 2" in log
