"""Sizer: the global batch invariant, the micro-batch band, host limits, explained decisions, clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.__main__ import main as pipeline_main
from lowmem_core.errors import ConfigError, MemoryLimitError
from lowmem_core.memory import HostMemory, host_memory
from pipeline.sizer import (
    BATCH_BYTES_PER_TOKEN,
    GiB,
    MiB,
    READER_SCRATCH_BYTES_PER_TOKEN,
    READER_THREAD_BYTES,
    ModelMemory,
    Plan,
    agree_across_ranks,
    analytic_model_memory,
    plan,
    usable_cores,
)

L = 512
MODEL = ModelMemory(param_count=100_000_000, n_layers=12, d_model=768, vocab_size=32000,
                    activation_bytes_per_token=100_000, param_dtype_bytes=2, step_fixed_bytes=0)
ROOMY_HOST = HostMemory(total_bytes=256 * GiB, available_bytes=200 * GiB, cgroup_limit_bytes=None,
                        cgroup_current_bytes=None, page_cache_bytes=None)


def gpu_plan(**kw) -> Plan:
    args = dict(global_batch=384, seq_len=L, world_size=3, model=MODEL, gpu_budget_bytes=20 * GiB,
                num_gpus_visible=0, num_cores=16, host=ROOMY_HOST, cuda_reserve_bytes=0, process_base_bytes=0)
    args.update(kw)
    return plan(**args)


# -- global batch invariant --------------------------------------------------------------------


@pytest.mark.parametrize("global_batch,world_size", [(384, 3), (384, 1), (96, 4), (7, 7), (60, 5), (1, 1)])
@pytest.mark.parametrize("budget_gib", [2, 20, 80])
def test_micro_times_accum_times_world_is_the_global_batch(global_batch, world_size, budget_gib):
    p = gpu_plan(global_batch=global_batch, world_size=world_size, gpu_budget_bytes=budget_gib * GiB)
    assert p.micro_batch_per_gpu * p.grad_accum_steps * p.world_size == global_batch
    assert (global_batch // world_size) % p.micro_batch_per_gpu == 0
    assert p.gpu_peak_bytes_planned <= 0.92 * p.gpu_budget_bytes


def test_micro_batch_is_the_largest_divisor_under_the_band_top():
    p = gpu_plan()
    # Per rank: bf16 weights 200 MB, grads 200 MB, fp32 master + Adam 1.2 GB; activations 51.2 MB per sequence
    # plus device copies of the prefetch pool: depth 4 (16 cores / 3 ranks -> 4 readers) + 1 sets of 12 KiB.
    static = 100_000_000 * (2 + 2 + 12)
    per_seq = 100_000 * L + 5 * BATCH_BYTES_PER_TOKEN * L
    assert p.device_fixed_bytes == static
    assert p.device_bytes_per_sequence == per_seq
    band_top = 0.92 * 20 * GiB
    # per-rank batch 128: divisors ... 64, 128; 128 sequences need 6.6 GB + 1.6 GB, so all 128 fit.
    assert static + 128 * per_seq <= band_top
    assert (p.micro_batch_per_gpu, p.grad_accum_steps) == (128, 1)
    assert "whole per-rank batch 128 fits" in p.reasons["micro_batch_per_gpu"]

    tight = gpu_plan(gpu_budget_bytes=4 * GiB)
    fitting = [m for m in (1, 2, 4, 8, 16, 32, 64, 128) if static + m * per_seq <= 0.92 * 4 * GiB]
    assert tight.micro_batch_per_gpu == max(fitting) == 32
    assert tight.grad_accum_steps == 4
    assert tight.gpu_peak_bytes_planned == static + 32 * per_seq
    assert "64 would need" in tight.reasons["micro_batch_per_gpu"]


def test_planned_peak_sits_in_the_band_when_the_divisors_allow_it():
    # Pick a budget so that micro 16's peak is 90% of it: it lies in the 85-92% band.
    static = 100_000_000 * 16
    per_seq = 100_000 * L + 5 * BATCH_BYTES_PER_TOKEN * L
    budget = math.ceil((static + 16 * per_seq) / 0.90)
    p = gpu_plan(gpu_budget_bytes=budget)
    assert p.micro_batch_per_gpu == 16
    assert 0.85 <= p.gpu_peak_bytes_planned / budget <= 0.92


def test_zero2_partitions_grads_and_optimizer_and_offload_moves_states_to_host():
    P, W = 100_000_000, 3
    shard = math.ceil(P / W)
    buckets = 2 * 768 * 768 * 2
    zero0 = gpu_plan()
    zero2 = gpu_plan(zero_stage=2)
    offload = gpu_plan(zero_stage=2, offload_optimizer=True)
    assert zero0.device_fixed_bytes == P * 2 + P * 2 + P * 12
    assert zero2.device_fixed_bytes == P * 2 + shard * 2 + buckets + shard * 12
    assert offload.device_fixed_bytes == P * 2 + shard * 2 + buckets
    # On the host: 3 ranks x (fp32 model copy + readers), plus 16 B/param of offloaded states + fp32 grads.
    readers = 4  # 16 cores / 3 ranks = 5 per rank, one kept for the loop
    host_fixed_rank = P * 4 + readers * READER_THREAD_BYTES
    assert zero2.host_fixed_bytes == 3 * host_fixed_rank
    assert offload.host_fixed_bytes == 3 * host_fixed_rank + 3 * shard * 16
    assert "offloaded optimizer" in offload.reasons["host_bytes_planned"]


def test_readers_and_depth_follow_cores_per_rank():
    assert (gpu_plan(num_cores=16).num_readers, gpu_plan(num_cores=16).prefetch_depth) == (4, 4)
    assert (gpu_plan(num_cores=6).num_readers, gpu_plan(num_cores=6).prefetch_depth) == (1, 2)
    assert gpu_plan(num_cores=64).num_readers == 4  # capped
    assert "64 core(s) / 3 rank(s) = 21 per rank" in gpu_plan(num_cores=64).reasons["num_readers"]


def test_every_decision_has_a_reason_with_numbers():
    p = gpu_plan(dataset_bytes=1 * GiB)
    for name in ("micro_batch_per_gpu", "grad_accum_steps", "num_readers", "prefetch_depth", "pin_memory",
                 "pinned_pool_bytes", "ultra_low_mem", "gpu_budget_bytes", "gpu_peak_bytes_planned",
                 "host_limit_bytes", "host_bytes_planned"):
        assert p.reasons[name], name
    assert "GiB" in p.reasons["gpu_peak_bytes_planned"]
    assert "1.00 GiB" in p.reasons["ultra_low_mem"]
    table = p.table()
    assert table.splitlines()[0].startswith("plan: global batch 384 = micro 128 x accumulation 1 x world 3")
    for name, reason in p.reasons.items():
        assert name in table and reason in table


def test_pinned_pool_is_depth_plus_one_batches():
    p = gpu_plan(num_cores=6)
    assert p.pin_memory is True
    assert p.pinned_pool_bytes == (p.prefetch_depth + 1) * p.micro_batch_per_gpu * L * BATCH_BYTES_PER_TOKEN


# -- host limits ---------------------------------------------------------------------------------


def write_cgroup_v2(folder, limit: str, current: int = 1 * GiB, file_bytes: int = 256 * MiB):
    folder.mkdir(exist_ok=True)
    (folder / "memory.max").write_text(limit + "\n")
    (folder / "memory.current").write_text(f"{current}\n")
    (folder / "memory.stat").write_text(f"anon 1000\nfile {file_bytes}\nkernel 20\n")
    return folder


def test_cgroup_limit_is_honoured_over_a_larger_request(tmp_path):
    host = host_memory(cgroup_dir=write_cgroup_v2(tmp_path / "cg", str(8 * GiB)))
    assert host.cgroup_limit_bytes == 8 * GiB
    p = gpu_plan(host=host, host_ram_limit_bytes=32 * GiB)
    assert p.host_limit_bytes == int(min(8 * GiB, host.total_bytes) * 0.9)
    assert p.host_bytes_planned <= p.host_limit_bytes
    assert "cgroup limit 8.00 GiB" in p.reasons["host_limit_bytes"]


def test_requested_limit_below_the_machine_is_used_with_the_margin():
    p = gpu_plan(host_ram_limit_bytes=10 * GiB, host_safety_frac=0.2)
    assert p.host_limit_bytes == int(10 * GiB * 0.8)


def test_dataset_that_fits_is_memory_mapped_and_counted_else_ultra_low_mem():
    small = gpu_plan(host_ram_limit_bytes=8 * GiB, dataset_bytes=1 * GiB, zero_stage=2)
    assert small.ultra_low_mem is False
    big = gpu_plan(host_ram_limit_bytes=8 * GiB, dataset_bytes=40 * GiB, zero_stage=2)
    assert big.ultra_low_mem is True
    assert small.host_bytes_planned - big.host_bytes_planned == 1 * GiB
    assert "does not fit" in big.reasons["ultra_low_mem"]
    assert big.host_bytes_planned <= big.host_limit_bytes


def test_tight_host_lowers_prefetch_depth_then_readers_before_giving_up():
    base = gpu_plan(num_cores=16, world_size=1, global_batch=8, host_safety_frac=0.0)
    assert (base.prefetch_depth, base.num_readers) == (4, 4)
    micro = base.micro_batch_per_gpu
    # Host bytes with depth 1 and 4 readers, and with depth 1 and 1 reader.
    per_seq_d1_r4 = 2 * L * BATCH_BYTES_PER_TOKEN + 4 * L * READER_SCRATCH_BYTES_PER_TOKEN
    d1_r4 = base.host_fixed_bytes + micro * per_seq_d1_r4
    limit = d1_r4 + 1
    lowered = gpu_plan(num_cores=16, world_size=1, global_batch=8, host_safety_frac=0.0, host_ram_limit_bytes=limit)
    assert (lowered.prefetch_depth, lowered.num_readers) == (1, 4)
    assert "lowered from 4 to 1" in lowered.reasons["prefetch_depth"]
    d1_r1 = base.host_fixed_bytes - 3 * READER_THREAD_BYTES + micro * (
        2 * L * BATCH_BYTES_PER_TOKEN + L * READER_SCRATCH_BYTES_PER_TOKEN)
    lowest = gpu_plan(num_cores=16, world_size=1, global_batch=8, host_safety_frac=0.0, host_ram_limit_bytes=d1_r1)
    assert (lowest.prefetch_depth, lowest.num_readers) == (1, 1)
    assert lowest.host_bytes_planned == d1_r1
    with pytest.raises(MemoryLimitError, match="no plan fits"):
        gpu_plan(num_cores=16, world_size=1, global_batch=8, host_safety_frac=0.0, host_ram_limit_bytes=d1_r1 - 1)


def test_offloaded_optimizer_that_cannot_fit_the_host_is_refused_before_training():
    with pytest.raises(MemoryLimitError, match="offloaded optimizer takes"):
        gpu_plan(zero_stage=2, offload_optimizer=True, host_ram_limit_bytes=2 * GiB)


def test_cpu_training_budgets_host_ram():
    p = gpu_plan(gpu_budget_bytes=None, num_gpus_visible=0, world_size=1, global_batch=64,
                 host_ram_limit_bytes=10 * GiB, host_safety_frac=0.0)
    assert p.device == "cpu"
    assert p.pin_memory is False and p.pinned_pool_bytes == 0
    assert p.gpu_budget_bytes == 10 * GiB
    assert p.host_bytes_planned == p.gpu_peak_bytes_planned <= 0.92 * 10 * GiB
    assert "no GPU" in p.reasons["gpu_budget_bytes"]


# -- errors --------------------------------------------------------------------------------------


def test_global_batch_not_divisible_by_world_size_says_what_would_work():
    with pytest.raises(ConfigError, match=r"global batch 385 is not divisible by world size 3.*384 or 387.*5, 7, 11"):
        gpu_plan(global_batch=385)


def test_forced_micro_batch_must_divide_the_per_rank_batch():
    with pytest.raises(ConfigError, match=r"micro-batch 5 does not divide the per-rank batch 128.*\[1, 2, 4, 8"):
        gpu_plan(micro_batch_per_gpu=5)
    p = gpu_plan(micro_batch_per_gpu=8, gpu_budget_bytes=4 * GiB)
    assert (p.micro_batch_per_gpu, p.grad_accum_steps) == (8, 16)
    assert p.reasons["micro_batch_per_gpu"].startswith("given")


def test_model_that_cannot_fit_one_sequence_names_the_remedies():
    with pytest.raises(MemoryLimitError, match=r"--zero-stage 2.*--offload-optimizer.*gradient checkpointing"):
        gpu_plan(gpu_budget_bytes=1 * GiB)


def test_invalid_settings_are_config_errors():
    with pytest.raises(ConfigError, match="needs ZeRO stage 1 or 2"):
        gpu_plan(offload_optimizer=True)
    with pytest.raises(ConfigError, match="zero_stage must be 0, 1 or 2"):
        gpu_plan(zero_stage=3)
    with pytest.raises(ConfigError, match="target_gpu_frac"):
        gpu_plan(target_gpu_frac=(0.95, 0.9))


# -- derived plans -------------------------------------------------------------------------------


def test_with_micro_batch_keeps_the_global_batch_and_recomputes_memory():
    p = gpu_plan(gpu_budget_bytes=4 * GiB)
    half = p.with_micro_batch(p.micro_batch_per_gpu // 2)
    assert half.micro_batch_per_gpu == p.micro_batch_per_gpu // 2
    assert half.grad_accum_steps == 2 * p.grad_accum_steps
    assert half.global_batch == p.global_batch
    assert half.gpu_peak_bytes_planned == p.device_fixed_bytes + half.micro_batch_per_gpu * p.device_bytes_per_sequence
    assert half.pinned_pool_bytes == p.pinned_pool_bytes // 2
    with pytest.raises(ConfigError, match="does not divide"):
        p.with_micro_batch(3)


def test_backoff_halves_to_a_valid_divisor_until_one():
    p = gpu_plan(global_batch=36, world_size=3, micro_batch_per_gpu=12)
    steps = [p.micro_batch_per_gpu]
    while steps[-1] > 1:
        p = p.backoff()
        steps.append(p.micro_batch_per_gpu)
        assert p.micro_batch_per_gpu * p.grad_accum_steps * 3 == 36
    assert steps == [12, 6, 3, 1]
    assert "halved after running out of memory" in p.reasons["micro_batch_per_gpu"]
    with pytest.raises(MemoryLimitError, match="out of memory at micro-batch 1"):
        p.backoff()


def test_ranks_agree_on_the_smallest_micro_batch():
    p = gpu_plan(gpu_budget_bytes=4 * GiB)
    assert agree_across_ranks(p, lambda x: x) is p
    agreed = agree_across_ranks(p, lambda x: min(x, 8))
    assert (agreed.micro_batch_per_gpu, agreed.grad_accum_steps) == (8, 16)
    assert "smallest micro-batch planned on any rank" in agreed.reasons["micro_batch_per_gpu"]
    with pytest.raises(ConfigError, match="must return the minimum"):
        agree_across_ranks(p, lambda x: x + 1)


def test_plan_round_trips_through_json():
    p = gpu_plan(dataset_bytes=3 * GiB)
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    broken = p.to_dict()
    del broken["seq_len"]
    with pytest.raises(ConfigError, match="missing: seq_len"):
        Plan.from_dict(broken)
    with pytest.raises(ConfigError, match="breaks the global batch"):
        Plan.from_dict({**p.to_dict(), "grad_accum_steps": p.grad_accum_steps + 1})


# -- the analytic memory model -------------------------------------------------------------------


def test_analytic_activation_bytes_follow_the_documented_formula():
    # d=64, h=4, f=256, b=2: norm = 4d + 4 + 2bd = 516; layer = 2*516 + 7bd + 4h + 2bf = 2968;
    # head = 516 + bd + 8 + 24 = 676; per token = 2 layers kept + 1 backward layer + head.
    m = analytic_model_memory(param_count=1000, n_layers=2, d_model=64, n_heads=4, vocab_size=259, seq_len=128,
                              d_ff=256, dtype_bytes=2, loss_chunk_tokens=1024)
    assert m.activation_bytes_per_token == 3 * 2968 + 676
    assert m.step_fixed_bytes == 4 * 259 * 64 + 1024 * 259 * (2 * 2 + 4)
    ckpt = analytic_model_memory(param_count=1000, n_layers=2, d_model=64, n_heads=4, vocab_size=259, seq_len=128,
                                 d_ff=256, dtype_bytes=2, loss_chunk_tokens=1024, grad_checkpointing=True)
    assert ckpt.activation_bytes_per_token == 2 * 128 + 2 * 2968 + 676


def test_analytic_estimate_covers_what_autograd_keeps_for_the_tiny_model():
    from trainer_low_mem.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny")
    preset = model.preset
    batch, seq_len = 4, 128
    ids = torch.randint(0, preset.vocab_size, (batch, seq_len))
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(ids, labels=ids)
    saved_per_token = sum(n for ptr, n in storages.items() if ptr not in params) / (batch * seq_len)
    estimate = analytic_model_memory(preset.param_count(), preset.n_layers, preset.d_model, preset.n_heads,
                                     preset.vocab_size, seq_len, dtype_bytes=4, d_ff=preset.d_ff)
    # The estimate is what autograd keeps plus one layer of backward working set: above, within 60%.
    assert saved_per_token <= estimate.activation_bytes_per_token <= 1.6 * saved_per_token


# -- machine readings and the CLI ----------------------------------------------------------------


def test_usable_cores_honours_a_cgroup_cpu_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cores(tmp_path) == min(2, usable_cores(tmp_path / "absent"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == usable_cores(tmp_path / "absent")


def test_plan_cli_prints_json_that_keeps_the_global_batch(capsys):
    rc = pipeline_main(["plan", "--model-preset", "tiny", "--seq-len", "256", "--global-batch", "48",
                        "--world-size", "3", "--gpu-budget-gb", "2", "--zero-stage", "2", "--offload-optimizer",
                        "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["micro_batch_per_gpu"] * d["grad_accum_steps"] * 3 == 48
    assert d["device"] == "cuda" and d["pin_memory"] is True


def test_plan_cli_prints_a_table_and_errors_in_one_line(capsys):
    assert pipeline_main(["plan", "--model-preset", "tiny", "--seq-len", "128", "--global-batch", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: global batch 16")
    assert "micro_batch_per_gpu" in out
    rc = pipeline_main(["plan", "--model-preset", "tiny", "--seq-len", "128", "--global-batch", "16",
                        "--world-size", "3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == [err.strip()]
    assert "global batch 16 is not divisible by world size 3" in err


def test_probe_needs_a_cuda_device():
    from pipeline.sizer import probe_model_memory
    from trainer_low_mem.model import build_model

    with pytest.raises(ConfigError, match="needs a CUDA device"):
        probe_model_memory(build_model("tiny"), seq_len=64, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probe_measures_activations_close_to_the_analytic_model():
    from pipeline.sizer import probe_model_memory
    from trainer_low_mem.model import build_model

    torch.manual_seed(0)
    model = build_model("small", vocab_size=259).cuda()
    probed = probe_model_memory(model, seq_len=512, device="cuda", micro_batches=(2, 4), autocast_dtype=torch.bfloat16)
    preset = model.preset
    analytic = analytic_model_memory(preset.param_count(), preset.n_layers, preset.d_model, preset.n_heads,
                                     preset.vocab_size, 512, d_ff=preset.d_ff, dtype_bytes=2)
    assert probed.source == "probe" and probed.param_count == preset.param_count()
    assert 0.5 <= probed.activation_bytes_per_token / analytic.activation_bytes_per_token <= 1.5
