"""A LoRA run's frozen base is loaded and kept in --mixed_precision's dtype (fp32 adapters train
on it), by `train` and by the planner's meta build alike; full fine-tuning and
--mixed_precision no keep fp32; a resume with another base dtype is refused; the merged export
adds each adapter to its weight in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from lowmem_core.errors import CheckpointError
from trainer_low_mem import loop
from trainer_low_mem.cli import parse_job_config, parse_plan_config, plan_from_config
from trainer_low_mem.config import ModelConfig
from trainer_low_mem.export import merged_state_dict
from trainer_low_mem.models import is_adapter, resolve_model_kind
from trainer_low_mem.planner.load_memory import load_private_bytes
from trainer_low_mem.sample_model import write_sample_model
from trainer_low_mem.seq2seq import write_sample_t5

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_dtype")
    return {
        "causal": write_sample_model(root / "llama"),
        "seq2seq": write_sample_t5(root / "t5"),
    }


def _dtypes(module: torch.nn.Module, base: torch.dtype) -> tuple[set, set]:
    """(dtypes of the frozen parameters, dtypes of the adapters), the layers transformers keeps
    in fp32 under fp16 (T5's `wo`, for its range) left out."""
    kept = getattr(module.hf_model, "_keep_in_fp32_modules", None) or []
    frozen, adapters = set(), set()
    for name, param in module.named_parameters():
        assert param.requires_grad == is_adapter(name), name
        if is_adapter(name):
            adapters.add(param.dtype)
        elif base == torch.float16 and any(f".{k}." in name for k in kept):
            assert param.dtype == torch.float32, name
        else:
            frozen.add(param.dtype)
    return frozen, adapters


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
@pytest.mark.parametrize(
    ("precision", "base"),
    [("bf16", torch.bfloat16), ("fp16", torch.float16), ("no", torch.float32)],
)
@pytest.mark.parametrize("weights", [True, False], ids=["train", "plan"])
def test_a_lora_base_is_kept_in_the_compute_dtype(folders, family, precision, base, weights):
    kind = resolve_model_kind(ModelConfig(model=folders[family], lora_rank=4), precision)
    if weights:
        module = kind.build(kind.vocab_size, document_masking=True, weights=True)
    else:  # the planner's trace builds it so, on the meta device
        with torch.device("meta"):
            module = kind.build(kind.vocab_size, document_masking=True, weights=False)
    assert _dtypes(module, base) == ({base}, {torch.float32})


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_full_fine_tuning_keeps_fp32_master_weights(folders, family):
    kind = resolve_model_kind(ModelConfig(model=folders[family]), "bf16")
    module = kind.build(kind.vocab_size, document_masking=True, weights=True)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert "base_dtype" not in kind.identity(kind.vocab_size)


def test_the_identity_records_a_base_dtype_other_than_fp32(folders):
    lora = ModelConfig(model=folders["causal"], lora_rank=4)
    assert resolve_model_kind(lora, "bf16").identity(512)["base_dtype"] == "bfloat16"
    assert "base_dtype" not in resolve_model_kind(lora, "no").identity(512)


def test_the_merge_adds_the_adapter_in_fp32(folders):
    kind = resolve_model_kind(ModelConfig(model=folders["causal"], lora_rank=4), "bf16")
    module = kind.build(kind.vocab_size, document_masking=True, weights=True)
    hf = module.hf_model
    layer = hf.model.layers[0].self_attn.q_proj
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=1e-3)  # a small delta, as after training
    expected = layer.base_layer.weight.float() + layer.get_delta_weight("default").float()
    merged = merged_state_dict(hf, torch.float32)["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(merged, expected)
    # Added in bf16, most of the delta would round away.
    in_bf16 = layer.base_layer.weight + layer.get_delta_weight("default").bfloat16()
    assert not torch.equal(in_bf16.float(), expected)


@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory, build_sample_sft) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_dtype_run")
    return build_sample_sft(root, write_sample_model(root / "model"), num_train=96, num_eval=4)


def _train(inputs: dict[str, Path], out: Path, precision: str, *extra: str):
    # accelerate keeps one state per process; each `train` here is a new process's.
    AcceleratorState._reset_state(reset_partial_state=True)
    config = parse_job_config(
        ["--model", str(inputs["model"]), "--data", str(inputs["train_data"])]
        + ["--eval_data", str(inputs["eval_data"]), "--eval_every", "2"]
        + ["--output_dir", str(out), "--lora_rank", "4", "--max_seq_len", "128"]
        + ["--global_batch", "4", "--max_steps", "4", "--lr", "3e-3", "--warmup_steps", "1"]
        + ["--num_readers", "1", "--progress_bar=False", "--mixed_precision", precision]
        + list(extra)
    )
    return loop.train(config)


def test_a_bf16_base_trains_evaluates_and_resumes_bit_equal(
    lora_inputs, tmp_path, monkeypatch, stop_after_step
):
    straight = _train(lora_inputs, tmp_path / "straight", "bf16")
    assert all(torch.isfinite(torch.tensor(straight.losses)))
    with monkeypatch.context() as patch:
        stop_after_step(patch, 2)
        first = _train(lora_inputs, tmp_path / "run", "bf16")
    assert first.final_step == 2
    resumed = _train(lora_inputs, tmp_path / "run", "bf16", "--is_keep_training=True")
    assert first.losses + resumed.losses == straight.losses  # exact float equality
    # The resume with an fp32 base is refused in one line naming the field.
    with pytest.raises(CheckpointError, match=r"model\.base_dtype: saved 'bfloat16', now None"):
        _train(lora_inputs, tmp_path / "run", "no", "--is_keep_training=True", "--max_steps", "6")


def test_plan_counts_a_half_precision_base_as_mapped_at_load(folders):
    kind = resolve_model_kind(ModelConfig(model=folders["causal"], lora_rank=4), "bf16")
    with torch.device("meta"):
        module = kind.build(kind.vocab_size, document_masking=True, weights=False)
    params = [p for p in module.parameters()]
    total = sum(p.numel() for p in params)
    half = sum(p.numel() for p in params if p.dtype == torch.bfloat16)
    flags = ["--model", str(folders["causal"]), "--lora_rank", "4", "--max_seq_len", "128"]
    flags += ["--global_batch", "4", "--device_budget", str(8 << 30), "--host_ram_limit"]
    flags += [str(16 << 30), "--num_cores", "2"]
    bf16 = plan_from_config(parse_plan_config([*flags, "--mixed_precision", "bf16"]))
    fp32 = plan_from_config(parse_plan_config([*flags, "--mixed_precision", "no"]))
    assert bf16.footprint.load_bytes == load_private_bytes(total, half) == (total - half) * 5 + half
    assert fp32.footprint.load_bytes == load_private_bytes(total) == total * 5
