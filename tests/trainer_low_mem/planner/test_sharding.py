"""The planner's model of sharded parameters: FSDP2 and DeepSpeed ZeRO-3 (planner/sharding.py)."""

from __future__ import annotations

import dataclasses
import tempfile

import pytest

from lowmem_core.errors import ConfigError, MemoryLimitError
from lowmem_core.memory import format_bytes
from trainer_low_mem.config import DataConfig, JobConfig, MemoryConfig, TrainingConfig
from trainer_low_mem.model import resolve_preset
from trainer_low_mem.planner import ModelMemory, plan, plan_for_job
from trainer_low_mem.planner.estimate import estimate_model_memory
from trainer_low_mem.planner.load_memory import load_private_bytes
from trainer_low_mem.planner.model_memory import ShardUnits
from trainer_low_mem.planner.sharding import Zero3Buckets, sharded_states

GiB = 1 << 30
P = 1_000_000
UNITS = ShardUnits(
    block_params=100_000,
    block_trainable=100_000,
    root_params=200_000,
    root_trainable=200_000,
    largest_layer_params=150_000,
)


def states(engine: str, **kw):
    args = dict(param_count=P, trainable_count=P, units=UNITS, world_size=4)
    args.update(kw)
    return sharded_states(engine, compute_dtype_bytes=2, **args)


def test_fsdp2_shards_fp32_parameters_gradients_and_moments_and_gathers_two_blocks_and_root():
    s = states("fsdp2")
    assert s.device == {
        "weights": 1_000_000,  # 4 B x P / 4
        "gradients": 1_000_000,
        "optimizer": 2_000_000,  # two fp32 moments
        "gathered_parameters": 2 * (2 * 100_000 + 200_000),
        "gathered_gradients": 4 * 100_000,  # one block's, reduced in fp32
    }
    assert s.offloaded == 0
    assert s.note == " (FSDP2 over 4 ranks)"


def test_fsdp2_parameter_offload_keeps_the_shards_in_host_ram_and_the_working_set_on_the_gpu():
    s = states("fsdp2", offload_params=True)
    assert s.device == {"gathered_parameters": 800_000, "gathered_gradients": 400_000}
    assert s.offloaded == 4_000_000
    assert s.note == " (FSDP2 over 4 ranks, sharded states in host RAM)"


def test_fsdp2_lora_shards_the_bf16_base_and_keeps_states_for_the_adapters_only():
    units = ShardUnits(100_000, 1_000, 200_000, 0, half_frozen=990_000)
    s = states("fsdp2", trainable_count=10_000, units=units)
    assert s.device["weights"] == (4 * 10_000 + 2 * 990_000) // 4
    assert (s.device["gradients"], s.device["optimizer"]) == (10_000, 20_000)
    assert s.device["gathered_gradients"] == 4 * 1_000


def test_zero3_partitions_16_bit_parameters_and_fp32_master_moments_and_gradients():
    s = states("zero3")
    assert s.device == {
        "weights": 500_000,  # 2 B x P / 4
        "gradients": 500_000 + 1_000_000,  # 16-bit partition + fp32 gradients
        "optimizer": 3_000_000,  # fp32 master + moments
        "reduce_bucket": 2 * 50_000_000,  # the shipped JSON's bucket, allocated whole
        "gathered_parameters": 2 * P,  # block + 5e7 prefetch, capped at P
    }
    assert s.offloaded == 0


def test_zero3_offload_moves_master_moments_gradients_then_the_partitions_to_host():
    buckets = Zero3Buckets(10_000, 20_000, 50_000)
    s = states("zero3", offload_optimizer=True, buckets=buckets)
    assert (s.device["optimizer"], s.device["gradients"], s.device["weights"]) == (0, 0, 500_000)
    assert s.device["reduce_bucket"] == 20_000
    assert s.device["gathered_parameters"] == 2 * 50_000  # max live caps block + prefetch
    assert s.offloaded == 3_000_000 + 1_500_000
    both = states("zero3", offload_optimizer=True, offload_params=True, buckets=buckets)
    assert both.device["weights"] == 0
    assert both.offloaded == 3_000_000 + 1_500_000 + 500_000
    assert both.note == " (ZeRO-3 over 4 ranks, optimizer and parameters in host RAM)"


def test_zero3_counts_the_output_head_gathered_beside_the_blocks_and_fsdp2_once_in_its_root():
    """Qwen-7B's 152,064 x 4,096 head, which the chunked loss reads outside its module: ZeRO-3
    keeps it gathered (an external parameter) through the forward and backward, 1.16 GiB in
    bf16 on top of a block and the prefetch bucket; FSDP2 gathers it with the root unit."""
    head = 152_064 * 4_096
    units = ShardUnits(
        block_params=233_000_000,
        block_trainable=233_000_000,
        root_params=2 * head,
        root_trainable=2 * head,
        head_params=head,
    )
    p = 28 * 233_000_000 + 2 * head
    z = states("zero3", param_count=p, trainable_count=p, units=units)
    # A block and the 5e7-element prefetch bucket (under the 3e8 live cap), then the head.
    assert z.device["gathered_parameters"] == 2 * (233_000_000 + 50_000_000 + head)
    assert z.device["gathered_parameters"] == 1_811_708_288
    assert format_bytes(2 * head) == "1.16 GiB"
    f = states("fsdp2", param_count=p, trainable_count=p, units=units)
    headless = states(
        "fsdp2", param_count=p, trainable_count=p, units=dataclasses.replace(units, head_params=0)
    )
    assert f.device["gathered_parameters"] == 2 * (2 * 233_000_000 + 2 * head)
    assert f.device == headless.device
    tiny = states("zero3", units=dataclasses.replace(UNITS, head_params=900_000))
    assert tiny.device["gathered_parameters"] == 2 * P  # never more than the whole model


def test_quantised_codes_are_partitioned_by_zero3_only_and_their_state_stays_whole():
    whole = {"quantised_weights": 700_000, "quant_state": 30_000}
    s = states("fsdp2", whole=whole)
    assert s.device["quantised_weights"] == 700_000 and s.device["quant_state"] == 30_000
    z = states("zero3", whole=whole)
    assert z.device["quantised_weights"] == 175_000 and z.device["quant_state"] == 30_000


def test_zero3_agrees_with_deepspeeds_estimator_but_for_what_it_leaves_out():
    """DeepSpeed counts 18 B/param over N plus 4 B per largest-layer parameter on the GPU, and
    16 (18 with parameters) B/param per node on the host with a 1.5 buffer factor: not the
    16-bit gradient partition (2 B/param over N), nor the buckets and gathered working set."""
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    n, largest = 4, UNITS.largest_layer_params
    kinds = ("weights", "gradients", "optimizer")

    def estimate(offload: bool, offload_params: bool = False) -> tuple[int, int]:
        cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
            P, largest, num_gpus_per_node=n, cpu_offload=offload, cpu_offload_params=offload_params
        )
        return cpu, gpu

    resident = states("zero3")
    assert sum(resident.device[k] for k in kinds) == estimate(False)[1] - 4 * largest + 2 * P // n
    offloaded = states("zero3", offload_optimizer=True)
    assert sum(offloaded.device[k] for k in kinds) == estimate(True)[1] - 4 * largest
    assert estimate(True)[0] == 1.5 * (n * offloaded.offloaded - 2 * P)
    both = states("zero3", offload_optimizer=True, offload_params=True)
    assert sum(both.device[k] for k in kinds) == estimate(True, True)[1] - 4 * largest == 0
    assert estimate(True, True)[0] == 1.5 * (n * both.offloaded - 2 * P)


def test_shape_units_count_blocks_root_and_the_lora_base():
    tiny = resolve_preset("tiny")
    units = ShardUnits.of_shape(tiny, tiny.param_count())
    assert units.root_params + tiny.n_layers * units.block_params == tiny.param_count()
    assert units.block_trainable == units.block_params
    assert units.root_params >= tiny.vocab_size * tiny.d_model
    assert units.head_params == tiny.vocab_size * tiny.d_model


def test_a_sharded_plan_needs_states_the_engine_placed(gpu_plan):
    with pytest.raises(ConfigError, match="needs the model states placed by the sharding"):
        gpu_plan(sharding="fsdp2")
    with pytest.raises(ConfigError, match="sharding must be one of"):
        gpu_plan(sharding="fsdp1")


def job(seq_len: int = 64, **training) -> JobConfig:
    return JobConfig(
        data=DataConfig(max_seq_len=seq_len, num_readers=None),
        training=TrainingConfig(**{"mixed_precision": "bf16", **training}),
        memory=MemoryConfig(host_ram_limit="64GiB", device_budget="20GiB"),
    )


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_the_job_plan_places_the_analytic_count_as_the_engine_shards_it(engine):
    tiny = resolve_preset("tiny")
    estimate = estimate_model_memory(job(), tiny, device="cuda", world_size=3, sharding=engine)
    units = ShardUnits.of_shape(tiny, tiny.param_count())
    expected = sharded_states(
        engine,
        param_count=tiny.param_count(),
        trainable_count=tiny.param_count(),
        units=units,
        world_size=3,
        compute_dtype_bytes=2,
    )
    assert dict(estimate.memory.static_device_bytes) == expected.device
    p = plan_for_job(
        job(global_batch=12),
        tiny,
        world_size=3,
        device="cuda",
        sharding=engine,
        zero_stage=3 if engine == "zero3" else 0,
        num_cores=8,
    )
    name = {"fsdp2": "FSDP2", "zero3": "ZeRO-3"}[engine]
    assert f"(analytic: {name} over 3 ranks placement applied by it)" in p.footprint.states
    assert p.reasons["optimizer"].text == "fp32 states: 8-bit AdamW does not run under " + (
        "FSDP2" if engine == "fsdp2" else "DeepSpeed"
    )


def test_parameter_offload_moves_the_shards_to_host_ram_in_the_plan():
    tiny = resolve_preset("tiny")
    kept = plan_for_job(
        job(global_batch=12), tiny, world_size=3, device="cuda", sharding="fsdp2", num_cores=8
    )
    off = plan_for_job(
        job(global_batch=12),
        tiny,
        world_size=3,
        device="cuda",
        sharding="fsdp2",
        offload_params=True,
        num_cores=8,
    )
    moved = kept.footprint.model_device_bytes - off.footprint.model_device_bytes
    assert moved == off.footprint.offloaded_bytes > 0


def test_8_bit_adamw_is_refused_under_fsdp2_in_one_line():
    tiny = resolve_preset("tiny")
    with pytest.raises(ConfigError, match="adamw_8bit is not planned under FSDP2"):
        plan_for_job(
            job(global_batch=12, optimizer="adamw_8bit"),
            tiny,
            world_size=3,
            device="cuda",
            sharding="fsdp2",
            num_cores=8,
        )


def test_a_trace_places_sharded_states_from_the_model_it_builds():
    transformers = pytest.importorskip("transformers")
    from trainer_low_mem.config import ModelConfig
    from trainer_low_mem.models import resolve_model_kind
    from trainer_low_mem.planner.trace import trace_step_memory

    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        kind = resolve_model_kind(ModelConfig(model=folder, from_scratch=True), "bf16")

        def factory():
            return kind.build(512, document_masking=True, weights=False)

        traced = trace_step_memory(
            factory,
            seq_len=32,
            micro_batches=(1, 2),
            device_type="cpu",
            mixed_precision="bf16",
            sharding="fsdp2",
            world_size=2,
        )
        offloaded = trace_step_memory(
            factory,
            seq_len=32,
            micro_batches=(1, 2),
            device_type="cuda",
            mixed_precision="bf16",
            sharding="zero3",
            offload_optimizer=True,
            world_size=2,
        )
    # Per block: q, o 64x64; k, v 64x32; MLP 3 x 64x128; two norms of 64.
    block = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert traced.units == ShardUnits(
        block, block, 2 * 512 * 64 + 64, 2 * 512 * 64 + 64, 0, 512 * 64, head_params=512 * 64
    )
    params = 2 * block + 2 * 512 * 64 + 64
    assert traced.static_bytes["weights"] == 4 * params // 2
    assert traced.static_bytes["gathered_parameters"] == 2 * (2 * block + 2 * 512 * 64 + 64)
    memory = traced.to_model_memory()
    assert isinstance(memory, ModelMemory) and memory.units == traced.units
    assert offloaded.static_bytes["optimizer"] == 0
    assert offloaded.host_offload_bytes == (2 + 16) * params // 2


def test_the_stage_3_refusal_is_gone_from_the_planner():
    memory = ModelMemory(
        param_count=100_000_000,
        activation_bytes_per_token=100_000,
        static_device_bytes={"weights": GiB},
        trainable_count=None,
    )
    p = plan(
        global_batch=384,
        seq_len=512,
        world_size=3,
        model=memory,
        zero_stage=3,
        sharding="zero3",
        device_budget_bytes=20 * GiB,
        num_gpus_visible=0,
        num_cores=16,
        host_ram_limit_bytes=64 * GiB,
        cuda_reserve_bytes=0,
        process_base_bytes=0,
    )
    assert p.footprint.zero_stage == 3
    assert "ZeRO-3 over 3 ranks placement applied by it" in p.footprint.states


BIG_UNITS = ShardUnits(80_000_000, 80_000_000, 300_000_000, 300_000_000)


def big_model(params: int) -> ModelMemory:
    return ModelMemory(param_count=params, activation_bytes_per_token=100_000, units=BIG_UNITS)


def test_a_full_fine_tune_too_big_for_whole_model_ranks_is_advised_the_sharding_that_fits(
    gpu_plan,
):
    model = big_model(3_000_000_000)
    with pytest.raises(MemoryLimitError) as refused:
        gpu_plan(model=model)
    fsdp2 = sharded_states(
        "fsdp2",
        param_count=model.param_count,
        trainable_count=model.trainable,
        units=BIG_UNITS,
        world_size=3,
        compute_dtype_bytes=2,
    )
    states = format_bytes(fsdp2.device_bytes)
    advice = f"Try: --fsdp=True shards the parameters too: model states {states} per rank"
    assert advice in str(refused.value)


def test_sharding_is_advised_only_where_it_fits(gpu_plan):
    with pytest.raises(MemoryLimitError) as refused:
        gpu_plan(model=big_model(8_000_000_000), host_ram_limit_bytes=64 * GiB, host=None)
    assert "shards the parameters" not in str(refused.value)
    with pytest.raises(MemoryLimitError) as one_rank:
        gpu_plan(model=big_model(3_000_000_000), world_size=1, global_batch=16)
    assert "shards the parameters" not in str(one_rank.value)


def test_a_train_launch_is_advised_the_shipped_sharding_config():
    from trainer_low_mem.planner.levers import Levers

    levers = Levers(zero_stage="z", offload_optimizer="o", drop_offload="d")
    assert levers.fsdp == "launching with --config_file accelerate_configs/fsdp2_3gpu.yaml (FSDP2)"
    assert "accelerate_configs/zero3_offload_3gpu.yaml" in levers.zero3


def test_one_trace_serves_every_sharding_engine_and_offload():
    from trainer_low_mem.model import MODEL_PRESETS, DecoderLM
    from trainer_low_mem.planner import estimate

    tiny = resolve_preset("tiny")
    key = "tiny, sharded once"
    memory = {}
    for engine, offload in (("fsdp2", False), ("fsdp2", True), ("zero3", False)):
        memory[engine, offload] = estimate_model_memory(
            job(),
            tiny,
            device="cuda",
            world_size=3,
            sharding=engine,
            offload_params=offload,
            model_factory=lambda: DecoderLM(MODEL_PRESETS["tiny"]),
            model_key=key,
        ).memory
    assert len([settings for settings in estimate._TRACES if settings[0] == key]) == 1
    assert {m.source for m in memory.values()} == {"trace"}
    kept, offloaded = memory["fsdp2", False], memory["fsdp2", True]
    moved = sum(kept.static_device_bytes[k] for k in ("weights", "gradients", "optimizer"))
    assert offloaded.host_offload_bytes == moved and "weights" not in offloaded.static_device_bytes
    assert "reduce_bucket" in memory["zero3", False].static_device_bytes


@pytest.mark.parametrize(
    ("flags", "placement"),
    [
        (["--fsdp"], "FSDP2 over 2 ranks placement"),
        (["--fsdp", "--offload_params"], "FSDP2 over 2 ranks placement"),
        (["--zero_stage", "3", "--offload_optimizer"], "ZeRO-3 over 2 ranks placement"),
    ],
)
def test_the_plan_command_reaches_the_sharded_placement_through_the_launch(flags, placement):
    from trainer_low_mem.cli import parse_plan_config, plan_from_config

    argv = ["--model_preset", "tiny", "--world_size", "2", "--max_seq_len", "64"]
    argv += ["--global_batch", "8", "--device_budget", "8GiB", "--host_ram_limit", "16GiB"]
    argv += ["--mixed_precision", "bf16", "--num_cores", "4", *flags]
    result = plan_from_config(parse_plan_config(argv))
    assert placement in result.footprint.states
    offloaded = "--offload_params" in flags or "--offload_optimizer" in flags
    assert (result.footprint.offloaded_bytes > 0) == offloaded


def test_under_fsdp2_only_rank_0_holds_a_load_copy_and_under_zero3_every_rank_does():
    tiny = resolve_preset("tiny")
    plans = {
        engine: plan_for_job(
            job(global_batch=12),
            tiny,
            world_size=3,
            device="cuda",
            sharding=engine,
            zero_stage=3 if engine == "zero3" else 0,
            num_cores=8,
        )
        for engine in ("fsdp2", "zero3")
    }
    load = load_private_bytes(tiny.param_count())
    fsdp2, zero3 = plans["fsdp2"].footprint, plans["zero3"].footprint
    assert fsdp2.ranks_per_node == zero3.ranks_per_node == 3
    assert fsdp2.load_bytes == zero3.load_bytes == load
    assert fsdp2.host_model_bytes == load
    assert zero3.host_model_bytes == 3 * load
    assert (
        plans["fsdp2"]
        .reasons["host_bytes_planned"]
        .text.endswith(
            f" + rank 0's model load {format_bytes(load)} (FSDP2: the other ranks load nothing)"
        )
    )
    # With offloaded states, rank 0 holds the larger of its load copy and its states.
    offloaded = dataclasses.replace(fsdp2, offloaded_bytes=load // 4)
    assert offloaded.host_model_bytes == load + 2 * (load // 4)
    assert dataclasses.replace(offloaded, load_ranks=None).host_model_bytes == 3 * load
    # With the shards in host RAM every FSDP2 rank loads the whole model (load_memory.py).
    off = plan_for_job(
        job(global_batch=12),
        tiny,
        world_size=3,
        device="cuda",
        sharding="fsdp2",
        offload_params=True,
        num_cores=8,
    ).footprint
    assert off.load_ranks == 3
    assert off.host_model_bytes == 3 * max(load, off.offloaded_bytes)


def _refusal_at_micro_batch_1(engine: str, **launch) -> str:
    """The out-of-memory refusal of a sharded plan of the tiny preset at micro-batch 1."""
    p = plan_for_job(
        job(global_batch=12),
        resolve_preset("tiny"),
        world_size=3,
        device="cuda",
        sharding=engine,
        zero_stage=3 if engine == "zero3" else 0,
        num_cores=8,
        **launch,
    )
    with pytest.raises(MemoryLimitError) as info:
        p.with_micro_batch(1, "test").backoff()
    return str(info.value)


def test_a_zero3_refusal_advises_only_the_offloads_it_is_without_never_zero2():
    kept = "try --grad_checkpointing=True, --offload_activations on, "
    assert _refusal_at_micro_batch_1("zero3").endswith(
        kept + "ZeRO-3 optimizer offload (offload_optimizer.device: cpu in the DeepSpeed "
        "config), ZeRO-3 parameter offload (offload_param.device: cpu in the DeepSpeed config), "
        "or a shorter --max_seq_len"
    )
    assert _refusal_at_micro_batch_1("zero3", offload_optimizer=True).endswith(
        kept + "ZeRO-3 parameter offload (offload_param.device: cpu in the DeepSpeed config), "
        "or a shorter --max_seq_len"
    )
    both = _refusal_at_micro_batch_1("zero3", offload_optimizer=True, offload_params=True)
    assert both.endswith(kept + "or a shorter --max_seq_len")


def test_an_fsdp2_refusal_advises_parameter_offload_until_it_is_on():
    kept = "try --grad_checkpointing=True, --offload_activations on, "
    assert _refusal_at_micro_batch_1("fsdp2").endswith(
        kept + "FSDP2 parameter offload (fsdp_offload_params: true), or a shorter --max_seq_len"
    )
    offloaded = _refusal_at_micro_batch_1("fsdp2", offload_params=True)
    assert offloaded.endswith(kept + "or a shorter --max_seq_len")
    assert "ZeRO" not in offloaded and "adamw_8bit" not in offloaded


def _nothing_fits_advice(engine: str, **launch) -> str:
    """What the tiny preset's sharded plan on a 1 MiB GPU budget advises."""
    config = dataclasses.replace(job(global_batch=12), memory=MemoryConfig(device_budget="1MiB"))
    with pytest.raises(MemoryLimitError) as info:
        plan_for_job(
            config,
            resolve_preset("tiny"),
            world_size=3,
            device="cuda",
            sharding=engine,
            zero_stage=3 if engine == "zero3" else 0,
            num_cores=8,
            **launch,
        )
    return str(info.value).split("Try: ")[1]


def test_a_sharded_refusal_advises_the_engines_offloads_that_are_off():
    cuts = "--grad_checkpointing=True or a shorter --max_seq_len cuts activations"
    # FSDP2's parameter offload takes its sharded weights, gradients and moments: 4 + 4 + 8
    # bytes per parameter over 3 ranks; it has no optimizer offload of its own.
    assert _nothing_fits_advice("fsdp2") == (
        f"--offload_params=True moves 770.67 KiB to host RAM; {cuts}"
    )
    assert _nothing_fits_advice("fsdp2", offload_params=True) == cuts
    # ZeRO-3: the fp32 master and moments (12 B/param / 3), then the 16-bit partitions.
    assert _nothing_fits_advice("zero3") == (
        "--offload_optimizer=True (with --zero_stage 1, 2 or 3) moves 578.00 KiB of optimizer "
        f"states to host RAM; --offload_params=True moves 96.33 KiB to host RAM; {cuts}"
    )
    assert _nothing_fits_advice("zero3", offload_optimizer=True) == (
        f"--offload_params=True moves 96.33 KiB to host RAM; {cuts}"
    )
