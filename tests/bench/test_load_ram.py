"""`bench load`: processes loading one bf16 folder the trainer's way peak at the private host
RAM the planner counts per process (trainer_low_mem/planner/load_memory.py), however many load at
once, and a frozen base kept in its stored dtype shares the file's pages instead."""

from __future__ import annotations

import pytest

from bench.load_ram import ModelSize, measure, write_model
from trainer_low_mem.planner.load_memory import LOAD_PRIVATE_BYTES_PER_PARAM, load_private_bytes

# A 0.13B-parameter model: the allocator's share of the peak is relatively smaller at this size
# (4.77 bytes per parameter measured against 5 planned), hence the lower bound.
SMALL = ModelSize(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048)
TOLERANCE = (0.85, 1.05)  # measured / planned private bytes per process


def test_the_load_term_is_the_measured_bytes_per_parameter():
    assert LOAD_PRIVATE_BYTES_PER_PARAM == 5
    assert load_private_bytes(1_720_574_976) == 8_602_874_880


@pytest.mark.slow
def test_one_and_two_loading_processes_peak_at_the_planned_private_bytes(tmp_path):
    folder = tmp_path / "model"
    params = write_model(folder, SMALL)
    one = measure(folder, "trainer", 1, params)
    two = measure(folder, "trainer", 2, params)
    for reading in (one, two):
        assert TOLERANCE[0] <= reading.private_ratio <= TOLERANCE[1], reading.row()
    # The second process costs its own private copy, not more.
    assert two.peak_node_pss_bytes < 2 * one.peak_node_pss_bytes * 1.05


@pytest.mark.slow
def test_a_base_kept_in_its_stored_dtype_shares_the_file_pages(tmp_path):
    folder = tmp_path / "model"
    params = write_model(folder, SMALL)
    stored = (folder / "model.safetensors").stat().st_size
    one = measure(folder, "stored-dtype", 1, params)
    two = measure(folder, "stored-dtype", 2, params)
    assert one.peak_private_bytes < stored / 4
    # Both processes map the same pages: the node holds them about once, not twice.
    assert two.peak_node_pss_bytes < one.peak_node_pss_bytes + stored / 4
