"""The model's memory: the analytic count's formula, what autograd really keeps, ModelShape."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowmem_core.errors import ConfigError
from trainer_low_mem.model import ModelPreset, build_model
from trainer_low_mem.planner import ModelMemory, analytic_model_memory

SHAPE = ModelPreset(vocab_size=259, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=512)


def test_analytic_activation_bytes_follow_the_documented_formula():
    # d=64, h=4, f=256, b=2: norm = 4d + 4 + 2bd = 516; layer = 2*516 + 7bd + 4h + 2bf = 2968;
    # head = 516 + bd + 8 + 24 = 676; per token = 2 layers kept + 1 backward layer + head.
    m = analytic_model_memory(SHAPE, seq_len=128, dtype_bytes=2, loss_chunk_tokens=1024)
    assert m.activation_bytes_per_token == 3 * 2968 + 676
    assert m.step_fixed_bytes == 4 * 259 * 64 + 1024 * 259 * (2 * 2 + 4)
    assert (m.param_count, m.trainable, m.d_model, m.source) == (
        SHAPE.param_count(),
        SHAPE.param_count(),
        64,
        "analytic",
    )
    ckpt = analytic_model_memory(
        SHAPE, seq_len=128, dtype_bytes=2, loss_chunk_tokens=1024, grad_checkpointing=True
    )
    assert ckpt.activation_bytes_per_token == 2 * 128 + 2 * 2968 + 676


def test_the_shape_trainable_count_reaches_the_memory_model():
    @dataclasses.dataclass(frozen=True)
    class Adapted(ModelPreset):
        def trainable_param_count(self) -> int:
            return 1000

    m = analytic_model_memory(Adapted(**dataclasses.asdict(SHAPE)), seq_len=128)
    assert (m.param_count, m.trainable_count, m.trainable) == (SHAPE.param_count(), 1000, 1000)


def test_analytic_estimate_covers_what_autograd_keeps_for_the_tiny_model():
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
    estimate = analytic_model_memory(preset, seq_len, dtype_bytes=4)
    # The estimate is what autograd keeps plus one layer of backward working set: above, within 60%.
    assert saved_per_token <= estimate.activation_bytes_per_token <= 1.6 * saved_per_token


def test_a_trace_record_is_a_model_memory():
    record = {
        "param_count": 1000,
        "trainable_count": 10,
        "param_dtype_bytes": 4,
        "static_device_bytes": {"parameters": 4000, "gradients": 40},
        "host_offload_bytes": 0,
        "activation_bytes_per_token": 12,
        "step_fixed_bytes": 100,
        "source": "trace",
    }
    m = ModelMemory(**record)
    assert (m.trainable, m.source) == (10, "trace")


def test_impossible_model_memory_is_a_config_error():
    with pytest.raises(ConfigError, match="activation_bytes_per_token must be a positive integer"):
        ModelMemory(param_count=10, activation_bytes_per_token=0)
    with pytest.raises(ConfigError, match="param_dtype_bytes must be 2"):
        ModelMemory(param_count=10, activation_bytes_per_token=1, param_dtype_bytes=8)
    with pytest.raises(ConfigError, match=r"trainable_count must be in \[1, param_count=10\]"):
        ModelMemory(param_count=10, activation_bytes_per_token=1, trainable_count=11)
    with pytest.raises(ConfigError, match="source must be one of"):
        ModelMemory(param_count=10, activation_bytes_per_token=1, source="guess")
    with pytest.raises(ConfigError, match="seq_len must be a positive integer"):
        analytic_model_memory(SHAPE, seq_len=0)


def test_the_hugging_face_adapter_is_a_model_shape():
    transformers = pytest.importorskip("transformers")
    from trainer_low_mem.hf_model import HFCausalLM

    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    model = HFCausalLM(transformers.AutoModelForCausalLM.from_config(config))
    assert (model.n_layers, model.d_model, model.n_heads, model.d_ff, model.vocab_size) == (
        2,
        64,
        4,
        128,
        300,
    )
    assert (
        model.param_count()
        == model.trainable_param_count()
        == sum(p.numel() for p in model.parameters())
    )
    m = analytic_model_memory(model, seq_len=64)
    assert m.param_count == model.param_count()
