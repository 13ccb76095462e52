"""The log line: training throughput over training time only, label tokens/s, padding share, and
one ETA that the progress bar shows too."""

from __future__ import annotations

import re
import time

import pytest
import torch

from trainer_low_mem.distributed import RankContext
from trainer_low_mem.metrics import Metrics, batch_positions

PAD = 0
L = 8


def token_rows(pad_per_row: list[int]) -> dict[str, torch.Tensor]:
    """[B, L] rows as the loader fills them: tokens, then pad id at position 0 with label -100."""
    ids = torch.full((len(pad_per_row), L), 7, dtype=torch.int64)
    positions = torch.arange(L).repeat(len(pad_per_row), 1)
    labels = ids.clone()
    for row, pad in enumerate(pad_per_row):
        if pad:
            ids[row, L - pad :], positions[row, L - pad :], labels[row, L - pad :] = PAD, 0, -100
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def pair_rows(enc_pad: int, dec_pad: int) -> dict[str, torch.Tensor]:
    """One encoder row and one decoder row of L positions, padding at position -1."""

    def side(pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, pos = torch.full((1, L), 7), torch.arange(L).repeat(1, 1)
        ids[0, L - pad :], pos[0, L - pad :] = PAD, -1
        return ids, pos

    enc_ids, enc_pos = side(enc_pad)
    dec_ids, dec_pos = side(dec_pad)
    return {
        "input_ids": enc_ids,
        "position_ids": enc_pos,
        "decoder_input_ids": dec_ids,
        "decoder_position_ids": dec_pos,
        "labels": torch.where(dec_pos < 0, -100, dec_ids),
    }


def test_a_document_start_holding_the_pad_id_mid_row_is_not_padding():
    batch = token_rows([0])
    batch["input_ids"][0, 3], batch["position_ids"][0, 3] = PAD, 0  # a token, not padding
    positions, padding = batch_positions(batch, PAD)
    assert (positions, int(padding)) == (L, 0)


@pytest.mark.parametrize(
    "batch, positions, padding",
    [
        (token_rows([0, 2, 8]), 3 * L, 10),  # decoder-only rows (text or sft)
        (pair_rows(enc_pad=3, dec_pad=5), 2 * L, 8),  # encoder and decoder rows
    ],
    ids=["token rows", "pairs"],
)
def test_positions_and_padding_are_counted_for_every_data_kind(batch, positions, padding):
    counted, pad = batch_positions(batch, PAD)
    assert (counted, int(pad)) == (positions, padding)


class _Clock:
    def __init__(self, monkeypatch):
        self.now = 1000.0
        monkeypatch.setattr(time, "perf_counter", lambda: self.now)


def _metrics() -> Metrics:
    return Metrics(
        RankContext.single(), None, wait_s_total=lambda: 0.0, use_trackers=False, pad_id=PAD
    )


def _step(metrics: Metrics, batch, label_tokens: int, step_s: float) -> None:
    metrics.count_batches([batch])
    metrics.add_step(torch.tensor(1.0), label_tokens, step_s, step_s / 2)


def _figures(line: str) -> dict[str, str]:
    return dict(re.findall(r"([a-z][a-z /-]*): ([^,]+)", line))


def test_throughput_is_over_training_time_only_and_names_its_unit(monkeypatch):
    clock = _Clock(monkeypatch)
    metrics = _metrics()
    metrics.progress_bar(total_steps=10, initial_step=0, enabled=False)
    batch = token_rows([0, 4])  # 16 positions, 4 of them padding, 10 label tokens
    for _ in range(2):
        clock.now += 2.0
        _step(metrics, batch, label_tokens=10, step_s=2.0)
    clock.now += 60.0  # an eval and a save inside the window: not training time
    metrics.count_batches([batch])  # read again by an out-of-memory retry: counted once
    clock.now += 2.0
    _step(metrics, batch, label_tokens=10, step_s=2.0)
    figures = _figures(metrics.log(3, 10, 1 << 30, 1e-3))
    assert figures["train tokens/s"] == "8"  # 3 x 16 positions / 6 s of steps
    assert figures["label tokens/s"] == "5"  # 3 x 10 / 6 s
    assert figures["padding"] == "25.0%"
    assert figures["useful positions/row"] == "6.0"  # (16 - 4) positions / 2 rows
    assert figures["label tokens/row"] == "5.0"  # 3 x 10 / (3 x 2 rows)
    assert "tokens/s" not in figures


def test_the_log_line_and_the_progress_bar_show_one_eta(monkeypatch, capsys):
    clock = _Clock(monkeypatch)
    metrics = _metrics()
    bar = metrics.progress_bar(total_steps=100, initial_step=40, enabled=True)
    for _ in range(10):  # 10 steps in 50 s (evals and saves included): 5 s per step
        clock.now += 5.0
        _step(metrics, token_rows([0]), label_tokens=8, step_s=1.0)
    line = metrics.log(50, 100, 1 << 30, 1e-3)
    bar.close()
    assert _figures(line)["eta"] == "0:04:10"  # 50 steps left x 5 s
    shown = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert re.search(r" 50/100 \[\d\d:\d\d, eta 0:04:10\]$", shown), shown
