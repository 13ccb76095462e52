"""`open_dataset`: zero-copy views in mmap mode, identical reads in ultra-low-mem mode, and one
clear error for every way a dataset on disk can be broken."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import PipelineError, open_dataset


def test_documents_read_back_exactly_in_both_modes(make_dataset, synthetic_token_docs):
    path = make_dataset(num_docs=120, seed=2, median_len=25)
    docs = synthetic_token_docs(120, 2, 25, 256)
    mmap, ultra = open_dataset(path), open_dataset(path, ultra_low_mem=True)
    assert len(mmap) == len(ultra) == 120
    assert mmap.num_tokens == ultra.num_tokens == sum(len(d) for d in docs)
    for i, doc in enumerate(docs):
        assert np.array_equal(mmap[i], doc) and np.array_equal(ultra[i], doc)
    assert np.array_equal(mmap[-1], docs[-1])
    with pytest.raises(IndexError):
        mmap[120]


def test_mmap_reads_are_views_and_ultra_low_mem_holds_no_mapping(make_dataset):
    path = make_dataset(num_docs=60, seed=3, median_len=20)
    shards = [str(f) for f in path.iterdir() if f.suffix == ".arrow"]

    def mapped() -> bool:
        maps = Path(f"/proc/{os.getpid()}/maps").read_text()
        return any(shard in maps for shard in shards)

    ultra = open_dataset(path, ultra_low_mem=True)
    assert shards and not mapped()
    assert ultra[3].flags.writeable  # a fresh array read from the file, not a view
    mmap = open_dataset(path)
    assert mapped()
    assert not mmap[3].flags.owndata and not mmap[3].flags.writeable
    assert np.array_equal(ultra[3], mmap[3])
    mmap.close()
    ultra.close()
    with pytest.raises(PipelineError, match="is closed; reopen it"):
        mmap[3]


def test_datasets_folder_with_token_column_opens_directly(tmp_path, synthetic_token_docs):
    import datasets

    docs = synthetic_token_docs(50, 4, 20, 256)
    datasets.Dataset.from_dict(
        {"input_ids": [d.tolist() for d in docs], "id": list(range(50))}
    ).save_to_disk(str(tmp_path / "hf"))
    for ultra in (False, True):
        ds = open_dataset(tmp_path / "hf", ultra_low_mem=ultra)
        assert len(ds) == 50 and ds.eos_id == max(int(d.max()) for d in docs) + 1
        assert all(np.array_equal(ds[i], d) for i, d in enumerate(docs))


def test_datasets_folder_without_token_column_says_how_to_build(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(PipelineError, match="has no token-id column .*python -m pipeline build"):
        open_dataset(tmp_path / "hf")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _shard(path):
    return path / "shard-00000.arrow"


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda p: shutil.rmtree(p), "does not exist; build it"),
        (lambda p: (p / "index.json").unlink(), "is not a dataset"),
        (lambda p: (p / "index.json").write_text("{not json"), "index.json: is not valid JSON"),
        (lambda p: _shard(p).unlink(), "lists shard-00000.arrow but it is missing"),
        (lambda p: _shard(p).write_bytes(_shard(p).read_bytes()[:-100]), "truncated or replaced"),
        (
            lambda p: _shard(p).write_bytes(b"\0" * _shard(p).stat().st_size),
            "is not a valid Arrow file",
        ),
        (lambda p: _edit_index(p, dtype="float32"), "dtype must be uint16 or uint32"),
        (lambda p: _edit_index(p, num_documents=5), "not the 5 it states"),
        (lambda p: _edit_index(p, vocab_size=100_000), "does not fit dtype uint16"),
    ],
)
def test_broken_dataset_gives_one_clear_error(tmp_path, sample_dataset_dir, break_it, message):
    path = _copy(sample_dataset_dir, tmp_path / "ds")
    break_it(path)
    with pytest.raises(PipelineError, match=message):
        open_dataset(path)


def _edit_index(path, **changes):
    index = json.loads((path / "index.json").read_text())
    index.update(changes)
    (path / "index.json").write_text(json.dumps(index))


def test_verify_catches_a_flipped_token_byte(tmp_path, sample_dataset_dir):
    path = _copy(sample_dataset_dir, tmp_path / "ds")
    data = bytearray(_shard(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    _shard(path).write_bytes(bytes(data))
    open_dataset(path)  # sizes still match: the cheap open does not read every byte
    with pytest.raises(PipelineError, match="fails its sha256 check"):
        open_dataset(path, verify=True)


def test_a_shard_truncated_under_an_ultra_low_mem_reader_is_a_short_read_naming_it(
    make_dataset,
):
    from pipeline import Loader

    path = make_dataset(200)
    ds = open_dataset(path, ultra_low_mem=True)
    batches = iter(Loader(ds, 4, 32, seed=0))
    next(batches)
    shard = next(path.glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated under the open reader
    with pytest.raises(PipelineError, match=f"short read from {shard}"):
        for _ in batches:
            pass
