"""Which model-memory estimate a job's plan uses: the trace of the job's own model by default
without a GPU (presets and Hugging Face folders, LoRA, ZeRO/offload), cached per model key and
settings, and the analytic count, with the trace's failure named, when it cannot trace."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer_low_mem.config import (
    LaunchConfig,
    MemoryConfig,
    ModelConfig,
    PlanConfig,
    PlanDataConfig,
    TrainingConfig,
)
from trainer_low_mem.model import build_model, resolve_preset
from trainer_low_mem.models import resolve_model_kind
from trainer_low_mem.planner import plan_for_job
from trainer_low_mem.planner.estimate import estimate_model_memory

transformers = pytest.importorskip("transformers")
SEQ_LEN = 64
VOCAB, D, FF, LAYERS, KV = 512, 64, 128, 2, 32  # KV: 2 key/value heads of 16


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    """A tiny Llama folder, config only (no weights): as `--model DIR` gives it."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    config.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def config(model: ModelConfig, **launch) -> PlanConfig:
    return PlanConfig(
        data=PlanDataConfig(max_seq_len=SEQ_LEN),
        model=model,
        training=TrainingConfig(global_batch=8),
        memory=MemoryConfig(host_ram_limit="4GiB"),
        launch=LaunchConfig(**launch),
    )


def meta_shape(model: ModelConfig):
    """What the analytic count reads: the model built on the meta device, LoRA included."""
    return resolve_model_kind(model).shape(VOCAB)


def factory(model: ModelConfig):
    """Builds the job's model without weights, as the planner's trace does."""
    kind = resolve_model_kind(model)
    return lambda: kind.build(VOCAB, document_masking=bool(model.document_masking), weights=False)


def estimate(model: ModelConfig, device: str = "cpu", precision: str = "no", **launch):
    cfg = config(model, **launch)
    cfg.training.mixed_precision = precision
    return estimate_model_memory(
        cfg,
        meta_shape(model),
        device=device,
        world_size=cfg.launch.world_size,
        zero_stage=cfg.launch.zero_stage,
        offload_optimizer=cfg.launch.offload_optimizer,
        model_factory=factory(model),
    )


def test_a_model_folder_is_planned_from_its_trace_by_default(llama_dir):
    model = ModelConfig(model=llama_dir)
    shape = meta_shape(model)
    p = plan_for_job(
        config(model),
        shape,
        world_size=1,
        device="cpu",
        num_cores=4,
        model_factory=factory(model),
    )
    reason = p.reasons["model_estimate"]
    assert reason.value == "trace" and p.footprint.source == "trace"
    assert reason.text.startswith("trace: one optimizer step on fake cpu tensors for cpu")
    params = shape.param_count()
    # fp32 weights and gradients, Adam's two moments: 16 B per parameter, plus step counters.
    assert reason.numbers["static_bytes"] >= 16 * params
    assert f"weights {4 * params / 1024:.2f} KiB" in reason.text
    assert "B/token" in reason.text and "analytic cross-check" in reason.text
    assert p.reasons["model_memory"].numbers["params"] == f"{params:,}"


def test_lora_keeps_optimizer_states_for_the_adapters_only(llama_dir):
    pytest.importorskip("peft")
    full = estimate(ModelConfig(model=llama_dir)).memory
    lora = estimate(ModelConfig(model=llama_dir, lora_rank=8)).memory
    # Rank 8 on every linear layer but the head: r x (in + out) each; q, o: 64->64;
    # k, v: 64->32; gate, up: 64->128; down: 128->64. Two tensors (A, B) per layer.
    per_layer = 8 * (2 * (D + D) + 2 * (D + KV) + 2 * (D + FF) + (FF + D))
    adapters, adapter_tensors = LAYERS * per_layer, LAYERS * 7 * 2
    base = full.param_count
    base_tensors = len(list(factory(ModelConfig(model=llama_dir))().parameters()))
    assert lora.trainable == adapters and lora.param_count == base + adapters
    assert full.static_device_bytes["optimizer"] == 8 * base + 4 * base_tensors
    assert lora.static_device_bytes["optimizer"] == 8 * adapters + 4 * adapter_tensors
    assert lora.static_device_bytes["gradients"] == 4 * adapters
    assert lora.static_device_bytes["weights"] == 4 * (base + adapters)


def test_zero2_offload_in_the_plan_matches_deepspeeds_estimate(llama_dir):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    world = 4
    model = ModelConfig(model=llama_dir)
    cfg = config(model, world_size=world, zero_stage=2, offload_optimizer=True)
    cfg.training.mixed_precision = "bf16"
    cfg.memory.device_budget = "1GiB"
    p = plan_for_job(
        cfg,
        meta_shape(model),
        world_size=world,
        zero_stage=2,
        offload_optimizer=True,
        ranks_per_node=1,  # one process's host RAM: the 4 GiB limit holds one
        num_cores=4,
        model_factory=factory(model),
    )
    params = meta_shape(model).param_count()
    cpu, gpu = estimate_zero2_model_states_mem_needs(
        params, num_gpus_per_node=world, cpu_offload=True
    )
    # DeepSpeed's host figure is per node with a 1.5 buffer factor; its GPU figure is the
    # 16-bit weights alone once gradients and states are offloaded.
    assert p.device == "cuda" and p.reasons["model_estimate"].value == "trace"
    assert world * p.footprint.offloaded_bytes * 1.5 == cpu
    static = estimate(model, "cuda", "bf16", world_size=world, zero_stage=2, offload_optimizer=True)
    weights = static.memory.static_device_bytes
    n_tensors = len(list(factory(model)().parameters()))
    # Each tensor rounded up to the CUDA allocator's 512-byte blocks.
    assert 0 <= weights["weights"] - gpu < 512 * n_tensors
    assert weights["gradients"] == weights["optimizer"] == 0


def test_the_trace_of_a_given_model_copies_it_to_meta_without_touching_it():
    model = build_model("tiny")
    before = model.embed.weight.detach().clone()
    memory = estimate_model_memory(
        config(ModelConfig(model_preset="tiny")),
        resolve_preset("tiny"),
        device="cpu",
        world_size=1,
        model=model,
    ).memory
    assert memory.source == "trace" and memory.param_count == resolve_preset("tiny").param_count()
    assert model.embed.weight.device.type == "cpu" and torch.equal(model.embed.weight, before)


def test_each_model_and_setting_is_traced_once_per_model_key():
    calls = []

    def factory(grad_checkpointing: bool):
        def build():
            calls.append(grad_checkpointing)
            return build_model("tiny", grad_checkpointing=grad_checkpointing)

        return build

    def plan(grad_checkpointing: bool, key: str | None):
        cfg = config(ModelConfig(model_preset="tiny", grad_checkpointing=grad_checkpointing))
        cfg.data.max_seq_len = 48  # a length no other test traces
        return estimate_model_memory(
            cfg,
            resolve_preset("tiny"),
            device="cpu",
            world_size=1,
            model_factory=factory(grad_checkpointing),
            model_key=key,
        ).memory

    first, again = plan(False, "tiny"), plan(False, "tiny")
    checkpointed = plan(True, "tiny, checkpointed")
    assert calls == [False, True] and first == again
    assert checkpointed.activation_bytes_per_token < first.activation_bytes_per_token
    # Without a key nothing names the model: it is traced every time.
    assert plan(False, None) == plan(False, None) == first
    assert calls == [False, True, False, False]


def test_an_untraceable_model_falls_back_to_the_analytic_count_with_the_cause(llama_dir):
    def no_loss():
        return torch.nn.Linear(4, 4)

    model = ModelConfig(model=llama_dir)
    p = plan_for_job(
        config(model),
        meta_shape(model),
        world_size=1,
        device="cpu",
        num_cores=4,
        model_factory=no_loss,
    )
    reason = p.reasons["model_estimate"]
    assert reason.value == "analytic" and p.footprint.source == "analytic"
    assert "\n" not in reason.text
    assert reason.text.startswith("analytic: the trace failed (cannot trace the model's")
    assert "unexpected keyword argument 'input_ids'" in reason.numbers["cause"]


def test_without_a_model_or_factory_the_plan_counts_analytically():
    p = plan_for_job(
        config(ModelConfig(model_preset="tiny")),
        resolve_preset("tiny"),
        world_size=1,
        device="cpu",
        num_cores=4,
    )
    assert p.reasons["model_estimate"].value == "analytic"
    assert "no model to trace" in p.reasons["model_estimate"].text
