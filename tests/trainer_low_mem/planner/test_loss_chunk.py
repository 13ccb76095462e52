"""The loss chunk: chosen from the budget and the vocabulary, recorded in the plan with its reason,
kept by derived plans, and given to the model the trainer runs and the planner traces."""

from __future__ import annotations

import pytest

from trainer_low_mem.cli import parse_plan_config
from trainer_low_mem.config import DataConfig, JobConfig, MemoryConfig, TrainingConfig
from trainer_low_mem.job import build_job
from trainer_low_mem.launch import Launch
from trainer_low_mem.model import ModelPreset
from trainer_low_mem.planner import Plan, plan_for_job
from trainer_low_mem.planner.job import loss_chunk_for_job
from trainer_low_mem.planner.loss_chunk import (
    LOSS_CHUNK_CAP_BYTES,
    choose_loss_chunk,
    loss_chunk_bytes_per_token,
)

GiB = 1 << 30
QWEN_VOCAB = 152064
QWEN_LIKE = ModelPreset(
    vocab_size=QWEN_VOCAB, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=1024
)


@pytest.mark.parametrize(
    "vocab, budget_bytes, precision, tokens, note",
    [
        # 256 MiB cap / (152064 x (2 x 4 + 2)) = 176.5 -> 176
        (QWEN_VOCAB, 12 * GiB, "bf16", 176, None),
        # fp32 compute keeps no 16-bit copy: 256 MiB / (152064 x 8) = 220.6 -> 216
        (QWEN_VOCAB, 16 * GiB, "no", 216, None),
        # 4 GiB / 32 = 128 MiB: 88 positions, raised to the floor
        (QWEN_VOCAB, 4 * GiB, "bf16", 128, "floor"),
        # a 32k vocabulary: 256 MiB / 320000 = 838.9 -> 832
        (32000, 12 * GiB, "fp16", 832, None),
        (259, 4 * GiB, "no", 4096, "ceiling"),
    ],
)
def test_the_chunk_keeps_one_chunks_logits_under_the_bound(
    vocab, budget_bytes, precision, tokens, note
):
    reason = choose_loss_chunk(
        vocab_size=vocab, budget_bytes=budget_bytes, mixed_precision=precision, budget_why="given"
    )
    assert (reason.what, reason.value) == ("loss_chunk_tokens", tokens)
    assert tokens % 8 == 0
    chunk_bytes = tokens * loss_chunk_bytes_per_token(vocab, precision)
    assert reason.numbers["chunk_bytes"] == chunk_bytes
    if note != "floor":
        assert chunk_bytes <= min(budget_bytes // 32, LOSS_CHUNK_CAP_BYTES)
    assert (note is not None and note in reason.text) or ("floor" not in reason.text)


def _config(budget: str | None = None, precision: str = "bf16") -> JobConfig:
    return JobConfig(
        data=DataConfig(max_seq_len=64, num_readers=None),
        training=TrainingConfig(global_batch=12, mixed_precision=precision),
        memory=MemoryConfig(host_ram_limit="4GiB", device_budget=budget),
    )


def test_the_plan_records_the_chunk_and_derived_plans_keep_it():
    p = plan_for_job(_config("12GiB"), QWEN_LIKE, world_size=3, device="cuda", num_cores=8)
    assert p.loss_chunk_tokens == p.reasons["loss_chunk_tokens"].value == 176
    assert "budget 12.00 GiB (given (--device_budget))" in p.reasons["loss_chunk_tokens"].text
    assert p.reasons["model_estimate"].value == "analytic"
    # The analytic count takes the chosen chunk, not the old fixed 4096 positions.
    assert p.footprint.step_fixed_bytes < 4096 * QWEN_VOCAB * 2
    derived = [p.with_micro_batch(1, "given"), p.with_prefetch_depth(1, "given")]
    assert [d.loss_chunk_tokens for d in derived] == [176, 176]
    assert Plan.from_dict(p.to_dict()) == p
    row = next(line for line in p.table().splitlines() if line.startswith("loss_chunk_tokens"))
    assert "176" in row and "labelled positions per chunk" in row


def test_training_in_host_ram_sizes_the_chunk_from_the_ranks_share():
    reason = loss_chunk_for_job(_config(), QWEN_VOCAB, world_size=2, device="cpu")
    assert reason.numbers["budget_bytes"] <= 4 * GiB // 2
    assert "training in host RAM" in reason.text and "2 rank(s)" in reason.text


def test_ranks_take_the_smallest_chunk():
    reason = loss_chunk_for_job(
        _config("12GiB"), QWEN_VOCAB, world_size=2, device="cuda", all_reduce_min=lambda x: 128
    )
    assert reason.value == 128
    assert "128, the smallest chunk any rank chose" in reason.text


def test_the_trainer_and_the_trace_run_the_plans_chunk():
    flags = ["--model_preset", "tiny", "--max_seq_len", "512", "--global_batch", "2"]
    flags += ["--num_readers", "1", "--vocab_size", str(QWEN_VOCAB), "--mixed_precision", "no"]
    cfg = parse_plan_config(flags)
    job = build_job(cfg, Launch.from_flags(cfg.launch, "no"), vocab_size=cfg.vocab_size)
    model = job.build_model()
    assert model.loss_chunk_tokens == 4096  # the model's own default, before planning
    p = job.plan(device="cpu", model=model)
    assert model.loss_chunk_tokens == p.loss_chunk_tokens == 216
    assert p.reasons["model_estimate"].value == "trace"
    # The traced step grows by hidden-state terms per token, not by a row of fp32 logits.
    assert p.footprint.activation_bytes_per_token < QWEN_VOCAB * 4 // 8
