"""The fake-tensor trace of a training step: exact against real steps, linear where it should be,
LoRA and ZeRO/offload accounted as DeepSpeed does, and untraceable models refused in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bench.plan_check import Case, real_peak_bytes
from lowmem_core.errors import ConfigError
from trainer_low_mem.model import MODEL_PRESETS, DecoderLM
from trainer_low_mem.planner.trace import trace_step_memory
from trainer_low_mem.planner.traced_memory import (
    LINEAR_TOLERANCE,
    ProbeReading,
    calibrate_unseen,
)

MiB = 1 << 20


def tiny(grad_checkpointing: bool = False):
    return lambda: DecoderLM(MODEL_PRESETS["tiny"], grad_checkpointing=grad_checkpointing)


def llama_config(vocab_size: int = 512, layers: int = 2):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )


def tiny_llama(vocab_size: int = 512, layers: int = 2):
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        from trainer_low_mem.hf_model import HFCausalLM

        config = llama_config(vocab_size, layers)
        return HFCausalLM(transformers.AutoModelForCausalLM.from_config(config))

    return build


def job_model(folder, **model):
    """Builds the model a job on `folder` trains (LoRA included), without weights."""
    from trainer_low_mem.config import ModelConfig
    from trainer_low_mem.models import resolve_model_kind

    kind = resolve_model_kind(ModelConfig(model=folder, **model))
    return lambda: kind.build(512, document_masking=True, weights=False)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_trace_equals_real_steps_at_traced_and_untraced_micro_batches(grad_checkpointing):
    traced = trace_step_memory(tiny(grad_checkpointing), seq_len=128, device_type="cpu")
    case = Case("tiny", tiny(grad_checkpointing), 259, 128, (1, 3, 6))
    for m in case.real_micro_batches:
        assert traced.peak_bytes(m) == pytest.approx(real_peak_bytes(case, m), rel=0.005)
    p = MODEL_PRESETS["tiny"].param_count()
    assert traced.param_count == traced.trainable_count == p
    assert traced.static_bytes["weights"] == traced.static_bytes["gradients"] == 4 * p
    # Adam's two fp32 moments plus one 4-byte step counter per parameter tensor.
    n_tensors = len(list(tiny()().parameters()))
    assert traced.static_bytes["optimizer"] == 8 * p + 4 * n_tensors


def test_linear_model_fits_exactly_and_line_covers_every_point():
    traced = trace_step_memory(tiny(), seq_len=128, micro_batches=(1, 2, 4), device_type="cpu")
    assert traced.linear and traced.linear_residual_frac <= LINEAR_TOLERANCE
    for p in traced.points:
        line = traced.step_fixed_bytes + traced.activation_bytes_per_token * p.tokens
        assert p.activation_bytes <= line <= p.activation_bytes * (1 + LINEAR_TOLERANCE)
        assert traced.peak_bytes(p.micro_batch) >= p.peak_bytes
    assert traced.peak_bytes(4) == pytest.approx(traced.points[-1].peak_bytes, rel=0.01)


class SaturatingLM(nn.Module):
    """Scores at most `cap` tokens through a wide layer: memory stops growing past `cap` tokens."""

    def __init__(self, cap: int = 512, width: int = 4096) -> None:
        super().__init__()
        self.cap = cap
        self.embed = nn.Embedding(16, 32)
        self.wide = nn.Linear(32, width, bias=False)

    def forward(self, input_ids, position_ids=None, labels=None):
        h = self.embed(input_ids).reshape(-1, 32)
        loss = h.square().mean() + self.wide(h[: self.cap]).square().mean()
        return dataclasses.make_dataclass("Out", ["loss"])(loss)


def test_a_saturating_peak_is_reported_not_linear_and_bounded_above():
    traced = trace_step_memory(
        SaturatingLM, seq_len=256, micro_batches=(1, 2, 4), device_type="cpu"
    )
    assert not traced.linear
    assert "NOT linear" in " ".join(traced.reasons())
    for p in traced.points:
        assert traced.peak_bytes(p.micro_batch) >= p.peak_bytes


def test_lora_keeps_gradients_and_optimizer_states_for_adapters_only(tmp_path):
    pytest.importorskip("peft")
    llama_config().save_pretrained(tmp_path / "llama")
    full = trace_step_memory(job_model(tmp_path / "llama"), seq_len=64, device_type="cpu")
    lora_model = job_model(
        tmp_path / "llama", lora_rank=4, lora_alpha=8.0, lora_target_modules=["q_proj", "v_proj"]
    )
    lora = trace_step_memory(lora_model, seq_len=64, device_type="cpu")
    # q_proj 64->64 and v_proj 64->32 (2 KV heads of 16), rank 4: A (4 x 64) + B (out x 4).
    adapters = 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert lora.trainable_count == adapters
    assert lora.param_count == full.param_count + adapters
    assert lora.static_bytes["weights"] == 4 * lora.param_count
    assert lora.static_bytes["gradients"] == 4 * adapters
    assert lora.static_bytes["optimizer"] == 8 * adapters + 4 * 8  # 8 adapter tensors
    assert full.static_bytes["optimizer"] > 50 * lora.static_bytes["optimizer"]


def test_hugging_face_model_traced_for_cuda_with_autocast():
    pytest.importorskip("transformers")
    traced = trace_step_memory(
        tiny_llama(), seq_len=64, device_type="cuda", mixed_precision="bf16", world_size=2
    )
    expected_on = "cuda" if torch.cuda.is_available() else "cpu"
    assert traced.traced_on == expected_on and traced.device_type == "cuda"
    assert traced.param_count == sum(p.numel() for p in tiny_llama()().parameters())
    # fp32 weights under autocast; foreach AdamW's temporaries show in the optimizer step.
    assert traced.param_dtype_bytes == 4 and traced.optimizer_step_bytes > 0
    assert traced.static_bytes["ddp_gradient_buckets"] == traced.static_bytes["gradients"]
    assert all(v % 512 == 0 for v in traced.static_bytes.values())  # CUDA allocator blocks
    u = traced.unseen
    assert u.cuda_context_bytes > 0 and u.nccl_bytes > 0 and u.prefetch_bytes_per_token > 0
    assert traced.device_peak_bytes(2) > traced.peak_bytes(2) * (1 + u.allocator_overhead_frac)
    assert traced.peak_bytes(1) < traced.peak_bytes(2) < traced.peak_bytes(4)


@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_match_deepspeeds_estimate(offload):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    world = 4
    traced = trace_step_memory(
        tiny_llama(vocab_size=1024, layers=4),
        seq_len=64,
        device_type="cpu",
        mixed_precision="bf16",
        zero_stage=2,
        offload_optimizer=offload,
        world_size=world,
    )
    p = traced.param_count
    assert p % world == 0 and traced.param_dtype_bytes == 2  # DeepSpeed's 16-bit weights
    cpu, gpu = estimate_zero2_model_states_mem_needs(
        p, num_gpus_per_node=world, cpu_offload=offload
    )
    static = dict(traced.static_bytes)
    assert static.pop("zero_reduce_buckets") == 2 * p * 2  # buckets larger than this model
    static.pop("buffers")
    assert sum(static.values()) == gpu
    if offload:
        # DeepSpeed's host figure is per node with a 1.5 buffer factor.
        assert world * traced.host_offload_bytes * 1.5 == cpu
        assert traced.optimizer_step_bytes == 0
    else:
        assert traced.host_offload_bytes == 0


def test_zero_needs_a_stage_for_offload_and_valid_micro_batches():
    with pytest.raises(ConfigError, match="offload needs ZeRO"):
        trace_step_memory(tiny(), seq_len=64, offload_optimizer=True)
    with pytest.raises(ConfigError, match="two or more distinct sizes"):
        trace_step_memory(tiny(), seq_len=64, micro_batches=(2, 2))


class LogitsLM(nn.Module):
    """A model that returns logits, not a loss."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)

    def forward(self, input_ids, position_ids=None, labels=None):
        return self.embed(input_ids)


class ItemLM(nn.Module):
    """A model whose forward reads a tensor's value, which fake tensors do not have."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)

    def forward(self, input_ids, position_ids=None, labels=None):
        h = self.embed(input_ids)
        return dataclasses.make_dataclass("Out", ["loss"])(h[: int(h.sum().item()) + 1].mean())


@pytest.mark.parametrize(
    ("factory", "cause"),
    [
        (lambda: nn.Linear(4, 4, device="cpu"), "put tensors on cpu"),
        (
            lambda: (_ for _ in ()).throw(OSError("no such file: weights.bin")),
            "factory failed on the meta device (OSError: no such file: weights.bin)",
        ),
        (lambda: "a model", "returned str"),
        (ItemLM, "cannot trace the model's training step on fake tensors"),
        (LogitsLM, "returned a tensor without a .loss tensor"),
        (lambda: nn.Linear(4, 4), "unexpected keyword argument 'input_ids'"),
    ],
)
def test_an_untraceable_model_gets_one_line_with_cause_and_remedy(factory, cause):
    with pytest.raises(ConfigError) as info:
        trace_step_memory(factory, seq_len=16, device_type="cpu")
    message = str(info.value)
    assert "\n" not in message and cause in message
    assert any(
        fix in message
        for fix in ("factory that builds the model from its config", "analytic estimate", "wrap it")
    )


def test_planner_record_is_a_line_above_every_traced_peak():
    traced = trace_step_memory(tiny(), seq_len=64, device_type="cuda")
    memory = traced.to_model_memory()
    assert memory.source == "trace" and memory.param_count == traced.param_count
    assert memory.trainable == traced.trainable_count
    static = sum(memory.static_device_bytes.values())
    for m in (1, 2, 3, 4, 8):
        line = static + memory.step_fixed_bytes + memory.activation_bytes_per_token * m * 64
        assert line >= traced.peak_bytes(m)


def test_calibration_from_synthetic_probe_readings():
    traced = trace_step_memory(tiny(), seq_len=64, device_type="cuda")
    readings = []
    for m, frac in ((1, 0.25), (4, 0.125)):
        allocated = traced.peak_bytes(m) + 96 * MiB
        reserved = int(allocated * (1 + frac))
        readings.append(ProbeReading(m, allocated, reserved, reserved + 400 * MiB))
    unseen = calibrate_unseen(traced, readings)
    assert unseen.source == "probe"
    assert unseen.workspace_bytes == 96 * MiB
    assert unseen.allocator_overhead_frac == pytest.approx(0.25, abs=1e-9)
    assert unseen.cuda_context_bytes == 400 * MiB
    calibrated = traced.with_unseen(unseen)
    prefetch = unseen.prefetch_bytes_per_token * 64
    assert calibrated.device_peak_bytes(1) == pytest.approx(
        readings[0].device_used_bytes + prefetch, abs=2
    )
    with pytest.raises(ConfigError, match="at most reserved"):
        calibrate_unseen(traced, [ProbeReading(1, 2 * MiB, MiB, 3 * MiB)])
    with pytest.raises(ConfigError, match="at least one probe reading"):
        calibrate_unseen(traced, [])


def test_a_1b_llama_traces_on_fake_tensors():
    # How long a trace takes is a benchmark figure (each plan's model_estimate note gives it),
    # not asserted here: this machine is shared and a wall-clock bound fails under load.
    transformers = pytest.importorskip("transformers")
    from trainer_low_mem.hf_model import HFCausalLM

    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    )
    traced = trace_step_memory(
        lambda: HFCausalLM(transformers.LlamaForCausalLM(config)),
        seq_len=1024,
        device_type="cuda",
        mixed_precision="bf16",
    )
    assert 1.0e9 < traced.param_count < 1.2e9
    assert traced.static_bytes["weights"] == pytest.approx(4 * traced.param_count, rel=1e-4)
    assert traced.activation_bytes_per_token > 0 and traced.linear
