"""Which batches a model takes: `TokenRows` (decoder-only) or `PairRows` (encoder-decoder pairs).

A model kind (trainer_low_mem/models/) chooses its spec once, from the dataset; the data side
asks the spec for its loaders and the planner for example batches of the same shapes, so neither
tests the model's type nor pushes row lengths into the model.

    TokenRows  input_ids, position_ids, labels            int64 [B, seq_len]; labels unshifted
    PairRows   input_ids, position_ids                    int64 [B, enc_len]
               decoder_input_ids, decoder_position_ids,   int64 [B, dec_len]; labels aligned with
               labels                                     the decoder positions (already shifted)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.loader import Loader
from pipeline.loader import saved_layout as saved_token_layout
from pipeline.pair_layout import PACK_WINDOW, pair_row_lens
from pipeline.pairs import PairLoader, saved_layout


@dataclass(frozen=True)
class TokenRows:
    """Rows of `seq_len` tokens, documents packed (or padded) into them."""

    seq_len: int
    packing: bool = True
    layout: str | None = None  # None: the loader's default for the data and packing
    labels_shifted = False  # the model shifts labels: position t is scored on labels[t + 1]

    @classmethod
    def for_dataset(
        cls, dataset, seq_len: int, packing: bool, saved: dict[str, Any] | None = None
    ) -> TokenRows:
        """Rows of `seq_len`; a resumed run keeps the layout its loader state was saved on, so
        the schedule is sized on the rows the run will really see."""
        if saved is None or saved.get("packing", packing) != packing:
            return cls(seq_len, packing)  # a mismatched state is refused by the loader itself
        return cls(seq_len, packing, saved_token_layout(saved, dataset))

    def loader(self, dataset, batch_size: int, *, rank: int, world_size: int, seed: int):
        return Loader(
            dataset,
            batch_size=batch_size,
            seq_len=self.seq_len,
            rank=rank,
            world_size=world_size,
            seed=seed,
            packing=self.packing,
            layout=self.layout,
        )

    def example(self, micro_batch: int, device: str | torch.device) -> dict[str, torch.Tensor]:
        """A batch of the loader's shapes and dtypes (token id 0 is valid in any vocabulary;
        memory does not depend on the values)."""
        ids = torch.zeros((micro_batch, self.seq_len), dtype=torch.int64, device=device)
        positions = torch.arange(self.seq_len, device=device).repeat(micro_batch, 1)
        return {"input_ids": ids, "position_ids": positions, "labels": torch.zeros_like(ids)}

    def summary(self, loader: Loader, dataset) -> str:
        """One line on the layout, for the start-up log."""
        if dataset.prompt_lengths is None:
            return "data: plain text, loss on every token"
        layout = "whole samples packed into rows" if self.packing else "one sample per row"
        return (
            f"data: {len(dataset):,} prompt/response samples, {layout}, loss on the "
            f"responses; {loader.split_samples:,} longer than --max_seq_len "
            f"{self.seq_len} continue across rows"
        )


@dataclass(frozen=True)
class PairRows:
    """Prompt/response pairs packed first-fit into encoder rows of `enc_len` and decoder rows of
    `dec_len` tokens; the decoder starts at `start_id`."""

    enc_len: int
    dec_len: int
    start_id: int
    pack_window: int = PACK_WINDOW
    labels_shifted = True

    @classmethod
    def for_dataset(
        cls, dataset, max_len: int, start_id: int, saved: dict[str, Any] | None = None
    ) -> PairRows:
        """The layout of `dataset` in rows of at most `max_len`; a resumed run keeps the row
        lengths and packing window its state was laid out with (an older release may have
        chosen them otherwise), so it continues its own order, plan and step count. Without a
        dataset (a plan from flags alone) both rows are `max_len`."""
        if dataset is None:
            return cls(max_len, max_len, start_id)
        if saved is not None and "enc_len" in saved and "dec_len" in saved:
            enc_len, dec_len, window = saved_layout(saved)
            return cls(enc_len, dec_len, start_id, window)
        return cls(*pair_row_lens(dataset, max_len), start_id)

    def loader(self, dataset, batch_size: int, *, rank: int, world_size: int, seed: int):
        return PairLoader(
            dataset,
            batch_size,
            self.enc_len,
            self.dec_len,
            start_id=self.start_id,
            rank=rank,
            world_size=world_size,
            seed=seed,
            pack_window=self.pack_window,
        )

    def example(self, micro_batch: int, device: str | torch.device) -> dict[str, torch.Tensor]:
        """A batch of the loader's shapes and dtypes, each row one pair."""

        def side(length: int) -> tuple[torch.Tensor, torch.Tensor]:
            ids = torch.zeros((micro_batch, length), dtype=torch.int64, device=device)
            return ids, torch.arange(length, device=device).repeat(micro_batch, 1)

        enc_ids, enc_pos = side(self.enc_len)
        dec_ids, dec_pos = side(self.dec_len)
        return {
            "input_ids": enc_ids,
            "position_ids": enc_pos,
            "decoder_input_ids": dec_ids,
            "decoder_position_ids": dec_pos,
            "labels": torch.zeros_like(dec_ids),
        }

    def summary(self, loader: PairLoader, dataset) -> str:
        """One line on the layout, for the start-up log."""
        enc_pad, dec_pad = loader.index.padding_pct()
        return (
            f"data: {len(dataset):,} prompt/response pairs packed by tokens into "
            f"encoder rows of {self.enc_len} and decoder rows of {self.dec_len}; padding "
            f"{enc_pad:.1f}% encoder, {dec_pad:.1f}% decoder; truncated to fit them (a pair "
            f"cannot continue across rows): {loader.index.cut_prompts:,} of {len(dataset):,} "
            f"prompts, {loader.index.cut_responses:,} of {len(dataset):,} responses"
        )


BatchSpec = TokenRows | PairRows
