"""The memory levers a plan turns on: 8-bit AdamW states, then activation offload, then both,
only when nothing fits without them; levers the user fixed stay fixed; the advice when nothing
fits names only levers that are off and that the launch accepts."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lowmem_core.errors import ConfigError, MemoryLimitError
from lowmem_core.memory import DEFAULT_HOST_SAFETY_FRAC, format_bytes
from pipeline.cost import BATCH_BYTES_PER_TOKEN
from trainer_low_mem.planner import ModelMemory, Plan, analytic_model_memory
from trainer_low_mem.planner.levers import PLAN_FLAG_LEVERS
from trainer_low_mem.planner.optimizer_states import adamw_8bit_state_bytes

GiB, MB = 1 << 30, 1_000_000
P = 100_000_000
SEQ = 512
# fp32 weights, gradients and AdamW moments: 4 + 4 + 8 bytes per parameter.
ADAMW_STATIC = 16 * P
EIGHT_BIT_STATIC = 8 * P + adamw_8bit_state_bytes([P])
EIGHT_BIT_STATES = format_bytes(adamw_8bit_state_bytes([P]))  # 2 B + 8 B per 256 + the maps


def memory(per_token: int, offload_device: int, offload_host: int) -> ModelMemory:
    return ModelMemory(
        param_count=P,
        activation_bytes_per_token=per_token,
        param_dtype_bytes=4,
        offload_device_bytes_per_token=offload_device,
        offload_host_bytes_per_token=offload_host,
    )


SMALL_ACTIVATIONS = memory(100_000, 20_000, 80_000)  # 51.2 MB per sequence
LARGE_ACTIVATIONS = memory(4_000_000, 200_000, 3_800_000)  # 2.05 GB per sequence


@pytest.fixture
def lever_plan(gpu_plan):
    """One 8-row step on one GPU whose band top (92%) is `top` bytes."""

    def make(model: ModelMemory, top: int, **overrides) -> Plan:
        args = dict(
            global_batch=8,
            world_size=1,
            model=model,
            device_budget_bytes=int(top / 0.92) + 1,
            optimizer="auto",
            offload_activations="auto",
        )
        return gpu_plan(**{**args, **overrides})

    return make


def test_nothing_is_turned_on_when_the_plan_fits_without_levers(lever_plan):
    p = lever_plan(SMALL_ACTIVATIONS, top=2 * GiB)
    assert (p.optimizer, p.offload_activations) == ("adamw", False)
    assert p.reasons["optimizer"].text == "fp32 states 762.94 MiB fit: 8-bit states not needed"
    assert p.reasons["offload_activations"].text == "not needed: the activations fit on the device"


def test_only_8bit_states_fit(lever_plan):
    top = 1500 * MB  # fp32 states alone take 1.6 GB
    p = lever_plan(SMALL_ACTIVATIONS, top=top)
    assert (p.optimizer, p.offload_activations) == ("adamw_8bit", False)
    assert p.device_fixed_bytes == EIGHT_BIT_STATIC
    assert p.micro_batch_per_rank == 8
    assert p.device_peak_bytes_planned <= top
    assert p.reasons["optimizer"].text.startswith(
        f"8-bit states {EIGHT_BIT_STATES} instead of fp32 762.94 MiB: without them adamw: GPU "
        "at micro-batch 1: peak"
    )
    with pytest.raises(MemoryLimitError) as info:
        lever_plan(SMALL_ACTIVATIONS, top=top, optimizer="adamw", offload_activations="off")
    advice = str(info.value).split("Try: ")[1]
    assert advice.startswith(
        "--optimizer adamw_8bit stores the optimizer states in 8 bits; --offload_activations on "
        "keeps saved activations in host RAM"
    )


def test_only_offload_fits_and_8bit_states_are_not_added_to_it(lever_plan):
    top = 2100 * MB  # activations of one sequence alone take 2.05 GB
    p = lever_plan(LARGE_ACTIVATIONS, top=top)
    assert (p.optimizer, p.offload_activations) == ("adamw", True)
    copies = (p.prefetch_depth + 1) * BATCH_BYTES_PER_TOKEN * SEQ  # the prefetcher's batches
    assert p.device_bytes_per_sequence == 200_000 * SEQ + copies
    assert p.micro_batch_per_rank == 4  # 1.6 GB + 4 x 102 MB <= 2.1 GB
    # The host holds one micro-batch's offloaded activations.
    assert p.host_bytes_per_sequence >= 3_800_000 * SEQ
    assert p.reasons["offload_activations"].value is True
    assert "without it adamw: GPU at micro-batch 1" in p.reasons["offload_activations"].text
    assert "; adamw_8bit: GPU at micro-batch 1" in p.reasons["offload_activations"].text


def test_a_tight_host_limit_lowers_the_micro_batch_under_offload(lever_plan, roomy_host):
    top = 2100 * MB
    roomy = lever_plan(LARGE_ACTIVATIONS, top=top)
    assert roomy.micro_batch_per_rank == 4
    needed = roomy.host_fixed_bytes + 2 * roomy.host_bytes_per_sequence
    limit = math.ceil(needed / (1 - DEFAULT_HOST_SAFETY_FRAC))
    p = lever_plan(
        LARGE_ACTIVATIONS, top=top, host_ram_limit_bytes=limit, host_from_flags=True, host=None
    )
    assert p.offload_activations is True
    assert p.micro_batch_per_rank == 2
    assert p.host_bytes_planned <= p.host_limit_bytes


def test_when_nothing_fits_the_advice_omits_the_levers_already_on(lever_plan):
    levers = PLAN_FLAG_LEVERS.without_checkpointing_hint(True)
    with pytest.raises(MemoryLimitError) as info:
        lever_plan(LARGE_ACTIVATIONS, top=1000 * MB, levers=levers, grad_checkpointing=True)
    message = str(info.value)
    advice = message.split("Try: ")[1]
    assert "adamw_8bit" not in advice
    assert "--offload_activations" not in advice
    assert "--grad_checkpointing" not in advice
    assert advice.endswith("; a shorter --max_seq_len cuts activations")


def test_levers_the_user_fixed_stay_fixed(lever_plan):
    p = lever_plan(SMALL_ACTIVATIONS, top=2 * GiB, optimizer="adamw_8bit")
    assert p.optimizer == "adamw_8bit"
    assert p.reasons["optimizer"].text == (
        f"given (--optimizer adamw_8bit): states {EIGHT_BIT_STATES} on the device"
    )
    q = lever_plan(SMALL_ACTIVATIONS, top=2 * GiB, offload_activations="on")
    assert q.offload_activations is True
    with pytest.raises(MemoryLimitError):
        lever_plan(LARGE_ACTIVATIONS, top=2000 * MB, offload_activations="off", optimizer="auto")


def test_8bit_states_are_refused_under_deepspeed(gpu_plan):
    for offload, cause in ((False, "runs without DeepSpeed only"), (True, "CPU Adam")):
        with pytest.raises(ConfigError, match=cause):
            gpu_plan(zero_stage=2, offload_optimizer=offload, optimizer="adamw_8bit")
    auto = gpu_plan(zero_stage=2, optimizer="auto")
    assert auto.optimizer == "adamw"
    assert auto.reasons["optimizer"].text == "fp32 states: 8-bit AdamW does not run under DeepSpeed"


def test_under_zero_the_advice_does_not_offer_8bit_states(gpu_plan):
    with pytest.raises(MemoryLimitError) as info:
        gpu_plan(zero_stage=2, optimizer="auto", device_budget_bytes=GiB // 2)
    assert "adamw_8bit" not in str(info.value)


def test_offload_is_not_tried_on_the_cpu(gpu_plan):
    p = gpu_plan(device="cpu", world_size=1, global_batch=8, offload_activations="auto")
    assert p.offload_activations is False
    assert (
        p.reasons["offload_activations"].text == "no GPU: the activations are in host RAM already"
    )


def test_a_plan_keeps_its_levers_through_derivation_and_saving(lever_plan):
    p = lever_plan(LARGE_ACTIVATIONS, top=2000 * MB)
    smaller = p.with_micro_batch(1, "test")
    assert (smaller.optimizer, smaller.offload_activations) == ("adamw", True)
    assert Plan.from_dict(p.to_dict()) == p
    with pytest.raises(ConfigError, match="plan field offload_activations"):
        dataclasses.replace(p, offload_activations=False)
    backoff = str(pytest.raises(MemoryLimitError, smaller.backoff).value)
    assert backoff.endswith(
        "try --grad_checkpointing=True, --optimizer adamw_8bit, ZeRO-2 with optimizer offload, "
        "or a shorter --max_seq_len"
    )


def test_the_analytic_count_keeps_one_layers_saved_activations_on_the_device_under_offload():
    from trainer_low_mem.model import ModelPreset

    shape = ModelPreset(
        vocab_size=259, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=512
    )
    # Per layer and token (d=64, h=4, f=256, b=2) autograd keeps 2968 bytes (test_model_memory).
    m = analytic_model_memory(shape, seq_len=128, dtype_bytes=2, loss_chunk_tokens=1024)
    assert m.offload_host_bytes_per_token == 2 * 2968
    assert m.offload_device_bytes_per_token == m.activation_bytes_per_token - 2968
    # Checkpointing keeps each block's input (bd = 128 bytes) and recomputes one layer.
    ckpt = analytic_model_memory(
        shape, seq_len=128, dtype_bytes=2, loss_chunk_tokens=1024, grad_checkpointing=True
    )
    assert ckpt.offload_host_bytes_per_token == 2 * 128
    assert ckpt.offload_device_bytes_per_token == ckpt.activation_bytes_per_token - 128


def test_checkpointing_that_is_on_is_not_advised_whatever_the_levers_say(lever_plan):
    # The plan knows --grad_checkpointing itself: advice from any caller's levers omits it.
    with pytest.raises(MemoryLimitError) as info:
        lever_plan(LARGE_ACTIVATIONS, top=1000 * MB, grad_checkpointing=True)
    assert "--grad_checkpointing" not in str(info.value)
    with pytest.raises(MemoryLimitError) as info:
        lever_plan(LARGE_ACTIVATIONS, top=1000 * MB, grad_checkpointing=False)
    assert "--grad_checkpointing=True or a shorter --max_seq_len cuts activations" in str(
        info.value
    )


def test_a_gpu_probe_gets_the_8bit_states_and_offload_split_it_cannot_measure():
    from trainer_low_mem.model import MODEL_PRESETS, DecoderLM
    from trainer_low_mem.planner.estimate import with_lever_figures

    model = DecoderLM(MODEL_PRESETS["tiny"])
    analytic = analytic_model_memory(model.preset, seq_len=128, dtype_bytes=4)
    probed = ModelMemory(param_count=P, activation_bytes_per_token=30_000, source="probe")
    memory = with_lever_figures(probed, model, analytic)
    numels = [p.numel() for p in model.parameters()]
    assert memory.adamw_8bit_state_bytes == adamw_8bit_state_bytes(numels, round_to=512)
    whole = analytic.activation_bytes_per_token
    assert memory.offload_host_bytes_per_token == math.ceil(
        30_000 * analytic.offload_host_bytes_per_token / whole
    )
    assert memory.offload_device_bytes_per_token == math.ceil(
        30_000 * analytic.offload_device_bytes_per_token / whole
    )


def test_the_host_reason_counts_the_offloaded_activations(lever_plan):
    p = lever_plan(LARGE_ACTIVATIONS, top=2100 * MB)
    saved = 3_800_000 * SEQ * p.micro_batch_per_rank
    assert p.reasons["host_bytes_planned"].numbers["saved_bytes"] == saved
    assert f"+ offloaded activations of one micro-batch {format_bytes(saved)} +" in (
        p.reasons["host_bytes_planned"].text
    )


def test_when_offloaded_activations_overflow_the_host_the_advice_cuts_activations(
    lever_plan, roomy_host
):
    # The GPU fits only with activations offloaded, and one sequence's host copy is too big.
    top = 2100 * MB
    roomy = lever_plan(LARGE_ACTIVATIONS, top=top)
    needed = roomy.host_fixed_bytes + roomy.host_bytes_per_sequence // 2
    limit = math.ceil(needed / (1 - DEFAULT_HOST_SAFETY_FRAC))
    with pytest.raises(MemoryLimitError) as info:
        lever_plan(
            LARGE_ACTIVATIONS, top=top, host_ram_limit_bytes=limit, host_from_flags=True, host=None
        )
    advice = str(info.value).split("Try: ")[1]
    assert advice.startswith(
        "--grad_checkpointing=True or a shorter --max_seq_len cuts the activations offloaded "
        "to host RAM; "
    )
