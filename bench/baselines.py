"""The baselines `bench throughput` measures this project's loader against, and their input files.

Each baseline is the ordinary, idiomatic use of its library, producing the same kind of output as
our loader: int64 `[B, L]` CPU tensors `input_ids`, `labels` (-100 at padding) and
`position_ids`. Their inputs (a `datasets` save_to_disk folder, a Parquet file, a flat uint16
token file) are written once from the very same documents, outside any timing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lowmem_core.errors import PipelineError, require_extra
from lowmem_core.format import IGNORE_INDEX

# ----------------------------------------------------------------------------- input files


@dataclass(frozen=True)
class BaselineFiles:
    """The same documents in the formats the baselines read."""

    hf_dir: Path  # `datasets` save_to_disk folder, column input_ids: list<int32>
    parquet_path: Path  # Parquet file, column input_ids: list<int32>
    flat_tokens_path: (
        Path  # nanoGPT-style: all documents back to back, each followed by EOS, uint16
    )
    pad_id: int
    eos_id: int


def document_tokens(ds) -> tuple[np.ndarray, np.ndarray]:
    """All token values of an mmap-mode dataset back to back, and the (N+1,) document offsets."""
    if ds.ultra_low_mem:
        raise PipelineError(
            "document_tokens needs the dataset opened in mmap mode; open it with "
            "ultra_low_mem=False"
        )
    values = ds.read_tokens(0, ds.num_tokens)
    return values, np.asarray(ds.doc_starts, dtype=np.int64)


def write_baseline_files(ds, out_dir: Path) -> BaselineFiles:
    """Write the baselines' inputs for dataset `ds` (mmap mode) into `out_dir`."""
    datasets = require_extra("datasets", "bench", "the Hugging Face `datasets` baseline")

    values, doc_starts = document_tokens(ds)
    if values.size >= 2**31 - 1:
        raise PipelineError(
            f"the dataset has {values.size} tokens, more than a Parquet/`datasets` list column "
            "with 32-bit offsets holds; benchmark the baselines on a smaller corpus "
            "(--synthetic N)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # int32 ids: what `datasets.map` with a Hugging Face tokenizer stores for input_ids.
    input_ids = pa.ListArray.from_arrays(
        pa.array(doc_starts.astype(np.int32)), pa.array(values.astype(np.int32))
    )
    table = pa.table({"input_ids": input_ids})

    parquet_path = out_dir / "tokens.parquet"
    pq.write_table(table, parquet_path)

    hf_dir = out_dir / "hf_dataset"
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the benchmark's own bar is the one to watch
    try:
        datasets.Dataset(datasets.table.InMemoryTable(table)).save_to_disk(str(hf_dir))
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()

    flat_tokens_path = out_dir / "tokens_uint16.bin"
    if ds.vocab_size > 2**16:
        raise PipelineError(
            f"the nanoGPT baseline stores uint16 tokens; this vocabulary has {ds.vocab_size} ids"
        )
    lengths = np.diff(doc_starts)
    # Each document followed by its EOS, as nanoGPT's prepare scripts write train.bin.
    flat = np.empty(values.size + lengths.size, dtype=np.uint16)
    eos_positions = doc_starts[1:] + np.arange(lengths.size)
    is_eos = np.zeros(flat.size, dtype=bool)
    is_eos[eos_positions] = True
    flat[is_eos] = ds.eos_id
    flat[~is_eos] = values
    flat.tofile(flat_tokens_path)
    return BaselineFiles(hf_dir, parquet_path, flat_tokens_path, pad_id=ds.pad_id, eos_id=ds.eos_id)


# ----------------------------------------------------------------------------- collate


class PadCollate:
    """The usual padding collate: each document truncated to L - 1, then EOS, right-padded, -100
    labels at pads (our padding layout also ends each document with EOS, so a model learns to
    stop).

    Written the way most training scripts write it (a Python loop over the B items), producing
    int64 `[B, L]` tensors like our loader's.
    """

    def __init__(self, seq_len: int, pad_id: int, eos_id: int):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.eos_id = eos_id

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        batch_size = len(items)
        input_ids = torch.full((batch_size, self.seq_len), self.pad_id, dtype=torch.int64)
        labels = torch.full((batch_size, self.seq_len), IGNORE_INDEX, dtype=torch.int64)
        for row, item in enumerate(items):
            ids = item["input_ids"] if isinstance(item, dict) else item
            ids = torch.as_tensor(ids[: self.seq_len - 1], dtype=torch.int64)
            n = ids.numel()
            input_ids[row, :n] = ids
            input_ids[row, n] = self.eos_id
            labels[row, : n + 1] = input_ids[row, : n + 1]
        position_ids = (
            torch.arange(self.seq_len, dtype=torch.int64).expand(batch_size, -1).contiguous()
        )
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


# ----------------------------------------------------------------------------- Hugging Face


def hf_dataloader(
    files: BaselineFiles,
    batch_size: int,
    seq_len: int,
    num_workers: int,
    pin_memory: bool,
    seed: int,
) -> torch.utils.data.DataLoader:
    """Hugging Face `datasets`: load_from_disk + set_format("torch"), a shuffling torch DataLoader.

    The standard recipe of HF training scripts: the Arrow folder is memory-mapped by `datasets`,
    each item is converted to a torch tensor by its formatter, and a padding collate builds the
    batch.
    """
    datasets = require_extra("datasets", "bench", "the Hugging Face `datasets` baseline")

    ds = datasets.load_from_disk(str(files.hf_dir))
    ds.set_format("torch", columns=["input_ids"])
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=PadCollate(seq_len, files.pad_id, files.eos_id),
        persistent_workers=num_workers > 0,
    )


# ----------------------------------------------------------------------------- nanoGPT


class NanoGPTBlocks:
    """nanoGPT's `get_batch`: random offsets into a flat uint16 np.memmap, x/y shifted by one.

    As nanoGPT does, the memmap is re-created for every batch (it avoids a memory leak there), B
    random offsets are drawn with torch.randint, and each block is cast to int64 and stacked.
    `labels` is y (the next tokens) and every token is useful; position ids are 0..L-1.
    """

    def __init__(self, flat_tokens_path: Path, batch_size: int, seq_len: int, seed: int):
        self.path = Path(flat_tokens_path)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.num_tokens = self.path.stat().st_size // np.dtype(np.uint16).itemsize
        if self.num_tokens <= seq_len + 1:
            raise PipelineError(
                f"{self.path} holds {self.num_tokens} tokens; the nanoGPT loader needs more "
                "than L + 1"
            )
        self.generator = torch.Generator().manual_seed(seed)
        self.last_offsets: torch.Tensor | None = None

    def get_batch(self) -> dict[str, torch.Tensor]:
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - self.seq_len, (self.batch_size,), generator=self.generator)
        x = torch.stack([torch.from_numpy(data[i : i + self.seq_len].astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy(data[i + 1 : i + 1 + self.seq_len].astype(np.int64)) for i in ix]
        )
        self.last_offsets = ix
        position_ids = (
            torch.arange(self.seq_len, dtype=torch.int64).expand(self.batch_size, -1).contiguous()
        )
        return {"input_ids": x, "labels": y, "position_ids": position_ids}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.get_batch()


# ----------------------------------------------------------------------------- reference low-mem


class ParquetSliceDataset(torch.utils.data.Dataset):
    """The reference low-memory implementation's access pattern: pq.read_table once, slice per item.

    The whole table is read into Arrow memory at construction; each item slices one row out of it
    and converts it to Python and then to a tensor.
    """

    def __init__(self, parquet_path: Path):
        self.table = pq.read_table(parquet_path, columns=["input_ids"])

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> torch.Tensor:
        row = self.table.slice(int(index), 1).column("input_ids")[0].as_py()
        return torch.tensor(row, dtype=torch.int64)


class ParquetRereadDataset(torch.utils.data.Dataset):
    """The reference implementation's "ultra" low-memory mode: re-read the whole Parquet per item.

    Nothing stays in memory between items: every __getitem__ calls pq.read_table on the file and
    slices the one row it needs, so its cost grows with the file, not with the item.
    """

    def __init__(self, parquet_path: Path):
        self.parquet_path = Path(parquet_path)
        self.num_rows = pq.ParquetFile(self.parquet_path).metadata.num_rows

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> torch.Tensor:
        table = pq.read_table(self.parquet_path, columns=["input_ids"])
        row = table.slice(int(index), 1).column("input_ids")[0].as_py()
        return torch.tensor(row, dtype=torch.int64)


def reference_dataloader(
    files: BaselineFiles, batch_size: int, seq_len: int, seed: int
) -> torch.utils.data.DataLoader:
    """A shuffling DataLoader (num_workers=0) over `ParquetSliceDataset` with the padding
    collate."""
    return torch.utils.data.DataLoader(
        ParquetSliceDataset(files.parquet_path),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=PadCollate(seq_len, files.pad_id, files.eos_id),
    )


# ----------------------------------------------------------------------------- memcpy bound


class MemcpyBound:
    """The copy bound: B*L uint16 tokens, read sequentially from the flat token file, cast to int64.

    One `np.copyto` per batch into a preallocated int64 `[B, L]` tensor: the least work any loader
    producing int64 token tensors from a uint16 store must do, so no loader can beat it by much.
    """

    def __init__(self, flat_tokens_path: Path, batch_size: int, seq_len: int):
        self.source = np.memmap(flat_tokens_path, dtype=np.uint16, mode="r")
        self.tokens_per_batch = batch_size * seq_len
        if self.source.size < self.tokens_per_batch:
            raise PipelineError(
                f"{flat_tokens_path} holds {self.source.size} tokens, fewer than one batch of "
                f"{self.tokens_per_batch}"
            )
        self.out = torch.empty((batch_size, seq_len), dtype=torch.int64)
        self._flat_out = self.out.numpy().reshape(-1)
        self._offset = 0

    def next_batch(self) -> torch.Tensor:
        if self._offset + self.tokens_per_batch > self.source.size:
            self._offset = 0
        np.copyto(
            self._flat_out,
            self.source[self._offset : self._offset + self.tokens_per_batch],
            casting="unsafe",
        )
        self._offset += self.tokens_per_batch
        return self.out
