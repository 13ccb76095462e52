"""Atomic writes: a file or folder holds its old content or its new; no temp outlives a write."""

from __future__ import annotations

import os

import pytest

from lowmem_core import durable
from lowmem_core.durable import (
    atomic_file,
    atomic_folder,
    fsync_tree,
    swap_in_folder,
    write_atomic,
)


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _tree(folder) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_write_atomic_writes_bytes_and_text_and_leaves_no_temp(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, b"\x00\x01binary")
    assert path.read_bytes() == b"\x00\x01binary"
    write_atomic(path, '{"step": 3, "name": "é"}')
    assert path.read_bytes() == '{"step": 3, "name": "é"}'.encode()
    assert _names(tmp_path) == ["state.json"]


def test_a_new_file_gets_the_permissions_open_would_give_it(tmp_path):
    write_atomic(tmp_path / "new", b"x")
    (tmp_path / "by_open").write_bytes(b"x")
    assert (tmp_path / "new").stat().st_mode == (tmp_path / "by_open").stat().st_mode


def test_the_file_is_written_under_a_temp_name_beside_the_path(tmp_path):
    path = tmp_path / "docs.idx"
    path.write_bytes(b"old")
    with atomic_file(path) as f:
        f.write(b"new")
        (temp,) = [n for n in _names(tmp_path) if n != "docs.idx"]
        assert temp.startswith("docs.idx.tmp-")  # what a builder's leftover cleanup matches
        assert path.read_bytes() == b"old"  # nothing reaches the path before the block ends
    assert path.read_bytes() == b"new" and _names(tmp_path) == ["docs.idx"]


def test_two_writers_of_one_path_never_share_a_temp(tmp_path):
    path = tmp_path / "cache.json"
    with atomic_file(path) as first, atomic_file(path) as second:
        first.write(b"first")
        second.write(b"second")
        assert len(_names(tmp_path)) == 2
    assert path.read_bytes() == b"first"  # the outer block ends last
    assert _names(tmp_path) == ["cache.json"]


def test_an_exception_mid_write_keeps_the_old_content_and_removes_the_temp(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk gone"), atomic_file(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk gone")
    assert path.read_bytes() == b"old" and _names(tmp_path) == ["manifest.json"]


def test_an_exception_before_anything_exists_leaves_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "x.npz"):
        raise KeyboardInterrupt
    assert _names(tmp_path) == []


def test_a_failed_rename_keeps_the_old_content_and_removes_the_temp(tmp_path, monkeypatch):
    path = tmp_path / "verified.json"
    path.write_bytes(b"old")

    def no_space(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(durable.os, "replace", no_space)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old" and _names(tmp_path) == ["verified.json"]


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", "folder" if os.path.isdir(target) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    monkeypatch.setattr(durable.os, "replace", replace)
    write_atomic(tmp_path / "a.json", b"{}")
    assert events == [("fsync", "file"), ("replace", "a.json"), ("fsync", "folder")]


def test_fsync_tree_fsyncs_every_file_and_folder(tmp_path, monkeypatch):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "empty").mkdir()
    for name in ("a.bin", "sub/b.bin", "sub/deeper/c.bin"):
        (tmp_path / name).write_bytes(b"x")
    synced = []
    monkeypatch.setattr(durable, "fsync_path", lambda p: synced.append(p.relative_to(tmp_path)))
    fsync_tree(tmp_path)
    assert sorted(map(str, synced)) == sorted(
        [".", "a.bin", "sub", "sub/b.bin", "sub/deeper", "sub/deeper/c.bin", "sub/empty"]
    )


def _folder_paths(tmp_path):
    return tmp_path / "final", tmp_path / ".final.tmp", tmp_path / ".final.old"


def test_atomic_folder_swaps_the_filled_folder_in_and_removes_the_old_one(tmp_path):
    path, tmp, aside = _folder_paths(tmp_path)
    path.mkdir()
    (path / "old.bin").write_bytes(b"old")
    with atomic_folder(path, tmp, aside) as folder:
        assert folder == tmp and not (path / "new.bin").exists()
        (folder / "sub").mkdir()
        (folder / "new.bin").write_bytes(b"new")
        (folder / "sub" / "more.bin").write_bytes(b"more")
    assert _tree(path) == {"new.bin": b"new", "sub/more.bin": b"more"}
    assert _names(tmp_path) == ["final"]


def test_atomic_folder_creates_missing_parents_and_a_first_folder(tmp_path):
    path = tmp_path / "run" / "final"
    with atomic_folder(path, tmp_path / "run" / ".final.tmp", tmp_path / "run" / ".old") as f:
        (f / "a").write_bytes(b"a")
    assert _tree(path) == {"a": b"a"} and _names(tmp_path / "run") == ["final"]


def test_an_exception_while_filling_keeps_the_old_folder_and_removes_the_temp(tmp_path):
    path, tmp, aside = _folder_paths(tmp_path)
    path.mkdir()
    (path / "old.bin").write_bytes(b"old")
    with pytest.raises(ValueError, match="bad model"), atomic_folder(path, tmp, aside) as folder:
        (folder / "half.bin").write_bytes(b"half")
        raise ValueError("bad model")
    assert _tree(path) == {"old.bin": b"old"} and _names(tmp_path) == ["final"]


def test_a_failed_swap_puts_the_old_folder_back_and_removes_the_temp(tmp_path, monkeypatch):
    path, tmp, aside = _folder_paths(tmp_path)
    path.mkdir()
    (path / "old.bin").write_bytes(b"old")
    real_rename = os.rename

    def refuse_the_new_folder(src, dst):
        if src == tmp:
            raise OSError(28, "No space left on device", str(dst))
        real_rename(src, dst)

    monkeypatch.setattr(durable.os, "rename", refuse_the_new_folder)
    with pytest.raises(OSError, match="No space left"), atomic_folder(path, tmp, aside) as folder:
        (folder / "new.bin").write_bytes(b"new")
    assert _tree(path) == {"old.bin": b"old"} and _names(tmp_path) == ["final"]


def _record_renames(tmp_path, monkeypatch) -> list:
    """(destination name, folder listing, content of `f` at the aside name) after each rename."""
    seen = []
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        aside = tmp_path / ".final.old" / "f"
        seen.append(
            (os.path.basename(dst), _names(tmp_path), aside.exists() and aside.read_bytes())
        )

    monkeypatch.setattr(durable.os, "rename", rename)
    return seen


def test_the_old_folder_replaces_an_older_aside_and_waits_there_for_the_new(tmp_path, monkeypatch):
    path, tmp, aside = _folder_paths(tmp_path)
    for folder, content in ((path, b"latest"), (aside, b"older"), (tmp, b"new")):
        folder.mkdir()
        (folder / "f").write_bytes(content)
    seen = _record_renames(tmp_path, monkeypatch)
    swap_in_folder(tmp, path, aside)
    assert seen == [
        (".final.old", [".final.old", ".final.tmp"], b"latest"),
        ("final", [".final.old", "final"], b"latest"),
    ]
    assert _tree(path) == {"f": b"new"} and _names(tmp_path) == ["final"]


def test_with_no_folder_at_the_path_the_one_aside_stays_until_the_new_is_in(tmp_path, monkeypatch):
    path, tmp, aside = _folder_paths(tmp_path)
    for folder, content in ((aside, b"last good"), (tmp, b"new")):
        folder.mkdir()
        (folder / "f").write_bytes(content)
    seen = _record_renames(tmp_path, monkeypatch)
    swap_in_folder(tmp, path, aside)
    assert seen == [("final", [".final.old", "final"], b"last good")]
    assert _tree(path) == {"f": b"new"} and _names(tmp_path) == ["final"]
