"""The shared index files: built once per node, mapped by every process, exactly as the private
index was (exactly-once rows, resume across world sizes), safe against races, killed builders and
read-only dataset folders; and the next epoch's index prepared ahead, off the consumer's path."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline import Loader, index_cache, open_dataset, sampler
from pipeline.sampler import EpochIndex, epoch_permutation, fill_permutation, layout_starts

REPO = Path(__file__).resolve().parents[2]
NUM_DOCS, SEED, MEDIAN = 300, 7, 40


@pytest.fixture
def docs_and_dir(make_dataset, synthetic_token_docs):
    path = make_dataset(num_docs=NUM_DOCS, seed=SEED, median_len=MEDIAN)
    return synthetic_token_docs(NUM_DOCS, SEED, MEDIAN, 256), path


def digest(loader) -> str:
    """sha256 of every batch of one pass, all three tensors."""
    h = hashlib.sha256()
    for batch in loader:
        for tensor in batch.values():
            h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def useful_tokens(batches) -> Counter:
    counts = Counter()
    for b in batches:
        counts.update(b["input_ids"][b["labels"] != -100].tolist())
    return counts


def rows(batches) -> np.ndarray:
    """(rows, L) input ids of batches taken step by step, rank by rank: global row order."""
    return np.concatenate([b["input_ids"].numpy() for b in batches])


def run_ranks(ds, world_size, batch_size, seq_len, states=None, max_steps=None):
    loaders = [
        Loader(ds, batch_size, seq_len, rank=r, world_size=world_size, seed=SEED)
        for r in range(world_size)
    ]
    for loader in loaders if states is not None else ():
        loader.load_state_dict(states)
    iters, batches, steps = [iter(loader) for loader in loaders], [], 0
    while max_steps is None or steps < max_steps:
        step = [next(it, None) for it in iters]
        if step[0] is None:
            break
        batches.extend(b.clone() for b in step)
        steps += 1
    return batches, loaders[0].state_dict()


# ----------------------------------------------------------------------------- kernels vs numpy


@pytest.mark.parametrize("dtype", [np.uint32, np.int64])
@pytest.mark.parametrize("num_docs", [0, 1, 2, 1000, 100_003])  # over blocks and refills
def test_permutation_filled_in_place_equals_epoch_permutation(dtype, num_docs):
    out = np.empty(num_docs, dtype=dtype)
    fill_permutation(out, seed=5, epoch=3)
    assert np.array_equal(out, epoch_permutation(num_docs, 5, 3))


def reference_layout(starts, perm, seq_len, layout):
    """The layout with plain numpy (as the index was built before it was shared)."""
    lengths = starts[perm + 1] - starts[perm]
    cum = np.zeros(perm.size + 1, dtype=np.int64)
    if layout == 0:
        np.cumsum(lengths + 1, out=cum[1:])
    elif layout == 2:
        np.cumsum(-(-(lengths + 1) // seq_len), out=cum[1:])
        return cum, int(np.count_nonzero(lengths + 1 > seq_len))
    else:
        x = 0
        for k, n in enumerate(lengths):
            if x % seq_len and n + 1 > seq_len - x % seq_len:
                x += seq_len - x % seq_len
            cum[k] = x
            x += n + 1
        cum[-1] = x
    split = np.count_nonzero(cum[:-1] // seq_len != (cum[:-1] + lengths) // seq_len)
    return cum, int(split)


@pytest.mark.parametrize("layout", [0, 1, 2])
@pytest.mark.parametrize("seq_len", [2, 7, 64])
def test_layout_starts_equals_the_numpy_reference(layout, seq_len):
    rng = np.random.default_rng(seq_len)
    n = 9000  # over two of the kernel's gather blocks
    lengths = rng.integers(0, 3 * seq_len, size=n)
    lengths[:4] = [0, seq_len - 1, seq_len, 2 * seq_len]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    perm = epoch_permutation(n, 1, 0).astype(np.uint32)
    cum = np.empty(n + 1, dtype=np.int64)
    split = layout_starts(perm, starts, seq_len, layout, cum)
    want_cum, want_split = reference_layout(starts, perm.astype(np.int64), seq_len, layout)
    assert np.array_equal(cum, want_cum) and split == want_split


@pytest.mark.parametrize("layout", ["stream", "samples", "rows"])
def test_an_index_laid_out_in_slices_equals_the_reference(monkeypatch, layout):
    monkeypatch.setattr(sampler, "_LAYOUT_SLICE", 7)  # 1000 documents: 143 slices
    lengths = np.random.default_rng(2).integers(0, 40, size=1000)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    released = []
    perm = np.empty(1000, dtype=np.uint32)
    cum = np.empty(1001, dtype=np.int64)
    args = (starts, 3, 0, 16, layout)
    scalars = sampler.fill_epoch_index(perm, cum, *args, release=released.append)
    code = sampler.LAYOUTS.index(layout)
    want_cum, want_split = reference_layout(starts, perm.astype(np.int64), 16, code)
    assert np.array_equal(cum, want_cum) and scalars["split_samples"] == want_split
    assert len(released) == 1 + 2 * 143


# ----------------------------------------------------------------------------- the contract


def resident_kib(path: Path) -> int:
    """Rss of this process's maps of `path` (Linux smaps), in KiB."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.split()[-1] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_offsets_and_epoch_index_are_read_only_maps_of_shared_files(docs_and_dir):
    docs, path = docs_and_dir
    ds = open_dataset(path)
    loader = Loader(ds, 4, 32, seed=SEED)
    index = loader._epoch_index(0)  # internals: the index's arrays are the file's pages
    # The build read every offset, then handed those pages back: none stays mapped here.
    assert resident_kib(ds.index_folder / f"docs-{ds.fingerprint}.idx") == 0
    assert np.array_equal(np.diff(ds.doc_starts), [len(d) for d in docs])
    assert not ds.doc_starts.flags.writeable and ds.index_folder == path / ".index_cache"
    assert index.perm.dtype == np.uint32 and not index.perm.flags.writeable
    assert np.array_equal(index.perm, epoch_permutation(NUM_DOCS, SEED, 0))
    private = EpochIndex.build(np.asarray(ds.doc_starts), SEED, 0, 32, "stream")
    assert np.array_equal(index.cum, private.cum) and index.total_rows == private.total_rows
    names = sorted(p.name for p in ds.index_folder.iterdir())
    assert names == [f"docs-{ds.fingerprint}.idx", f"epoch-{ds.fingerprint}-s7-L32-stream-e0.idx"]


def test_every_token_once_across_three_ranks_and_resume_on_two(docs_and_dir):
    docs, path = docs_and_dir
    ds = open_dataset(path)
    want = Counter(np.concatenate(docs).tolist())
    want[ds.eos_id] += len(docs)
    whole, _ = run_ranks(ds, 3, 4, 32)
    assert useful_tokens(whole) == want
    first, state = run_ranks(ds, 3, 4, 32, max_steps=5)
    rest, _ = run_ranks(open_dataset(path), 2, 5, 32, states=state)
    assert useful_tokens(first) + useful_tokens(rest) == want
    # Bit-equal: the rows after the resume point are the rows the 3-rank run gave there.
    total, whole_rows = state["total_rows"], rows(whole)
    assert state["consumed_rows"] == 60 and np.array_equal(rows(first), whole_rows[:60])
    assert np.array_equal(rows(rest)[: total - 60], whole_rows[60:total])


def test_a_second_open_builds_nothing(docs_and_dir, monkeypatch):
    _, path = docs_and_dir
    loader = Loader(open_dataset(path), 4, 32, seed=SEED)
    first = digest(loader)
    loader._ahead[1].result()  # internals: epoch 1, prepared in the background, is written
    writes = []
    real = index_cache._write
    monkeypatch.setattr(index_cache, "_write", lambda p, *a: writes.append(p) or real(p, *a))
    loader = Loader(open_dataset(path), 4, 32, seed=SEED)
    assert next(iter(loader)) is not None and writes == []
    assert digest(Loader(open_dataset(path), 4, 32, seed=SEED)) == first


def test_next_epoch_is_prepared_ahead_in_the_background(docs_and_dir, monkeypatch):
    _, path = docs_and_dir
    built = []
    real = sampler.fill_epoch_index

    def spy(perm, cum, starts, seed, epoch, *rest, **kwargs):
        built.append((epoch, threading.current_thread().name))
        return real(perm, cum, starts, seed, epoch, *rest, **kwargs)

    monkeypatch.setattr(sampler, "fill_epoch_index", spy)
    loader = Loader(open_dataset(path), 2, 32, seed=SEED)
    assert len(loader) >= 20
    for _ in range(3):
        digest(loader)  # epochs 0, 1, 2
    loader._ahead[1].result()  # internals: wait for epoch 3, prepared at 90% of epoch 2
    assert built[0] == (0, "MainThread")
    assert built[1:] == [
        (1, "epoch-index-ahead"),
        (2, "epoch-index-ahead"),
        (3, "epoch-index-ahead"),
    ]
    # Epoch 3 was built (at 90% of epoch 2): epochs before 2 are gone, the file count stays flat.
    epochs = sorted(p.name.rsplit("-e", 1)[1] for p in loader.dataset.index_folder.glob("epoch-*"))
    assert epochs == ["2.idx", "3.idx"]


# ----------------------------------------------------------------------------- processes

_WORKER = r"""
import hashlib, os, sys, time
from pathlib import Path
from pipeline import Loader, index_cache, open_dataset

path, mode, go = sys.argv[1:4]
real_write = index_cache._write


def write(p, key, fields, fill):
    os.write(1, f"BUILT {Path(p).name}\n".encode())  # one write: threads print too
    if mode == "die" and Path(p).name.startswith("epoch-"):
        def fill(arrays):  # half an index, then gone like a kill -9
            arrays["perm"][:10] = 1
            os.kill(os.getpid(), 9)
    return real_write(p, key, fields, fill)


index_cache._write = write
while not os.path.exists(go):
    time.sleep(0.001)
h = hashlib.sha256()
for batch in Loader(open_dataset(path), 4, 32, seed=7):
    for tensor in batch.values():
        h.update(tensor.numpy().tobytes())
os.write(1, f"DIGEST {h.hexdigest()}\n".encode())
"""


def start_worker(path, mode, go, prefix=(), env=None):
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    env.pop(index_cache.ENV_VAR, None)
    argv = [*prefix, sys.executable, "-c", _WORKER, str(path), mode, str(go)]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def lines(proc, word) -> list[str]:
    out, _ = proc.communicate(timeout=300)
    return [line.split()[1] for line in out.splitlines() if line.startswith(word)]


@pytest.mark.slow
def test_two_processes_racing_build_each_file_once_and_read_the_same(docs_and_dir, tmp_path):
    _, path = docs_and_dir
    go = tmp_path / "go"
    procs = [start_worker(path, "race", go) for _ in range(2)]
    go.touch()
    outs = [proc.communicate(timeout=300)[0].splitlines() for proc in procs]
    assert [p.returncode for p in procs] == [0, 0]
    built = Counter(line.split()[1] for out in outs for line in out if line.startswith("BUILT"))
    first = {name: n for name, n in built.items() if name.startswith("docs") or "-e0." in name}
    assert sorted(first.values()) == [1, 1], built
    digests = {line.split()[1] for out in outs for line in out if line.startswith("DIGEST")}
    ds = open_dataset(path, index_cache=tmp_path / "own")
    assert digests == {digest(Loader(ds, 4, 32, seed=SEED))}


@pytest.mark.slow
def test_a_killed_builder_leaves_nothing_that_is_used(docs_and_dir, tmp_path):
    _, path = docs_and_dir
    go = tmp_path / "go"
    go.touch()
    proc = start_worker(path, "die", go)
    assert lines(proc, "DIGEST") == [] and proc.returncode == -9
    folder = path / ".index_cache"
    leftovers = sorted(p.name for p in folder.iterdir())
    assert any(".idx.tmp-" in n for n in leftovers) and any(n.endswith(".lock") for n in leftovers)
    assert not any(n.startswith("epoch-") and n.endswith(".idx") for n in leftovers)
    want = digest(Loader(open_dataset(path, index_cache=tmp_path / "own"), 4, 32, seed=SEED))
    loader = Loader(open_dataset(path), 4, 32, seed=SEED)
    assert digest(loader) == want
    loader._ahead[1].result()  # internals: epoch 1, prepared in the background, is written
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock")]


@pytest.mark.slow
def test_a_read_only_dataset_folder_keeps_its_index_in_the_user_cache(docs_and_dir, tmp_path):
    _, built = docs_and_dir
    path = tmp_path / "readonly"
    shutil.copytree(built, path, ignore=shutil.ignore_patterns(".index_cache"))
    for p in [path, *path.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    # Root writes through permission bits: drop that capability for the worker.
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    user_cache = tmp_path / "user-cache"
    go = tmp_path / "go"
    go.touch()
    proc = start_worker(
        path, "plain", go, prefix if os.geteuid() == 0 else (), {"XDG_CACHE_HOME": str(user_cache)}
    )
    got = lines(proc, "DIGEST")
    path.chmod(0o755)
    ds = open_dataset(built, index_cache=tmp_path / "own")
    assert got == [digest(Loader(ds, 4, 32, seed=SEED))]
    assert not (path / ".index_cache").exists()
    folder = user_cache / "lowmem-pipeline" / "index" / ds.fingerprint
    assert (folder / f"docs-{ds.fingerprint}.idx").is_file()


def test_the_cost_model_counts_the_shared_files_once_per_node(docs_and_dir):
    from lowmem_core.memory import HostMemory
    from trainer_low_mem.planner import ModelMemory, plan

    _, path = docs_and_dir
    ds = open_dataset(path)
    loader = Loader(ds, 4, 32, seed=SEED)
    digest(loader)
    loader._ahead[1].result()  # internals: epochs 0 and 1 and the offsets are on disk
    files = index_cache.index_files_bytes(ds.index_folder)
    # Each of the five arrays starts on a 4 KiB page after a 4 KiB header per file.
    assert 0 <= files - ds.shared_index_bytes <= 3 * 4096 + 5 * 4096
    gib = 1 << 30
    kwargs = dict(
        global_batch=48,
        seq_len=512,
        world_size=3,
        model=ModelMemory(param_count=10**8, activation_bytes_per_token=10**5, d_model=768),
        device_budget_bytes=20 * gib,
        device="cuda",
        num_cores=16,
        host=HostMemory(256 * gib, 200 * gib, None, None, None),
    )
    without, with_index = plan(**kwargs), plan(**kwargs, index_bytes=ds.shared_index_bytes)
    assert with_index.host_bytes_planned - without.host_bytes_planned == ds.shared_index_bytes
    assert "epoch index (shared, page cache)" in with_index.reasons["host_bytes_planned"].text


def test_user_cache_folders_no_dataset_opened_for_30_days_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(index_cache.ENV_VAR, raising=False)
    dataset = tmp_path / "ds"  # a folder that cannot be written, as a read-only dataset's
    writable = index_cache._writable
    monkeypatch.setattr(index_cache, "_writable", lambda f: f.parent != dataset and writable(f))
    root = tmp_path / "cache" / "lowmem-pipeline" / "index"
    for name, days in (("gone", 31), ("idle", 29), ("fp", 40)):
        (root / name).mkdir(parents=True)
        (root / name / "docs.idx").write_bytes(b"x")
        then = time.time() - days * 24 * 3600
        os.utime(root / name, (then, then))
    assert index_cache.cache_folder(dataset, "fp") == root / "fp"
    # The folder opened now is marked used and kept, with its files; the one unused for 31 days
    # is gone, the one unused for 29 stays.
    assert sorted(p.name for p in root.iterdir()) == ["fp", "idle"]
    assert (root / "fp" / "docs.idx").is_file()
    assert time.time() - (root / "fp").stat().st_mtime < 3600
    # A folder removed under a running job is made again when the job needs a new file.
    shutil.rmtree(root / "fp")
    arrays, _, built = index_cache.open_or_build(
        root / "fp" / "x.idx", {"k": 1}, [("a", np.dtype(np.int64), 3)], lambda a: {}
    )
    assert built and arrays["a"].shape == (3,)
