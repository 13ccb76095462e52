"""Two nodes on one machine: two `accelerate launch` process groups (`--num_machines 2
--machine_rank 0/1`, two CPU ranks each) form one 4-rank job over gloo, on DDP, on DeepSpeed
ZeRO-2 and ZeRO-3 with the optimizer in host RAM and on FSDP2 (ZeRO-3 and FSDP2 shard the
parameters over the four ranks).
Every row of an epoch reaches exactly one of the four ranks, each node writes its index files
once (into the dataset's shared cache, or into the node-local folder $LOWMEM_INDEX_CACHE names),
a kill -9 of one node ends the other with one line, and both resume to the losses of a run that
was never interrupted (and its weights to 1e-6)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from trainer_low_mem.distributed import peer_lost

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"
STEP_LINE = re.compile(r"^step: (\d+)/\d+, loss: ([0-9.]+)", re.M)
RESUMED_LINE = re.compile(r"resumed from \S+ at step (\d+) ")
LAUNCH_TIMEOUT_S = 240
ROWS_PER_EPOCH = 42  # the 8 sample documents in rows of 64 tokens
ZERO2_CONFIG = REPO / "accelerate_configs" / "zero2_offload_3gpu.yaml"
ZERO3_CONFIG = REPO / "accelerate_configs" / "zero3_offload_3gpu.yaml"
FSDP2_CONFIG = REPO / "accelerate_configs" / "fsdp2_cpu_2proc.yaml"
STEPS = 8  # 6 steps of 8 rows cover epoch 0 (the 6th: 2 rows and 6 of padding), then epoch 1

# Records, per process, each batch the training loop takes and each index file the process built.
DRIVER = r"""
import json, os, sys
from pathlib import Path

import pipeline.index_cache as index_cache
import trainer_low_mem.data as data
from trainer_low_mem.cli import main

trace = Path(os.environ["NODE_TRACE"])
me = f"node{os.environ['GROUP_RANK']}-rank{os.environ['RANK']}"
open_or_build = index_cache.open_or_build


def traced_open_or_build(path, *args, **kwargs):
    arrays, scalars, built = open_or_build(path, *args, **kwargs)
    if built:
        with open(trace / f"built-{me}.txt", "a") as f:
            f.write(f"{path}\n")
    return arrays, scalars, built


index_cache.open_or_build = traced_open_or_build
next_batch = data.TrainData.next_batch


def traced_next_batch(self):
    batch = next_batch(self)
    with open(trace / f"rows-{me}.jsonl", "a") as f:
        f.write(json.dumps([batch["input_ids"].tolist(), batch["labels"].tolist()]) + "\n")
    return batch


data.TrainData.next_batch = traced_next_batch
sys.exit(main())
"""


@pytest.fixture
def world(tmp_path) -> Path:
    """The driver and a dataset of 8 sample documents (42 rows of 64 tokens per epoch)."""
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig
    from pipeline.sample_corpus import write_sample_corpus

    (tmp_path / "driver.py").write_text(DRIVER)
    files = write_sample_corpus(tmp_path / "corpus", num_docs=8)
    build_dataset(BuildConfig(inputs=[files["txt"]], out=tmp_path / "tokens"), progress=False)
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_nodes(
    world: Path,
    out: Path,
    trace: Path,
    *flags: str,
    engine: str,
    max_steps: int,
    node_caches: bool,
) -> list[subprocess.Popen]:
    """Machine ranks 0 and 1 of one job, each `accelerate launch`ing 2 of its 4 ranks on
    `engine` ("ddp", "zero2", "zero3" or "fsdp2"); with node_caches each node's index files go to a
    folder of its own ($LOWMEM_INDEX_CACHE)."""
    trace.mkdir(parents=True, exist_ok=True)
    port = str(_free_port())
    nodes = []
    for machine_rank in (0, 1):
        env = {
            **os.environ,
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
            "NODE_TRACE": str(trace),
        }
        env.pop("LOWMEM_INDEX_CACHE", None)
        if node_caches:
            env["LOWMEM_INDEX_CACHE"] = str(world / f"node{machine_rank}-cache")
        if engine == "ddp":
            engine_flags = ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
        elif engine == "fsdp2":
            engine_flags = ["--config_file", str(FSDP2_CONFIG)]
        else:
            # torchrun on each node, as for DDP, instead of DeepSpeed's pdsh launcher.
            engine_flags = [
                "--config_file",
                str(ZERO3_CONFIG if engine == "zero3" else ZERO2_CONFIG),
                "--deepspeed_multinode_launcher",
                "standard",
            ]
        cmd = [
            str(ACCELERATE),
            "launch",
            *engine_flags,
            "--num_machines",
            "2",
            "--machine_rank",
            str(machine_rank),
            "--num_processes",
            "4",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            str(world / "driver.py"),
            "train",
            "--data",
            str(world / "tokens"),
            "--output_dir",
            str(out),
            "--model_preset",
            "tiny",
            "--max_seq_len",
            "64",
            "--global_batch",
            "8",
            "--auto_plan",
            "False",
            "--batch_size_per_gpu",
            "2",
            "--gradient_accumulation_steps",
            "1",
            "--warmup_steps",
            "2",
            # A constant learning rate after warm-up: a resumed run with another --max_steps
            # takes the same steps as the uninterrupted one.
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
            *flags,
        ]
        nodes.append(
            subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return nodes


def _finish(nodes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    results = []
    for node in nodes:
        try:
            output, _ = node.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            _kill_tree(node.pid)
            output, _ = node.communicate()
            raise AssertionError(
                f"a node did not finish in {LAUNCH_TIMEOUT_S} s:\n{output}"
            ) from exc
        results.append((node.returncode, output))
    return results


def _kill_tree(pid: int) -> None:
    """kill -9 of a node: its launcher and every rank at once (torchrun gives each rank a
    session of its own, so the launcher's process group would miss them)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def _losses(output: str) -> dict[int, str]:
    return {int(m[1]): m[2] for m in STEP_LINE.finditer(output)}


def _batches(trace: Path) -> dict[str, list]:
    """Each rank's batches in the order its loop took them: node0-rank0 .. node1-rank3."""
    return {
        path.name.removeprefix("rows-").removesuffix(".jsonl"): [
            json.loads(line) for line in path.read_text().splitlines()
        ]
        for path in sorted(trace.glob("rows-*.jsonl"))
    }


def _rows(batches: list) -> list[tuple]:
    """The batches' rows that carry data (a row of padding has no label)."""
    return [
        (tuple(ids), tuple(labels))
        for batch_ids, batch_labels in batches
        for ids, labels in zip(batch_ids, batch_labels, strict=True)
        if any(label != -100 for label in labels)
    ]


def _builds(trace: Path) -> dict[str, list[str]]:
    """The index files each rank built (file names), node0-rank0 .. node1-rank3."""
    return {
        path.name.removeprefix("built-").removesuffix(".txt"): path.read_text().splitlines()
        for path in sorted(trace.glob("built-*.txt"))
    }


def _single_process_epoch(world: Path) -> list[tuple]:
    """Epoch 0's rows from one process's loader (world size 1, the trainer's seed 0)."""
    from pipeline import open_dataset
    from pipeline.loader import Loader

    dataset = open_dataset(world / "tokens", index_cache=world / "probe-cache")
    loader = Loader(dataset, batch_size=8, seq_len=64, seed=0)
    return _rows([(b["input_ids"].tolist(), b["labels"].tolist()) for b in loader])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    assert found, f"no safetensors in {folder}"
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_two_nodes_train_exactly_once_survive_a_killed_node_and_resume_to_the_same_losses(
    world, engine
):
    started = time.monotonic()
    shared_cache = world / "tokens" / ".index_cache"

    # 1. An uninterrupted run, both nodes on the dataset's own (shared) index cache.
    reference_trace = world / "trace-reference"
    nodes = _start_nodes(
        world,
        world / "reference",
        reference_trace,
        engine=engine,
        max_steps=STEPS,
        node_caches=False,
    )
    (code0, out0), (code1, out1) = _finish(nodes)
    assert (code0, code1) == (0, 0), out0 + out1
    assert "world_size: 4, device: cpu" in out0 and "world_size" not in out1  # rank 0 prints
    assert "2 rank(s) x (process" in out0  # host RAM is planned per node: 2 ranks share it
    reference = _losses(out0)
    assert sorted(reference) == list(range(1, STEPS + 1)), out0

    batches = _batches(reference_trace)
    assert sorted(batches) == [
        "node0-rank0",
        "node0-rank1",
        "node1-rank2",
        "node1-rank3",
    ]
    assert all(len(taken) == STEPS for taken in batches.values())
    epoch0 = [row for taken in batches.values() for row in _rows(taken[:6])]
    expected = _single_process_epoch(world)
    assert len(expected) == ROWS_PER_EPOCH
    assert Counter(epoch0) == Counter(expected)  # every row once across the 4 ranks
    assert len(epoch0) == ROWS_PER_EPOCH

    # One writer per file for the machine: the nodes share the folder, built once under its lock.
    built = [name for names in _builds(reference_trace).values() for name in names]
    assert sorted(Counter(built).values()) == [1] * len(built)
    assert {Path(p).parent for p in built} == {shared_cache}
    # What is there was built in this run (and the epoch before last removed): no leftovers.
    assert {p.name for p in shared_cache.iterdir()} <= {Path(p).name for p in built}
    assert any(Path(p).name.startswith("docs-") for p in built), built
    shared_files = {p.name: p.stat().st_mtime_ns for p in shared_cache.iterdir()}

    # 2. The same job with node-local caches; node 1 is killed -9 mid-run.
    out = world / "run"
    killed_trace = world / "trace-killed"
    node0, node1 = _start_nodes(
        world, out, killed_trace, engine=engine, max_steps=400, node_caches=True
    )
    seen = []
    for line in node0.stdout:
        seen.append(line)
        if line.startswith("step: 2/"):
            break
    else:
        _kill_tree(node1.pid)
        raise AssertionError(f"node 0 exited with {node0.wait()} before step 2:\n{''.join(seen)}")
    _kill_tree(node1.pid)
    node1.wait(timeout=30)
    killed_at = time.monotonic()
    ((code0, rest),) = _finish([node0])
    survivor = "".join(seen) + rest
    assert code0 != 0, survivor
    assert re.search(
        r"^error: another rank of the job is gone \(Connection (closed|reset) by peer[^)]*\): a "
        r"process or a node died, see its log; the last saved state is intact: resume every "
        r"node with --is_keep_training=True$",
        survivor,
        re.M,
    ), survivor
    # No rank's traceback: the one there is the launcher's own, raising its ChildFailedError.
    assert survivor.count("Traceback (most recent call last)") == 1, survivor
    assert "ChildFailedError" in survivor.split("Traceback (most recent call last)")[1]
    assert time.monotonic() - killed_at < 60  # gone at once, not after a collective's timeout

    # 3. Both nodes resume from the newest complete state and finish the uninterrupted run.
    resumed_trace = world / "trace-resumed"
    nodes = _start_nodes(
        world,
        out,
        resumed_trace,
        "--is_keep_training=True",
        engine=engine,
        max_steps=STEPS,
        node_caches=True,
    )
    (code0, out0), (code1, out1) = _finish(nodes)
    assert (code0, code1) == (0, 0), out0 + out1
    found = RESUMED_LINE.search(out0)
    assert found, out0
    resumed_at = int(found[1])
    assert 1 <= resumed_at < STEPS, out0  # the kill landed before the end: a resume to check
    losses = _losses(out0)
    assert sorted(losses) == list(range(resumed_at + 1, STEPS + 1)), out0
    assert losses == {step: reference[step] for step in losses}
    # The same rows on the same ranks as the uninterrupted run, from the saved position on.
    resumed = _batches(resumed_trace)
    assert {rank: taken for rank, taken in resumed.items()} == {
        rank: taken[resumed_at:] for rank, taken in batches.items()
    }
    reference_weights, weights = _weights(world / "reference" / "final"), _weights(out / "final")
    assert sorted(weights) == sorted(reference_weights)
    # Equal to 1e-6 (seen: 3e-10 to 7e-9), not bit for bit: the resumed processes' DDP buckets start
    # in the default order (the uninterrupted run's were rebuilt after its first step), which
    # changes gloo's summation order; two uninterrupted runs export identical bytes.
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference_weights[name], rtol=0, atol=1e-6)

    # Each node wrote its index files once, into its own folder, across the kill and resume;
    # the shared cache was left alone.
    for machine_rank in (0, 1):
        node = f"node{machine_rank}"
        cache = world / f"{node}-cache"
        written = [
            name
            for trace in (killed_trace, resumed_trace)
            for rank, names in _builds(trace).items()
            for name in names
            if Path(name).is_relative_to(cache)
        ]
        writers = {
            rank
            for trace in (killed_trace, resumed_trace)
            for rank, names in _builds(trace).items()
            if any(Path(name).is_relative_to(cache) for name in names)
        }
        assert writers and all(rank.startswith(node) for rank in writers), writers
        assert sorted(Counter(written).values()) == [1] * len(written), written
        files = sorted(p.name for p in cache.rglob("*") if p.is_file())
        assert not [f for f in files if ".tmp-" in f or f.endswith(".lock")], files
        assert any(f.startswith("docs-") for f in files), files
    assert {p.name: p.stat().st_mtime_ns for p in shared_cache.iterdir()} == shared_files
    print(f"two-node {engine} launch, kill -9 and resume: {time.monotonic() - started:.0f} s")


def test_a_collective_whose_peer_is_gone_is_named_by_the_backends_words():
    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:15246. This is typically caused by a remote worker crashing."
    )
    assert peer_lost(gloo) == "Connection closed by peer [127.0.0.1]:15246"
    reset = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection reset by peer")
    assert peer_lost(reset) == "Connection reset by peer"
    assert peer_lost(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == ""
    assert peer_lost(ValueError("Connection closed by peer")) == ""
    # The launcher's store on machine 0 gone: torch's own type, its first line.
    store = torch.distributed.DistNetworkError("failed to recv, got 0 bytes\nException raised from")
    assert peer_lost(store) == "failed to recv, got 0 bytes"


def test_the_run_lock_lists_the_ranks_on_rank_0s_node_for_stop(tmp_path):
    from trainer_low_mem.distributed import RankContext
    from trainer_low_mem.run_lock import lock_output_dir
    from trainer_low_mem.stop import run_pids

    ctx = RankContext.single()
    here = socket.gethostname()
    # What rank 0 gathers in a 4-rank job over two nodes (it is the first of its node's two).
    ctx.gather = lambda value: [value, (here, 4343), ("other-node", 4242), ("other-node", 4244)]
    out = tmp_path / "out"
    lock = lock_output_dir(out, ctx)
    try:
        assert run_pids(out) == [os.getpid(), 4343]
    finally:
        lock.release()
