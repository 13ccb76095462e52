"""Nodes of a job sharing one index folder (a dataset on shared storage): a builder sweeps only
its own host's leftover temporaries, so it never removes a file another node is still writing
where the build lock does not reach across hosts."""

from __future__ import annotations

import numpy as np

from pipeline import index_cache, open_dataset
from pipeline.build import build_dataset
from pipeline.config import BuildConfig
from pipeline.sample_corpus import write_sample_corpus


def test_a_builder_removes_its_hosts_leftovers_and_spares_another_hosts_temporary(tmp_path):
    files = write_sample_corpus(tmp_path / "corpus", num_docs=8)
    path = tmp_path / "tokens"
    build_dataset(BuildConfig(inputs=[files["txt"]], out=path), progress=False)
    expected = open_dataset(path, index_cache=tmp_path / "own")
    docs = f"docs-{expected.fingerprint}.idx"
    folder = path / index_cache.FOLDER_NAME
    folder.mkdir()
    killed_here = folder / f"{docs}.tmp-{index_cache._HOST_TAG}999999-dead"
    killed_here.write_bytes(b"\0" * 4096)
    # Another node's builder, mid-write: its lock did not exclude this host's.
    writing_there = folder / f"{docs}.tmp-othernode-4242-beef"
    writing_there.write_bytes(b"half of the offsets")

    ds = open_dataset(path)

    assert ds.index_folder == folder
    assert not killed_here.exists()
    assert writing_there.read_bytes() == b"half of the offsets"
    assert (folder / docs).is_file()
    np.testing.assert_array_equal(ds.doc_starts, expected.doc_starts)
    # What this host writes carries its tag, so the other node's sweep spares it in turn.
    assert index_cache._HOST_TAG.endswith("-") and "/" not in index_cache._HOST_TAG
