"""`bench sizing`: the sizing table comes from `plan` itself for every model, method and machine,
and what it says holds: the global batch is kept, rows marked as fitting fit the machine's host
RAM, and the users' known cases land where they must."""

from __future__ import annotations

import pytest

from bench import sizing
from bench.sizing import BEGIN, END, MACHINES, METHODS, MODEL_CONFIGS, PRESETS, size_all
from lowmem_core.errors import ConfigError


def _check_rows(rows, models):
    assert {(r.model, r.method, r.machine.name) for r in rows} == {
        (m, method, machine.name) for m in models for method in METHODS for machine in MACHINES
    }
    for row in rows:
        assert row.published.startswith("LLaMA-Factory")
        if not row.fits:
            assert row.note, row
            continue
        m = row.machine
        assert row.micro * row.accum * m.gpus == sizing.global_batch(m)
        assert row.device_peak_bytes <= m.gpu_bytes, row
        assert row.host_node_bytes <= m.host_bytes, row
        assert row.host_per_process_bytes * m.gpus <= row.host_node_bytes, row


@pytest.fixture(scope="module")
def preset_rows():
    return size_all(("small",))


def test_the_small_preset_rows_keep_the_batch_and_fit_the_host(preset_rows):
    _check_rows(preset_rows, ("small",))
    fitting = {(r.method, r.machine.name) for r in preset_rows if r.fits}
    assert {("full", m.name) for m in MACHINES} <= fitting
    assert {("lora", m.name) for m in MACHINES} <= fitting


def test_the_global_batch_is_rounded_up_to_the_gpus():
    assert [sizing.global_batch(m) for m in MACHINES] == [16, 16, 18]


def test_the_published_full_figure_is_deepspeeds_estimate():
    row = sizing.Row("x", "full", MACHINES[2], fits=True, launch="DDP, adamw", params=7 * 10**9)
    sizing.add_published(row)
    host, gpu = sizing.deepspeed_zero2_bytes(7 * 10**9, 3, offload=False)
    assert f"{gpu / sizing.GiB:.1f} GiB/GPU" in row.published
    assert "LLaMA-Factory Full (bf16 AMP, 32-bit): 120.0 GB" in row.published


def test_the_table_goes_between_the_markers_and_the_prose_stays(tmp_path):
    doc = tmp_path / "SIZING.md"
    doc.write_text(f"# Sizing\n\nprose\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    sizing.write_into(doc, "| new |")
    assert doc.read_text() == f"# Sizing\n\nprose\n\n{BEGIN}\n| new |\n{END}\n\nafter\n"
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(ConfigError, match="markers"):
        sizing.write_into(tmp_path / "bare.md", "| new |")


@pytest.mark.slow
@pytest.mark.timeout(2700)  # 63 plans, a 7B trace in about a dozen of them: 10-25 min on 2 cores
def test_the_whole_table_says_what_the_users_found():
    models = (*MODEL_CONFIGS, *PRESETS)
    rows = size_all()
    _check_rows(rows, models)
    by = {(r.model, r.method, r.machine.name): r for r in rows}
    one_16 = MACHINES[1].name
    full_7b = by[("Qwen1.5-7B", "full", one_16)]
    assert not full_7b.fits or full_7b.launch.startswith("ZeRO-2 offload")
    assert by[("Qwen2.5-0.5B", "lora", MACHINES[0].name)].fits
    # The user: Qwen1.5-7B QLoRA in about 10-12 GB, so on the 12 GB and 16 GB cards;
    # its bf16 LoRA base (14.4 GiB) needs the 20 GB cards.
    for machine in MACHINES:
        assert by[("Qwen1.5-7B", "qlora", machine.name)].fits, machine
    assert by[("Qwen1.5-7B", "lora", MACHINES[2].name)].fits
    assert not by[("Qwen1.5-7B", "lora", one_16)].fits


def test_the_published_zero3_figure_is_deepspeeds_estimate():
    machine = sizing.SHARDED_MACHINE
    row = sizing.Row("x", "full", machine, fits=True, launch="ZeRO-3 offload, adamw", params=3e9)
    sizing.add_sharded_published(row, 300_000_000)
    host, gpu = sizing.deepspeed_zero3_bytes(3e9, 300_000_000, 3, True, False)
    assert row.published == (
        f"DeepSpeed ZeRO-3: {gpu / sizing.GiB:.1f} GiB/GPU, host {host / sizing.GiB:.1f} GiB"
    )
    fsdp = sizing.Row("x", "full", machine, fits=True, launch="FSDP2, adamw", params=3e9)
    sizing.add_sharded_published(fsdp, 300_000_000)
    assert fsdp.published.startswith("none published")


def test_the_sharded_rows_plan_each_launch_on_the_three_20gb_cards():
    flags = {
        launch: sizing.plan_config("x", None, "full", sizing.SHARDED_MACHINE, False, launch)
        for launch in sizing.SHARDED_LAUNCHES
    }
    assert flags["FSDP2"].launch.fsdp and not flags["FSDP2"].launch.offload_params
    assert flags["FSDP2 offload"].launch.offload_params
    zero3 = flags["ZeRO-3 offload+params"].launch
    assert (zero3.zero_stage, zero3.offload_optimizer, zero3.offload_params) == (3, True, True)


@pytest.mark.slow
@pytest.mark.timeout(900)  # 7 plans from two traces (3B and 7B): about 1.5 min on 2 cores
def test_the_sharded_rows_say_what_three_20gb_cards_hold():
    rows = sizing.sharded_rows()
    assert len(rows) == sum(len(launches) for _, _, launches in sizing.SHARDED_ROWS)
    by = {(r.model, r.launch.split(",")[0]): r for r in rows}
    for row in rows:
        assert row.note.startswith("no plan fits") if not row.fits else not row.note, row
        if row.fits:
            m = row.machine
            assert row.micro * row.accum * m.gpus == sizing.global_batch(m)
            assert row.device_peak_bytes <= m.gpu_bytes and row.host_node_bytes <= m.host_bytes
    # Full fine-tuning of a 3B model with fp32 AdamW: 16 B/param over three ranks (15.4 GiB)
    # leaves no room on a 20 GB card, and every offload overflows 32 GB of host RAM.
    assert not any(r.fits for r in rows if r.model == "Qwen2.5-3B")
    assert by["Qwen2.5-3B", "FSDP2"].note.startswith("no plan fits (GPU")
    assert by["Qwen2.5-3B", "ZeRO-3"].note.startswith("no plan fits (GPU")
    for launch in ("FSDP2 offload", "ZeRO-3 offload", "ZeRO-3 offload+params"):
        assert by["Qwen2.5-3B", launch].note.startswith("no plan fits (host"), launch
    # A 7B LoRA run's bf16 base (14.4 GiB whole) is a third of that per card when sharded.
    for launch in ("FSDP2", "ZeRO-3"):
        row = by["Qwen1.5-7B", launch]
        assert row.fits and row.terms["weights"] < 5 * sizing.GiB, row
