"""`bench.pairs_speed`: both sides train on the same pairs and label the same tokens; the packed
side's useful-token shares are the epoch layout's."""

from __future__ import annotations

import pytest

from pipeline import open_dataset
from pipeline.pair_layout import pair_row_lens
from pipeline.pairs import PairLoader

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def test_both_sides_label_the_same_tokens_and_report_padding(tmp_path):
    from bench.pairs_speed import compare

    packed, padded = compare(tmp_path, num_pairs=24, max_len=64, rows=2, batch_pairs=4, repeats=1)
    assert (packed["side"], padded["side"]) == ("packed PairLoader", "DataCollatorForSeq2Seq")
    assert (packed["task"], packed["batch"], padded["batch"]) == ("qa", 2, 4)
    assert packed["label_tokens"] == padded["label_tokens"] > 0
    ds = open_dataset(tmp_path / "pairs-qa-24")
    index = PairLoader(ds, 2, *pair_row_lens(ds, 64), start_id=0).index
    enc_pad, dec_pad = index.padding_pct()
    # Whole steps: the last one's missing rows are padding too.
    rows = packed["steps"] * 2
    assert packed["enc_useful_frac"] == index.enc_tokens / (rows * index.enc_len)
    assert packed["dec_useful_frac"] == index.dec_tokens / (rows * index.dec_len)
    assert index.dec_tokens == packed["label_tokens"]
    assert 0 < padded["enc_useful_frac"] <= 1 and 0 < padded["dec_useful_frac"] <= 1
    assert enc_pad >= 0 and dec_pad >= 0


def test_packed_rows_default_to_the_pairs_of_a_padded_batch(tmp_path):
    from bench.pairs_speed import compare, prepare, rows_for

    packed, padded = compare(
        tmp_path, num_pairs=40, max_len=64, rows=None, batch_pairs=4, repeats=1, task="summarise"
    )
    _, data = prepare(tmp_path, 40, task="summarise")
    ds = open_dataset(data)
    total_rows = PairLoader(ds, 1, *pair_row_lens(ds, 64), start_id=0).index.total_rows
    assert packed["batch"] == rows_for(data, 64, 4) == max(1, round(4 * total_rows / 40))
    assert packed["task"] == padded["task"] == "summarise"
    assert packed["label_tokens"] == padded["label_tokens"] > 0
