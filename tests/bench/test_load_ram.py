"""`bench load`: processes loading one bf16 folder the trainer's way peak at the private host
RAM the planner counts per process (trainer_low_mem/planner/load_memory.py), however many load at
once, and a frozen base kept in its stored dtype (the trainer's bf16 LoRA base among them) shares
the file's pages instead."""

from __future__ import annotations

import pytest

from bench.load_ram import ModelSize, measure, write_model
from trainer_low_mem.planner.load_memory import LOAD_PRIVATE_BYTES_PER_PARAM, load_private_bytes

SMALL = ModelSize(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048)  # 0.13B
# Measured private bytes per process: at least 85% of the planned load term, at most 256 MiB
# above it (code and buffers imported on the first load, which the planner's 1 GiB process base
# covers; a 0.13B model measures 781 MB against 623 MB planned).
LOW_FRAC, HIGH_SLACK_BYTES = 0.85, 256 << 20


def test_the_load_term_is_the_measured_bytes_per_parameter():
    assert LOAD_PRIVATE_BYTES_PER_PARAM == 5
    assert load_private_bytes(1_720_574_976) == 8_602_874_880
    # A base kept in its stored bf16: 1 B per such parameter, 5 per fp32 one (the adapters).
    assert load_private_bytes(1_000_000, 900_000) == 100_000 * 5 + 900_000


@pytest.mark.slow
def test_the_trainers_bf16_lora_load_peaks_at_the_planned_private_bytes(tmp_path):
    folder = tmp_path / "model"
    write_model(folder, SMALL)
    stored = (folder / "model.safetensors").stat().st_size
    for processes in (1, 2):
        reading = measure(folder, "trainer-lora-bf16", processes, 0)
        planned = reading.planned_private_bytes
        assert 0 < reading.mapped_count < reading.param_count
        assert LOW_FRAC * planned <= reading.peak_private_bytes, reading.row()
        assert reading.peak_private_bytes <= planned + HIGH_SLACK_BYTES, reading.row()
        assert reading.peak_private_bytes < stored * 1.5, reading.row()  # no fp32 copy


@pytest.mark.slow
def test_one_and_two_loading_processes_peak_at_the_planned_private_bytes(tmp_path):
    folder = tmp_path / "model"
    params = write_model(folder, SMALL)
    one = measure(folder, "trainer", 1, params)
    two = measure(folder, "trainer", 2, params)
    for reading in (one, two):
        planned = reading.planned_private_bytes
        assert LOW_FRAC * planned <= reading.peak_private_bytes, reading.row()
        assert reading.peak_private_bytes <= planned + HIGH_SLACK_BYTES, reading.row()
    # The second process costs its own private copy, not more.
    assert two.peak_node_pss_bytes < 2 * one.peak_node_pss_bytes * 1.05


@pytest.mark.slow
def test_a_base_kept_in_its_stored_dtype_shares_the_file_pages(tmp_path):
    folder = tmp_path / "model"
    params = write_model(folder, SMALL)
    stored = (folder / "model.safetensors").stat().st_size
    one = measure(folder, "stored-dtype", 1, params)
    two = measure(folder, "stored-dtype", 2, params)
    # A constant (about 90 MiB at 0.13B and at 0.63B parameters), not a copy of the weights.
    assert one.peak_private_bytes < stored / 2
    assert two.peak_private_bytes < stored / 2
    # Both processes map the same pages: the second adds its private bytes, not the file again.
    assert two.peak_node_pss_bytes < one.peak_node_pss_bytes + two.peak_private_bytes + stored / 4
