"""The shared index files are verified, not trusted: a damaged, truncated or swapped file is
rebuilt (the batch stream equals a fresh cache's, exactly) or refused in one line where it cannot
be rewritten, and a disk too full for a file is one PipelineError line, never a SIGBUS."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lowmem_core.errors import PipelineError
from pipeline import Loader, index_cache, open_dataset
from pipeline.pair_layout import PairIndex

REPO = Path(__file__).resolve().parents[2]
NUM_DOCS, SEED, MEDIAN, SEQ_LEN = 300, 7, 40, 32
PAGE = 4096  # the header's size; the first array starts there
LE, LD = 48, 32


@pytest.fixture
def dataset(make_dataset) -> Path:
    return make_dataset(num_docs=NUM_DOCS, seed=SEED, median_len=MEDIAN)


@pytest.fixture
def fresh(dataset, tmp_path) -> str:
    """The digest of one pass over a cache built in an empty folder."""
    return stream(open_dataset(dataset, index_cache=tmp_path / "fresh"))


def stream(ds) -> str:
    """sha256 of every batch of one pass, all three tensors; waits for the next epoch's index
    (prepared in the background) so no build outlives the call."""
    loader = Loader(ds, 4, SEQ_LEN, seed=SEED)
    h = hashlib.sha256()
    for batch in loader:
        for tensor in batch.values():
            h.update(tensor.numpy().tobytes())
    if loader._ahead is not None:  # internals: the background build of epoch 1
        loader._ahead[1].result()
    return h.hexdigest()


def epoch_path(ds, epoch: int = 0) -> Path:
    return ds.index_folder / f"epoch-{ds.fingerprint}-s{SEED}-L{SEQ_LEN}-stream-e{epoch}.idx"


def docs_path(ds) -> Path:
    return ds.index_folder / f"docs-{ds.fingerprint}.idx"


def overwrite(path: Path, offset: int, data: bytes) -> None:
    """Change bytes of `path` in place (same inode, as a bad disk or a stray writer would)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read_header(path: Path) -> dict:
    return json.loads(path.read_bytes()[:PAGE].rstrip(b"\0"))


def write_header(path: Path, header: dict) -> None:
    overwrite(path, 0, json.dumps(header).encode().ljust(PAGE, b"\0"))


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- rebuilt


def test_a_zeroed_permutation_is_rebuilt(dataset, fresh):
    ds = open_dataset(dataset)
    assert stream(ds) == fresh
    overwrite(epoch_path(ds), PAGE, bytes(NUM_DOCS * 4))  # (N,) uint32 ids, all 0
    assert stream(open_dataset(dataset)) == fresh
    assert np.array_equal(
        np.fromfile(epoch_path(ds), np.uint32, NUM_DOCS, offset=PAGE),
        index_cache.sampler.epoch_permutation(NUM_DOCS, SEED, 0),
    )


def test_corrupted_document_offsets_are_rebuilt(dataset, fresh):
    ds = open_dataset(dataset)
    want = np.array(ds.doc_starts)
    assert stream(ds) == fresh
    # Offsets 10..19 moved by 5 tokens: still monotone, the first offset still 0.
    bad = want[10:20] + 5
    overwrite(docs_path(ds), PAGE + 10 * 8, bad.tobytes())
    again = open_dataset(dataset)
    assert np.array_equal(again.doc_starts, want)
    assert stream(again) == fresh


@pytest.mark.parametrize("which", ["docs", "epoch"])
def test_a_truncated_file_is_rebuilt(dataset, fresh, which):
    ds = open_dataset(dataset)
    assert stream(ds) == fresh
    path = docs_path(ds) if which == "docs" else epoch_path(ds)
    os.truncate(path, PAGE + 100)
    assert stream(open_dataset(dataset)) == fresh
    assert path.stat().st_size > PAGE + 100


# ----------------------------------------------------------------------------- siblings


def test_another_epochs_arrays_under_this_epochs_header_are_rebuilt(dataset, fresh):
    ds = open_dataset(dataset)
    assert stream(ds) == fresh  # writes epoch 0 and, ahead, epoch 1 (the same sizes)
    body = epoch_path(ds, 1).read_bytes()[PAGE:]
    overwrite(epoch_path(ds, 0), PAGE, body)
    assert stream(open_dataset(dataset)) == fresh


def test_edited_scalars_in_a_header_are_rebuilt(dataset, fresh):
    ds = open_dataset(dataset)
    assert stream(ds) == fresh
    header = read_header(epoch_path(ds))
    header["scalars"]["total_rows"] -= 40  # valid JSON, the same key: 40 rows fewer
    write_header(epoch_path(ds), header)
    assert stream(open_dataset(dataset)) == fresh


def test_a_damaged_pair_layout_is_rebuilt(sft, tmp_path):
    _, prompts, path = sft
    ds = open_dataset(path)
    folder = tmp_path / "pairs"
    args = (ds.fingerprint, ds.doc_starts, prompts, SEED, 0, LE, LD, 16)
    PairIndex.shared(folder, *args)
    file = next(folder.glob("pairs-*-e0.idx"))
    ids = np.fromfile(file, np.uint32, 2, offset=PAGE)
    overwrite(file, PAGE, ids[::-1].tobytes())  # the first two pairs swapped
    shared = PairIndex.shared(folder, *args)
    private = PairIndex.build(ds.doc_starts, prompts, SEED, 0, LE, LD, 16)
    assert np.array_equal(shared.pairs, private.pairs)
    assert np.array_equal(shared.row_starts, private.row_starts)
    assert shared.total_rows == private.total_rows


def test_a_cache_written_before_checksums_is_rebuilt_once(dataset, fresh, monkeypatch):
    ds = open_dataset(dataset)
    assert stream(ds) == fresh
    files = (docs_path(ds), epoch_path(ds, 0), epoch_path(ds, 1))
    for path in files:
        header = read_header(path)
        write_header(path, {k: header[k] for k in ("magic", "key", "scalars")})
    writes = []
    real = index_cache._write
    monkeypatch.setattr(index_cache, "_write", lambda p, *a: writes.append(p.name) or real(p, *a))
    assert stream(open_dataset(dataset)) == fresh
    assert sorted(writes) == [p.name for p in files]
    writes.clear()
    assert stream(open_dataset(dataset)) == fresh and writes == []


# ----------------------------------------------------------------------------- refused


def refuse_replacing(monkeypatch, folder: Path) -> None:
    """Renames into `folder` fail as in a shared sticky folder whose files another user owns."""
    real = os.replace

    def replace(src, dst, **kwargs):
        if Path(dst).parent == folder:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src), str(dst))
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_a_damaged_file_that_cannot_be_rewritten_is_refused_in_one_line(
    dataset, fresh, monkeypatch, damage
):
    ds = open_dataset(dataset)
    assert stream(ds) == fresh
    path = epoch_path(ds)
    if damage == "zeroed":
        overwrite(path, PAGE, bytes(NUM_DOCS * 4))
    else:
        os.truncate(path, PAGE + 100)
    refuse_replacing(monkeypatch, ds.index_folder)
    with pytest.raises(PipelineError) as exc:
        stream(open_dataset(dataset))
    message = one_line(exc)
    assert str(path) in message and f"${index_cache.ENV_VAR}" in message
    assert ("checksum" if damage == "zeroed" else "truncated") in message
    assert not [p for p in ds.index_folder.iterdir() if ".tmp-" in p.name or ".lock" in p.name]


# ----------------------------------------------------------------------------- disk full


def no_space(fd, offset, length):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_when_the_dataset_opens(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    folder = tmp_path / "cache"
    with pytest.raises(PipelineError) as exc:
        open_dataset(dataset, index_cache=folder)
    message = one_line(exc)
    fingerprint = next(folder.iterdir()).name
    needed = PAGE + -(-(NUM_DOCS + 1) * 8 // PAGE) * PAGE
    assert f"{folder / fingerprint}" in message and f"{needed} bytes" in message
    assert f"${index_cache.ENV_VAR}" in message and "free" in message
    assert list((folder / fingerprint).iterdir()) == []  # no temp file, no lock left


def test_a_full_disk_is_one_line_when_an_epoch_index_is_built(dataset, tmp_path, monkeypatch):
    ds = open_dataset(dataset, index_cache=tmp_path / "cache")
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(PipelineError, match=r"no space .* needs \d+ bytes") as exc:
        stream(ds)
    one_line(exc)
    assert [p.name for p in ds.index_folder.iterdir()] == [docs_path(ds).name]


def test_a_file_system_without_fallocate_still_gets_its_files(dataset, fresh, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    assert stream(open_dataset(dataset)) == fresh


_PLAN = r"""
import sys
from pipeline.__main__ import main
sys.exit(main(["plan", "--model_preset", "tiny", "--data", sys.argv[1]]))
"""


@pytest.fixture
def tiny_disk(tmp_path):
    """An 8 KiB tmpfs: room for the lock file's page, not for the offsets file beside it."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the injected-ENOSPC tests "
            "cover the path"
        )
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.slow
def test_a_really_full_disk_makes_plan_say_so_not_die_of_sigbus(dataset, tiny_disk):
    env = {**os.environ, "PYTHONPATH": str(REPO), index_cache.ENV_VAR: str(tiny_disk)}
    proc = subprocess.run(
        [sys.executable, "-c", _PLAN, str(dataset)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # was -7 (SIGBUS), exit 135
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"no space for the index cache in {tiny_disk}/" in errors[0]
    assert f"${index_cache.ENV_VAR}" in errors[0]
