"""Fault injection with real processes: kill -9, SIGTERM, disk full, damaged states, host-RAM leak.

What must hold whatever goes wrong:
- a killed `pipeline build` never leaves a folder that opens as a dataset unless it is complete;
- a killed trainer always resumes from the newest complete state (the previous one when the
  newest was cut off), never from a damaged one, at exactly that state's data position: the
  resumed run's losses equal those of an uninterrupted run, step for step;
- SIGTERM saves the state and exits with 143;
- a full disk during a save is one clear error, and the previous state stays intact and loadable;
- damaged, incomplete or foreign states are refused with a message naming the file and the mismatch;
- a job whose host memory keeps growing is stopped by the host-RAM watchdog below its limit, after
  a saved state, with exit code 3.

Faults come from outside (signals, a 2 MiB tmpfs) or from a small driver script (`FAULT_DRIVER`
below, written into the test's folder) that wraps public functions a save goes through
(torch.save, os.replace, os.rename, os.fsync) or leaks memory at each optimizer step, and then
runs the trainer's real CLI. Every test is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowmem_core.errors import PipelineError
from pipeline import open_dataset

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a crash of the machine would.

    torchrun starts each rank in a session of its own, so killing the launcher's process group
    would leave the ranks running; they are found by walking the process tree instead.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)


def _kill_at(cmd: list[str], delay_s: float, cwd: Path) -> int | None:
    """Start `cmd`, SIGKILL it after delay_s; the exit code if it finished first, else None."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=delay_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return None


# ----------------------------------------------------------------------------- pipeline build


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_during_build_never_leaves_a_dataset_that_opens_half_built(
    tmp_path, sample_corpus_files
):
    """10 builds of an 8 MB corpus into 16 shards, each killed at a random moment."""
    inputs = [str(sample_corpus_files["txt"])] * 4
    common = ["--max-shard-tokens", "500000", "--num-proc", "2"]
    reference = tmp_path / "reference"
    started = time.perf_counter()
    subprocess.run(
        [PY, "-m", "pipeline", "build", *inputs, "--out", str(reference), *common],
        check=True,
        capture_output=True,
        timeout=120,
    )
    full_build_s = time.perf_counter() - started
    expected = open_dataset(reference, verify=True)

    rng = random.Random(7)
    outcomes: dict[str, int] = {}
    for trial in range(10):
        work = tmp_path / f"trial-{trial}"
        work.mkdir()
        out = work / "tokens"
        # Half the trials replace an existing dataset (--overwrite), the riskiest path.
        overwrite = trial % 2 == 1
        if overwrite:
            shutil.copytree(reference, out)
        cmd = [PY, "-m", "pipeline", "build", *inputs, "--out", str(out), *common] + (
            ["--overwrite"] if overwrite else []
        )
        code = _kill_at(cmd, rng.uniform(0.0, full_build_s), work)
        if code is not None:
            assert code == 0
        # Every folder left behind either refuses to open (as the trainer opens it, without
        # hashing) or is the complete dataset, down to every shard's sha256.
        opened = []
        for folder in [p for p in work.iterdir() if p.is_dir()]:
            try:
                ds = open_dataset(folder)
            except PipelineError:
                continue
            assert (len(ds), ds.num_tokens, ds.fingerprint) == (
                len(expected),
                expected.num_tokens,
                expected.fingerprint,
            )
            open_dataset(folder, verify=True)
            opened.append(folder.name)
        if overwrite:
            # The old dataset stays complete until the new one replaces it.
            assert "tokens" in opened or any(n.startswith(".tokens.lowmem-old-") for n in opened), (
                opened
            )
        kind = "overwrite" if overwrite else "new"
        left = (
            "finished"
            if code is not None
            else "complete at --out"
            if "tokens" in opened
            else "nothing at --out"
        )
        outcomes[f"{kind}: {left}"] = outcomes.get(f"{kind}: {left}", 0) + 1
        # A new build over the debris succeeds and verifies.
        subprocess.run(
            [PY, "-m", "pipeline", "build", *inputs, "--out", str(out), *common, "--overwrite"],
            check=True,
            capture_output=True,
            timeout=120,
            cwd=work,
        )
        assert open_dataset(out, verify=True).fingerprint == expected.fingerprint
    assert sum(outcomes.values()) == 10
    # At least some kills must have landed inside builds for the test to mean anything.
    assert sum(n for k, n in outcomes.items() if k.endswith("finished")) < 10, outcomes
    print(f"kill -9 during build: {outcomes}")


# ----------------------------------------------------------------------------- trainer

FAULT_DRIVER = r'''
"""Run `train_low_mem.py` with faults injected into its checkpoint writes (tests/test_faults.py).

Only public functions are wrapped (Checkpointer.save, torch.save, os.rename, os.replace,
os.fsync), so the faults land where any implementation of the save must pass.

FAULT_PAUSE_AT=<phase> FAULT_ON_SAVE=<n>: on the n-th save of this process, stop at <phase>,
write "<phase> <step>" to FAULT_MARKER and sleep until killed. Phases:
  files_written    the first file of the new state is in the temp dir
  before_manifest  every file is written, manifest.json not yet in place
  between_renames  the old state was renamed to .prev, the new one is not renamed yet
  after_rename     the new state is in place, .prev not yet removed
FAULT_ENOSPC_ON_SAVE=<n>: in the n-th save, writing optimizer.bin fails with ENOSPC after part of
it is written, as on a full disk.
FAULT_SLOW_FSYNC_S=<s>: every fsync takes s seconds longer, so that kills at random moments land
inside saves more often.
FAULT_LEAK_MIB_PER_STEP=<m>: every optimizer step leaks m MiB of host memory (pages touched),
a stand-in for whatever grows in a real job.
FAULT_INF_GRAD_FROM=<n>: from the n-th training forward of the embedding on, its backward sends
inf gradients (the loss stays finite), as a step whose gradients overflow.
"""
import errno
import os
import sys
import time
from pathlib import Path

import torch

import trainer_low_mem.checkpoint as ckpt
from trainer_low_mem.cli import main

pause_at = os.environ.get("FAULT_PAUSE_AT")
pause_on_save = int(os.environ.get("FAULT_ON_SAVE", "0"))
enospc_on_save = int(os.environ.get("FAULT_ENOSPC_ON_SAVE", "0"))
slow_fsync_s = float(os.environ.get("FAULT_SLOW_FSYNC_S", "0"))
saves = 0
current_step = None
STATE = "train_latest_state"


def pause(phase):
    if phase == pause_at and saves == pause_on_save:
        Path(os.environ["FAULT_MARKER"]).write_text(f"{phase} {current_step}")
        time.sleep(3600)


original_save = ckpt.Checkpointer.save


def counting_save(self, state, **kwargs):
    global saves, current_step
    saves += 1
    current_step = state.step
    return original_save(self, state, **kwargs)


ckpt.Checkpointer.save = counting_save

original_torch_save = torch.save


def torch_save(obj, f, *args, **kwargs):
    if saves == enospc_on_save and ".tmp-" in str(f) and str(f).endswith("optimizer.bin"):
        with open(f, "wb") as fh:
            fh.write(b"PK" + bytes(4094))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    original_torch_save(obj, f, *args, **kwargs)
    if ".tmp-" in str(f):
        pause("files_written")


torch.save = torch_save

original_replace = os.replace


def replace(src, dst, *args, **kwargs):
    if Path(dst).name == "manifest.json" and ".tmp-" in str(dst):
        pause("before_manifest")
    return original_replace(src, dst, *args, **kwargs)


os.replace = replace

original_rename = os.rename


def rename(src, dst, *args, **kwargs):
    original_rename(src, dst, *args, **kwargs)
    if str(dst).endswith(STATE + ".prev"):
        pause("between_renames")
    elif str(dst).endswith(STATE) and ".tmp-" in str(src):
        pause("after_rename")


os.rename = rename

original_fsync = os.fsync


def fsync(fd):
    time.sleep(slow_fsync_s)
    return original_fsync(fd)


os.fsync = fsync

leak_bytes = int(float(os.environ.get("FAULT_LEAK_MIB_PER_STEP", "0")) * (1 << 20))
leaked = []


def leak(optimizer, args, kwargs):
    leaked.append(torch.ones(leak_bytes, dtype=torch.uint8))


if leak_bytes:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(leak)

inf_grad_from = int(os.environ.get("FAULT_INF_GRAD_FROM", "0"))
embedding_forwards = 0


class InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def inf_grad(module, args, output):
    global embedding_forwards
    # Real training forwards only: the planner's trace runs the model on fake tensors too.
    if isinstance(module, torch.nn.Embedding) and module.training and type(output) is torch.Tensor:
        embedding_forwards += 1
        if embedding_forwards >= inf_grad_from:
            return InfGrad.apply(output)
    return None


if inf_grad_from:
    torch.nn.modules.module.register_module_forward_hook(inf_grad)

sys.exit(main())
'''

STEP_LINE = re.compile(r"^step: (\d+)/(\d+), loss: ([0-9.]+)", re.M)
RESUMED_LINE = re.compile(
    r"resumed from (\S+) at step (\d+) \(epoch (\d+), row (\d+) of the epoch\)"
)
TRAIN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def fault_world(tmp_path_factory):
    """A folder with the fault driver and a small sample-corpus dataset."""
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig
    from pipeline.sample_corpus import write_sample_corpus

    root = tmp_path_factory.mktemp("faults")
    (root / "fault_driver.py").write_text(FAULT_DRIVER)
    files = write_sample_corpus(root / "corpus", num_docs=1500)
    build_dataset(BuildConfig(inputs=[files["txt"]], out=root / "tokens"), progress=False)
    return root


REFERENCE_STEPS = 300


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_cmd(
    world: Path,
    output_dir: Path,
    *extra: str,
    max_steps: int = REFERENCE_STEPS,
    resume: bool = False,
    driver: bool = True,
    ranks: int = 1,
    config_file: str = "cpu_3proc.yaml",
) -> list[str]:
    """The tiny model, a state saved at every step, a loss line at every step; global batch 4 rows.

    --min_lr_ratio 1 keeps the learning rate constant after warm-up, so a resumed run may stop at
    any --max_steps and still match the reference run's losses step for step. With ranks > 1 the
    job is `accelerate launch`ed as one gloo process group of that many CPU ranks.
    """
    entry = str(world / "fault_driver.py") if driver else str(REPO / "train_low_mem.py")
    launch = [PY]
    if ranks > 1:
        launch = [
            str(Path(PY).parent / "accelerate"),
            "launch",
            "--config_file",
            str(REPO / "accelerate_configs" / config_file),
            "--num_processes",
            str(ranks),
            "--main_process_port",
            str(_free_port()),
        ]
    return [
        *launch,
        entry,
        "train",
        "--data",
        str(world / "tokens"),
        "--model_preset",
        "tiny",
        "--max_seq_len",
        "64",
        "--global_batch",
        "4",
        "--auto_plan",
        "False",
        "--batch_size_per_gpu",
        str(4 // ranks),
        "--gradient_accumulation_steps",
        "1",
        "--warmup_steps",
        "2",
        "--min_lr_ratio",
        "1.0",
        "--max_steps",
        str(max_steps),
        "--save_every",
        "1",
        "--log_every",
        "1",
        "--progress_bar",
        "False",
        "--output_dir",
        str(output_dir),
        f"--is_keep_training={resume}",
        *extra,
    ]


def train_env(**faults: str | int | float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULT_")}
    env["PYTHONPATH"] = str(REPO)
    # One intra-op thread: the tiny model's steps are 50x faster on a busy 2-core machine.
    env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in faults.items()})
    return env


def run_train(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, env=env or train_env(), capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S
    )


def losses_by_step(output: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(3) for m in STEP_LINE.finditer(output)}


def complete_states(output_dir: Path) -> dict[str, int]:
    """Name -> step of each state under output_dir that verifies (latest and .prev)."""
    from lowmem_core.errors import CheckpointError
    from trainer_low_mem.checkpoint import STATE_DIR_NAME, verify_state_dir

    found = {}
    for name in (STATE_DIR_NAME, STATE_DIR_NAME + ".prev"):
        try:
            found[name] = verify_state_dir(output_dir / name)["step"]
        except CheckpointError:
            continue
    return found


def saved_loader_position(state_dir: Path) -> tuple[int, int, dict]:
    state = json.loads((state_dir / "training_state.json").read_text())
    return state["step"], state["loader_state"]["consumed_rows"], state["loader_state"]


@pytest.fixture(scope="module")
def reference_losses(fault_world) -> dict[int, str]:
    """Losses of an uninterrupted run, printed with 4 decimals at every step."""
    out = fault_world / "reference-run"
    proc = run_train(train_cmd(fault_world, out, driver=False))
    assert proc.returncode == 0, proc.stderr
    losses = losses_by_step(proc.stdout + proc.stderr)
    assert sorted(losses) == list(range(1, REFERENCE_STEPS + 1))
    return losses


def check_resume(
    world: Path,
    output_dir: Path,
    reference: dict[int, str] | None,
    expect: tuple[str, int],
    max_steps: int | None = None,
    env: dict[str, str] | None = None,
    kill_after_s: float | None = None,
    ranks: int = 1,
) -> tuple[int | None, str]:
    """Resume output_dir; check it starts from `expect` (state name, step) at that state's data row.

    Without kill_after_s the resumed run trains to max_steps (default: 2 more steps); with it the
    run is killed that long after it resumed (the next trial). With a reference, the losses after
    the resume must equal it. Returns (exit code or None when killed, output).
    """
    name, step = expect
    saved_step, consumed_rows, loader_state = saved_loader_position(output_dir / name)
    assert saved_step == step
    # One epoch is far longer than the run, so the saved position is exactly step x global batch.
    assert (loader_state["epoch"], consumed_rows) == (0, step * 4)
    cmd = train_cmd(world, output_dir, max_steps=max_steps or step + 2, resume=True, ranks=ranks)
    proc = subprocess.Popen(
        cmd, env=env or train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, code = _read_until_resumed_then(proc, kill_after_s)
    match = RESUMED_LINE.search(output)
    assert match, f"no 'resumed from' line:\n{output}"
    assert (
        Path(match.group(1)).name,
        int(match.group(2)),
        int(match.group(3)),
        int(match.group(4)),
    ) == (name, step, 0, consumed_rows), output
    # Same weights, same data position: every step after the resume has the uninterrupted run's
    # loss.
    resumed = losses_by_step(output)
    if code is not None or resumed:
        assert resumed and min(resumed) == step + 1, output
        for s, loss in resumed.items() if reference is not None else ():
            assert loss == reference[s], (
                f"step {s}: resumed loss {loss}, uninterrupted {reference[s]}\n{output}"
            )
    return code, output


def _read_until_resumed_then(
    proc: subprocess.Popen, kill_after_s: float | None
) -> tuple[str, int | None]:
    """Collect the output; with kill_after_s, SIGKILL the process that long after 'resumed from'."""
    import selectors

    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    data, deadline, kill_at = b"", time.monotonic() + TRAIN_TIMEOUT_S, None
    while True:
        now = time.monotonic()
        if now > deadline:
            kill_tree(proc.pid)
            raise AssertionError(
                "trainer did not finish in time:\n" + data.decode(errors="replace")
            )
        if kill_at is not None and now >= kill_at:
            kill_tree(proc.pid)
            proc.wait(timeout=30)
            return data.decode(errors="replace"), None
        if sel.select(timeout=0.005):
            chunk = os.read(fd, 1 << 16)
            if chunk:
                data += chunk
                if kill_after_s is not None and kill_at is None and b"resumed from" in data:
                    kill_at = time.monotonic() + kill_after_s
                continue
        if proc.poll() is not None:
            while chunk := os.read(fd, 1 << 16) if sel.select(timeout=0) else b"":
                data += chunk
            return data.decode(errors="replace"), proc.returncode


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "phase", ["files_written", "before_manifest", "between_renames", "after_rename"]
)
def test_kill_9_inside_a_save_resumes_from_the_newest_complete_state(
    fault_world, reference_losses, tmp_path, phase
):
    """Kill -9 at an exact moment of the 3rd save (step 3) and resume."""
    out = tmp_path / "run"
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        train_cmd(fault_world, out),
        env=train_env(FAULT_PAUSE_AT=phase, FAULT_ON_SAVE=3, FAULT_MARKER=marker),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while not marker.exists():
        assert proc.poll() is None, f"trainer exited with {proc.returncode} before reaching {phase}"
        assert time.monotonic() < deadline, f"trainer never reached {phase}"
        time.sleep(0.02)
    assert marker.read_text() == f"{phase} 3"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    states = complete_states(out)
    expected = {
        "files_written": {"train_latest_state": 2},
        "before_manifest": {"train_latest_state": 2},
        "between_renames": {"train_latest_state.prev": 2},
        "after_rename": {"train_latest_state": 3, "train_latest_state.prev": 2},
    }[phase]
    assert states == expected
    newest = max(states.items(), key=lambda kv: kv[1])
    code, output = check_resume(fault_world, out, reference_losses, newest)
    assert code == 0, output
    if phase == "between_renames":
        assert "is incomplete or corrupt; resuming from" in output
    assert complete_states(out) == {"train_latest_state": newest[1] + 2}


RANDOM_KILLS = 20


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_kill_9_at_random_moments_always_resumes_from_a_complete_state(
    fault_world, reference_losses, tmp_path
):
    """20 kills at random moments of one run that keeps resuming; fsync is slowed so that saves
    (a state at every step) take most of the time and many kills land inside one."""
    rng = random.Random(2026)
    out = tmp_path / "run"
    env = train_env(FAULT_SLOW_FSYNC_S=0.01)
    kills = resumes = kills_inside_a_save = 0
    debris_seen: set[int] = set()
    first = subprocess.Popen(
        train_cmd(fault_world, out),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_line(
        first, re.compile(r"^step: 2/", re.M)
    )  # printed after the first state is complete
    time.sleep(rng.uniform(0.0, 1.0))
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    while True:
        kills += 1
        # A save was cut off when a temp dir or a renamed previous state is there that was not
        # there after the last kill (inode numbers tell new folders from old ones).
        debris = {
            p.stat().st_ino for p in out.iterdir() if ".tmp-" in p.name or p.name.endswith(".prev")
        }
        kills_inside_a_save += bool(debris - debris_seen)
        debris_seen = debris
        states = complete_states(out)
        assert states, (
            f"kill {kills}: no complete state left in {sorted(p.name for p in out.iterdir())}"
        )
        newest = max(states.items(), key=lambda kv: kv[1])
        if kills == RANDOM_KILLS:
            break
        code, output = check_resume(
            fault_world,
            out,
            reference_losses,
            newest,
            max_steps=REFERENCE_STEPS,
            env=env,
            kill_after_s=rng.uniform(0.0, 1.0),
        )
        resumes += 1
        assert code is None, (
            f"the run finished before kill {kills + 1}; lengthen REFERENCE_STEPS\n{output}"
        )
    code, _ = check_resume(fault_world, out, reference_losses, newest, env=env)
    resumes += 1
    assert code == 0
    # The random moments must cover saves, or this test would not test what it says.
    assert kills_inside_a_save >= 3, kills_inside_a_save
    print(
        f"random kill -9: {kills} kills ({kills_inside_a_save} inside a save), "
        f"{resumes}/{resumes} resumes from the newest complete state at its data position"
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_of_a_two_rank_job_resumes_with_two_ranks_then_one(fault_world, tmp_path):
    """A 2-rank gloo job killed whole (launcher and ranks) 4 times, then resumed by a single
    rank."""
    rng = random.Random(5)
    out = tmp_path / "run"
    env = train_env(FAULT_SLOW_FSYNC_S=0.01)
    first = subprocess.Popen(
        train_cmd(fault_world, out, ranks=2),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_line(first, re.compile(r"^step: 2/", re.M))
    time.sleep(rng.uniform(0.0, 1.0))
    kill_tree(first.pid)
    first.wait(timeout=30)
    for _ in range(3):
        states = complete_states(out)
        newest = max(states.items(), key=lambda kv: kv[1])
        code, output = check_resume(
            fault_world,
            out,
            None,
            newest,
            max_steps=REFERENCE_STEPS,
            env=env,
            kill_after_s=rng.uniform(0.0, 1.0),
            ranks=2,
        )
        assert code is None, output
    states = complete_states(out)
    newest = max(states.items(), key=lambda kv: kv[1])
    code, output = check_resume(fault_world, out, None, newest, ranks=1)
    assert code == 0, output
    assert (
        "resuming a 2-rank state with 1 ranks: the data position and global batch carry over"
        in output
    )


def _wait_for_line(proc: subprocess.Popen, pattern: re.Pattern) -> str:
    seen = []
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    for line in proc.stdout:
        seen.append(line)
        if pattern.search(line):
            return "".join(seen)
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError(
        f"exited with {proc.wait()} before printing /{pattern.pattern}/:\n{''.join(seen)}"
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_saves_the_state_and_exits_143(fault_world, reference_losses, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(fault_world, out, driver=False),
        env=train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = _wait_for_line(proc, re.compile(r"^step: 5/", re.M))
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=TRAIN_TIMEOUT_S)
    output = seen + rest
    assert proc.returncode == 143, output
    last_step = max(losses_by_step(output))
    assert (
        f"received SIGTERM: saving the state at step {last_step} and exiting with code 143"
        in output
    )
    assert "Traceback" not in output
    assert complete_states(out) == {"train_latest_state": last_step}
    assert not (out / "final").exists()  # final weights only when the run completes
    code, _ = check_resume(fault_world, out, reference_losses, ("train_latest_state", last_step))
    assert code == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_disk_full_during_a_save_is_one_clear_error_and_keeps_the_previous_state(
    fault_world, reference_losses, tmp_path
):
    out = tmp_path / "run"
    proc = run_train(train_cmd(fault_world, out), env=train_env(FAULT_ENOSPC_ON_SAVE=3))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, proc.stderr
    assert re.search(
        r"cannot write the training state: \S*train_latest_state\.tmp-\d+/optimizer\.bin "
        r"\(No space left on device; [0-9.]+ [KMGT]?i?B free on that disk\)",
        error_lines[0],
    ), error_lines[0]
    assert re.search(
        rf"the previous state {out / 'train_latest_state'} \(step 2\) is intact; free disk space",
        error_lines[0],
    ), error_lines[0]
    # Nothing half-written is left, and the previous state verifies and resumes at its position.
    assert sorted(p.name for p in out.iterdir()) == ["train_latest_state"]
    assert complete_states(out) == {"train_latest_state": 2}
    code, _ = check_resume(fault_world, out, reference_losses, ("train_latest_state", 2))
    assert code == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: room for one state of the tiny model (1.4 MB) but not for a second beside
    it."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the injected-ENOSPC test "
            "covers the path"
        )
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_really_full_disk_during_a_save_keeps_the_previous_state(
    fault_world, reference_losses, small_disk, tmp_path
):
    out = small_disk / "run"
    proc = run_train(train_cmd(fault_world, out, driver=False))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, proc.stderr
    assert re.search(
        r"cannot write the training state: \S*train_latest_state\.tmp-\d+\S* \(.+; "
        r"[0-9.]+ [KMGT]?i?B free on that disk\)",
        error_lines[0],
    ), error_lines[0]
    assert re.search(
        rf"the previous state {out / 'train_latest_state'} \(step 1\) is intact", error_lines[0]
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "train_latest_state"
    ]  # the partial temp dir is gone
    assert complete_states(out) == {"train_latest_state": 1}
    # The remedy the message gives: move the state to a larger disk and resume there.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    code, _ = check_resume(fault_world, moved, reference_losses, ("train_latest_state", 1))
    assert code == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_host_ram_guard_shrinks_switches_then_saves_and_stops_before_the_limit(
    fault_world, reference_losses, tmp_path
):
    """A 10 MiB-per-step leak against --host_ram_limit 1.5GiB: the job must stop cleanly below
    it."""
    out = tmp_path / "run"
    proc = run_train(
        train_cmd(fault_world, out, "--host_ram_limit", "1.5GiB"),
        env=train_env(FAULT_LEAK_MIB_PER_STEP=10),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output
    assert "Traceback" not in output
    # Rebuilding the data path mid-window must not break the log line's data-wait share.
    assert not re.search(r"data-wait: -", output), output
    guard = [line for line in output.splitlines() if line.startswith("host-RAM watchdog: ")]
    # Escalation in order: prefetch depth halved down to 1 (as often as the plan's depth needs),
    # ultra-low-mem readers, then the stop.
    kinds = [
        "shrink"
        if "prefetch depth" in g and "-> " in g and "saving" not in g
        else "ultra"
        if "switching the dataset readers to ultra-low-mem mode" in g
        else "stop"
        if "saving the state and stopping" in g
        else "?"
        for g in guard
    ]
    assert kinds[-2:] == ["ultra", "stop"] and set(kinds[:-2]) <= {"shrink"}, guard
    usage = [
        float(m)
        for m in re.findall(
            r"host RAM [0-9.]+ \w+ is ([0-9.]+)% of the 1.50 GiB limit", "\n".join(guard)
        )
    ]
    assert len(usage) == len(guard)
    assert all(85.0 <= u < 95.0 for u in usage[:-1]) and 95.0 <= usage[-1] < 100.0, usage
    stop_step = int(re.search(r"\(stop threshold 95%\) at step (\d+)", guard[-1]).group(1))
    # The state of the stop step is saved and complete, no final weights, and it resumes exactly.
    assert complete_states(out) == {"train_latest_state": stop_step}
    assert not (out / "final").exists()
    plan = json.loads((out / "train_latest_state" / "manifest.json").read_text())["plan"]
    assert plan["prefetch_depth"] == 1 and plan["ultra_low_mem"] is True
    code, _ = check_resume(fault_world, out, reference_losses, ("train_latest_state", stop_step))
    assert code == 0
    print("\n".join(guard))


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


STATE = "train_latest_state"
DAMAGES = {
    "truncated-weights": (
        lambda s: _truncate(s / "model.safetensors"),
        r"train_latest_state/model\.safetensors has \d+ bytes, the manifest says \d+: truncated "
        r"state",
    ),
    "corrupt-optimizer": (
        lambda s: _flip_byte(s / "optimizer.bin"),
        r"train_latest_state/optimizer\.bin does not match its sha256 in the manifest: corrupt "
        r"state",
    ),
    "missing-scheduler": (
        lambda s: (s / "scheduler.pt").unlink(),
        r"train_latest_state lacks scheduler\.pt listed in its manifest: incomplete "
        r"state",
    ),
    "missing-manifest": (
        lambda s: (s / "manifest.json").unlink(),
        r"train_latest_state has no manifest\.json: the save did not finish \(incomplete state\)",
    ),
    "garbage-manifest": (
        lambda s: (s / "manifest.json").write_text("{not json"),
        r"train_latest_state/manifest\.json is not valid JSON",
    ),
}


@pytest.fixture(scope="module")
def finished_run(fault_world, reference_losses) -> Path:
    """The reference run's output folder (state at its last step and final weights)."""
    return fault_world / "reference-run"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _refused(proc: subprocess.CompletedProcess) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_state_is_refused_naming_the_file(fault_world, finished_run, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(finished_run / STATE, out / STATE)
    apply, message = DAMAGES[damage]
    apply(out / STATE)
    before = _snapshot(out)
    line = _refused(
        run_train(
            train_cmd(fault_world, out, max_steps=REFERENCE_STEPS + 1, resume=True, driver=False)
        )
    )
    assert line.startswith(f"error: no usable training state in {out}: "), line
    assert re.search(message, line), line
    assert _snapshot(out) == before  # a refused resume deletes and rewrites nothing


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_damaged_latest_falls_back_to_an_intact_previous_state(
    fault_world, finished_run, reference_losses, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(finished_run / STATE, out / STATE)
    shutil.copytree(finished_run / STATE, out / (STATE + ".prev"))
    _flip_byte(out / STATE / "model.safetensors", offset=-10)
    proc = run_train(
        train_cmd(fault_world, out, max_steps=REFERENCE_STEPS + 1, resume=True, driver=False)
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert (
        f"warning: {out / STATE} is incomplete or corrupt; resuming from {out / (STATE + '.prev')}"
        in output
    )
    assert (
        f"resumed from {out / (STATE + '.prev')} at step {REFERENCE_STEPS} (epoch 0, row "
        f"{4 * REFERENCE_STEPS} of the epoch)" in output
    )
    assert complete_states(out) == {STATE: REFERENCE_STEPS + 1}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "flag, value, diffs",
    [
        ("--max_seq_len", "32", ["max_seq_len: saved 64, now 32"]),
        (
            "--model_preset",
            "small",
            [
                "model.d_model: saved 64, now 512",
                "model.n_layers: saved 2, now 6",
                "model.preset: saved 'tiny', now 'small'",
            ],
        ),
    ],
)
def test_state_of_another_model_config_is_refused_with_the_field_diff(
    fault_world, finished_run, tmp_path, flag, value, diffs
):
    out = tmp_path / "run"
    shutil.copytree(finished_run / STATE, out / STATE)
    before = _snapshot(out)
    cmd = train_cmd(fault_world, out, max_steps=REFERENCE_STEPS + 1, resume=True, driver=False)
    cmd[cmd.index(flag) + 1] = value
    line = _refused(run_train(cmd))
    assert line.startswith(f"error: {out / STATE} was saved "), line
    listed = re.search(r"\((.*)\); resume with the saved settings", line)
    assert listed, line
    assert all(diff in listed.group(1).split("; ") for diff in diffs), line
    assert _snapshot(out) == before


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_state_of_another_dataset_is_refused_with_the_field_diff(
    fault_world, finished_run, tmp_path
):
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig
    from pipeline.sample_corpus import write_sample_corpus

    files = write_sample_corpus(tmp_path / "corpus", num_docs=1400)
    build_dataset(BuildConfig(inputs=[files["txt"]], out=tmp_path / "other"), progress=False)
    out = tmp_path / "run"
    shutil.copytree(finished_run / STATE, out / STATE)
    cmd = train_cmd(fault_world, out, max_steps=REFERENCE_STEPS + 1, resume=True, driver=False)
    cmd[cmd.index("--data") + 1] = str(tmp_path / "other")
    line = _refused(run_train(cmd))
    saved = open_dataset(fault_world / "tokens").fingerprint
    now = open_dataset(tmp_path / "other").fingerprint
    assert f"(dataset_fingerprint: saved '{saved}', now '{now}')" in line, line


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("config_file", [None, "zero2_offload_3gpu.yaml"], ids=["ddp", "zero2"])
def test_overflowing_gradients_are_skipped_then_stop_the_run(fault_world, tmp_path, config_file):
    """A finite loss with inf gradients: our norm check (DDP) or DeepSpeed's own overflow check
    (ZeRO-2) skips the update; two in a row stop the run, and no saved weight is non-finite."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    ranks, extra = (2, {"config_file": config_file}) if config_file else (1, {})
    cmd = train_cmd(fault_world, out, "--max_bad_steps", "2", max_steps=12, ranks=ranks, **extra)
    proc = subprocess.run(
        cmd, env=train_env(FAULT_INF_GRAD_FROM=4), capture_output=True, text=True, timeout=600
    )
    output = proc.stdout + proc.stderr
    # Each rank exits 4; the launcher of a multi-rank job reports it and exits 1.
    assert proc.returncode == 4 or (ranks > 1 and "exitcode  : 4" in output), output[-4000:]
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error: ")}
    assert len(errors) == 1, errors  # the same line from every rank
    assert "training diverged: 2 consecutive steps up to step 5" in next(iter(errors)), errors
    if config_file:
        assert "skipped by DeepSpeed" in next(iter(errors)), errors
    assert losses_by_step(output).keys() >= {1, 2, 3}
    states = complete_states(out)
    assert states.get(STATE) in (3, 4, 5), states  # a skipped step changes no weight
    weights = out / STATE / "model.safetensors"
    if weights.exists():
        assert all(t.isfinite().all() for t in load_file(str(weights)).values())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_divergence_skips_steps_then_stops_keeping_the_last_good_state(fault_world, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    proc = run_train(train_cmd(fault_world, out, "--lr", "1e4", max_steps=40, driver=False))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 4, output
    assert "Traceback" not in output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "training diverged: 3 consecutive steps" in errors[0], output
    assert "was skipped (no update)" in output
    states = complete_states(out)
    assert list(states) == [STATE], states
    tensors = load_file(str(out / STATE / "model.safetensors"))
    assert all(t.isfinite().all() for t in tensors.values())  # never a non-finite weight saved
    assert not (out / "final").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigint_then_sigterm_still_saves_and_stops(fault_world, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(fault_world, out, driver=False),
        env=train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = _wait_for_line(proc, re.compile(r"^step: 5/", re.M))
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)  # what a launcher under `timeout` forwards next
    rest, _ = proc.communicate(timeout=TRAIN_TIMEOUT_S)
    output = seen + rest
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    last_step = max(losses_by_step(output))
    assert complete_states(out) == {STATE: last_step}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "extra, max_steps, message",
    [
        ((), 5, f"the resumed state is at step {REFERENCE_STEPS} but this run stops at step 5"),
        (
            ("--lr", "0.5"),
            REFERENCE_STEPS + 1,
            r"resume keeps the saved optimizer settings but got --lr 0.5",
        ),
    ],
)
def test_misleading_resume_flags_are_one_line(
    fault_world, finished_run, tmp_path, extra, max_steps, message
):
    out = tmp_path / "run"
    shutil.copytree(finished_run / STATE, out / STATE)
    before = _snapshot(out)
    line = _refused(
        run_train(
            train_cmd(fault_world, out, *extra, max_steps=max_steps, resume=True, driver=False)
        )
    )
    assert re.search(message, line), line
    assert _snapshot(out) == before
