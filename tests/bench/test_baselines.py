"""Every baseline delivers the right tokens: the same useful-token multiset as our loader on the
same documents, nanoGPT blocks that are contiguous slices of the token file, and an exact copy
bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import baselines
from pipeline import Loader, open_dataset

SEQ_LEN = 1024  # longer than every test document + EOS, so the padding collate truncates nothing


def useful_token_counts(batches, vocab_size: int) -> np.ndarray:
    """Multiset (bincount) of the tokens whose label is not -100, over all batches."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in batches:
        ids = batch["input_ids"][batch["labels"] != baselines.IGNORE_INDEX]
        counts += np.bincount(ids.numpy(), minlength=vocab_size)
    return counts


@pytest.fixture
def corpus(make_dataset, tmp_path):
    path = make_dataset(num_docs=300, seed=3, median_len=60)
    ds = open_dataset(path)
    assert int(ds.doc_lengths.max()) < SEQ_LEN
    files = baselines.write_baseline_files(ds, tmp_path / "baselines")
    yield ds, files
    ds.close()


def test_baseline_files_hold_the_same_documents(corpus):
    import datasets
    import pyarrow.parquet as pq

    ds, files = corpus
    expected = [ds[i].astype(np.int64).tolist() for i in range(len(ds))]
    assert pq.read_table(files.parquet_path).column("input_ids").to_pylist() == expected
    assert datasets.load_from_disk(str(files.hf_dir))["input_ids"] == expected
    flat = np.fromfile(files.flat_tokens_path, dtype=np.uint16)
    assert flat.tolist() == [t for doc in expected for t in doc + [ds.eos_id]]


def test_hf_dataloader_delivers_the_loader_s_tokens(corpus):
    ds, files = corpus
    ours = Loader(ds, batch_size=8, seq_len=SEQ_LEN, seed=0, packing=False)
    hf = baselines.hf_dataloader(
        files, batch_size=8, seq_len=SEQ_LEN, num_workers=0, pin_memory=False, seed=0
    )
    expected = useful_token_counts(ours, ds.vocab_size)
    assert expected.sum() == ds.num_tokens + len(ds)  # every document and its EOS
    np.testing.assert_array_equal(useful_token_counts(hf, ds.vocab_size), expected)


def test_hf_dataloader_batches_have_the_loader_s_layout(corpus):
    ds, files = corpus
    batch = next(
        iter(
            baselines.hf_dataloader(
                files, batch_size=4, seq_len=SEQ_LEN, num_workers=0, pin_memory=False, seed=0
            )
        )
    )
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    for tensor in batch.values():
        assert tensor.shape == (4, SEQ_LEN) and tensor.dtype == torch.int64
    pad = batch["labels"] == baselines.IGNORE_INDEX
    assert torch.equal(batch["input_ids"][pad], torch.full((int(pad.sum()),), ds.pad_id))
    assert torch.equal(batch["labels"][~pad], batch["input_ids"][~pad])


def test_reference_dataloader_delivers_the_loader_s_tokens(corpus):
    ds, files = corpus
    ours = Loader(ds, batch_size=8, seq_len=SEQ_LEN, seed=0, packing=False)
    reference = baselines.reference_dataloader(files, batch_size=8, seq_len=SEQ_LEN, seed=0)
    np.testing.assert_array_equal(
        useful_token_counts(reference, ds.vocab_size), useful_token_counts(ours, ds.vocab_size)
    )


def test_reference_reread_items_are_the_documents(corpus):
    ds, files = corpus
    dataset = baselines.ParquetRereadDataset(files.parquet_path)
    assert len(dataset) == len(ds)
    for index in (0, 17, len(ds) - 1):
        assert dataset[index].tolist() == ds[index].astype(np.int64).tolist()


def test_pad_collate_truncates_ends_with_eos_pads_and_masks():
    collate = baselines.PadCollate(seq_len=4, pad_id=9, eos_id=8)
    batch = collate(
        [{"input_ids": torch.tensor([1, 2])}, {"input_ids": torch.tensor([3, 4, 5, 6, 7])}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 8, 9], [3, 4, 5, 8]]
    assert batch["labels"].tolist() == [[1, 2, 8, -100], [3, 4, 5, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_nanogpt_blocks_are_contiguous_slices_shifted_by_one(corpus):
    _, files = corpus
    flat = np.fromfile(files.flat_tokens_path, dtype=np.uint16).astype(np.int64)
    blocks = baselines.NanoGPTBlocks(files.flat_tokens_path, batch_size=6, seq_len=32, seed=1)
    for _ in range(3):
        batch = blocks.get_batch()
        assert batch["input_ids"].shape == batch["labels"].shape == (6, 32)
        for row, offset in enumerate(blocks.last_offsets.tolist()):
            assert batch["input_ids"][row].tolist() == flat[offset : offset + 32].tolist()
            assert batch["labels"][row].tolist() == flat[offset + 1 : offset + 33].tolist()
        assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])


def test_memcpy_bound_copies_consecutive_token_runs(corpus):
    _, files = corpus
    flat = np.fromfile(files.flat_tokens_path, dtype=np.uint16).astype(np.int64)
    bound = baselines.MemcpyBound(files.flat_tokens_path, batch_size=2, seq_len=16)
    assert bound.next_batch().reshape(-1).tolist() == flat[:32].tolist()
    assert bound.next_batch().reshape(-1).tolist() == flat[32:64].tolist()
    assert bound.out.dtype == torch.int64
