"""Quantised (4-bit / 8-bit) models in the planner: the stand-ins' bytes equal bitsandbytes'
storage exactly, a traced step matches a real one, and the QLoRA job users run on a 16 GiB card
fits with its parts named."""

from __future__ import annotations

import json

import pytest

from trainer_low_mem.planner.model_memory import QuantisedWeights

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

GiB = 1 << 30
QWEN15_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "dtype": "bfloat16",
}
USER_FLAGS = (
    "--lora_rank 32 --load_in_4bit True --max_seq_len 1024 --global_batch 16 --world_size 1 "
    "--device_budget 16GiB --mixed_precision bf16 --grad_checkpointing True --host_ram_limit 32GiB"
)


def tiny_llama_folder(tmp_path, weights: bool):
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    folder = tmp_path / "llama"
    if weights:
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    return folder


def quantised_kind(folder, bits: int, grad_checkpointing: bool = False):
    from trainer_low_mem.config import ModelConfig
    from trainer_low_mem.models import resolve_model_kind

    model = ModelConfig(
        model=folder,
        lora_rank=4,
        grad_checkpointing=grad_checkpointing,
        **{f"load_in_{bits}bit": True},
    )
    return resolve_model_kind(model, "bf16")


def storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def real_quantised_parts(model) -> dict[str, int]:
    """Bytes bitsandbytes holds for a real quantised model, by the planner's categories."""
    import bitsandbytes as bnb

    packed, state, seen = [], [], set()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) and id(module) not in seen:
            seen.add(id(module))
            packed.append(module.weight)
            qs = getattr(module.weight, "quant_state", None)
            if qs is not None:
                state += [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
            else:
                state.append(module.weight.SCB if module.state.SCB is None else module.state.SCB)
    ids = {id(t) for t in packed}
    others = [p for p in model.parameters() if id(p) not in ids]
    return {
        "quantised_weights": storage_bytes(packed),
        "quant_state": storage_bytes(state),
        "weights": storage_bytes(others),
    }


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_bytes_equal_the_real_bitsandbytes_model_exactly(tmp_path, bits):
    from trainer_low_mem.planner.trace import trace_step_memory

    folder = tiny_llama_folder(tmp_path, weights=True)
    kind = quantised_kind(folder, bits)
    real = real_quantised_parts(kind.build(512, document_masking=True, weights=True))
    traced = trace_step_memory(
        lambda: kind.build(512, document_masking=True, weights=False),
        seq_len=32,
        device_type="cpu",
    )
    for category, nbytes in real.items():
        assert traced.static_bytes[category] == nbytes, category
    counted = kind.shape(512).quantised_weights
    assert counted == traced.quantised
    assert (counted.weight_bytes, counted.state_bytes) == (
        real["quantised_weights"],
        real["quant_state"],
    )
    # Every linear layer but the head: 7 per layer (q, k, v, o, gate, up, down).
    assert len(counted.linear_shapes) == 2 * 7
    assert traced.param_count == sum(p.numel() for p in kind.shape(512).parameters())


@pytest.mark.parametrize("bits", [4, 8])
def test_a_traced_quantised_step_matches_a_real_one(tmp_path, bits):
    from bench.plan_check import Case, real_peak_bytes
    from trainer_low_mem.planner.trace import trace_step_memory

    folder = tiny_llama_folder(tmp_path, weights=True)
    kind = quantised_kind(folder, bits, grad_checkpointing=True)
    case = Case(
        f"{bits}bit",
        lambda: kind.build(512, document_masking=True, weights=False),
        512,
        64,
        (1, 3),
        "bf16",
        real_factory=lambda: kind.build(512, document_masking=True, weights=True),
    )
    traced = trace_step_memory(case.factory, seq_len=64, device_type="cpu", mixed_precision="bf16")
    for m in case.real_micro_batches:
        assert traced.peak_bytes(m) == pytest.approx(real_peak_bytes(case, m), rel=0.05)


def test_quantised_weights_are_counted_as_bitsandbytes_stores_them():
    # One 4096 x 11008 layer: 64-weight blocks -> 704,512 uint8 absmax, 2,752 fp32 nested absmax.
    four = QuantisedWeights("4bit", ((4096, 11008),), 2)
    assert four.weight_bytes == 4096 * 11008 // 2
    assert four.state_bytes == 704_512 + 4 * (2_752 + 16 + 256 + 1)
    assert four.dequant_transient_bytes == 4096 * 11008 * 2 + 4 * 704_512
    eight = QuantisedWeights("8bit", ((4096, 11008),), 2)
    assert (eight.weight_bytes, eight.state_bytes) == (4096 * 11008, 4 * 4096)
    assert eight.dequant_transient_bytes == 4096 * 11008 * 2


def qwen_7b_folder(tmp_path):
    folder = tmp_path / "qwen15-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN15_7B))
    return folder


@pytest.mark.slow  # builds the 7B model on the meta device with its adapters
def test_the_7b_qlora_job_fits_16gib_by_the_analytic_count(tmp_path):
    from trainer_low_mem.cli import parse_plan_config
    from trainer_low_mem.job import build_job
    from trainer_low_mem.launch import Launch
    from trainer_low_mem.planner import plan_for_job

    cfg = parse_plan_config(f"--model {qwen_7b_folder(tmp_path)} {USER_FLAGS}".split())
    launch = Launch.from_flags(cfg.launch, cfg.training.mixed_precision)
    job = build_job(cfg, launch, vocab_size=cfg.vocab_size)
    shape = job.kind.shape(job.vocab_size)
    result = plan_for_job(cfg, shape, world_size=1, device="cuda", num_cores=2)
    static = result.reasons["model_estimate"].numbers
    q = shape.quantised_weights
    assert (q.mode, len(q.linear_shapes), q.quantised_params) == ("4bit", 224, 6_476_005_376)
    assert static["quantised_weights_bytes"] == 6_476_005_376 // 2
    # Embeddings, the untied head, norms and the q/k/v biases in bf16, and the fp32 adapters.
    adapters = shape.trainable_param_count()
    norms_and_biases = 65 * 4096 + 32 * 3 * 4096
    assert static["unquantised_bytes"] == 2 * (2 * 151936 * 4096 + norms_and_biases) + 4 * adapters
    assert result.device_peak_bytes_planned <= 16 * GiB
    assert result.micro_batch_per_rank >= 1


@pytest.mark.slow  # a 7B trace: under a minute on 2 cores
def test_the_7b_qlora_job_traces_and_fits_16gib_with_its_parts_named(tmp_path, capsys):
    from trainer_low_mem.cli import plan_main

    plan_main(f"--model {qwen_7b_folder(tmp_path)} {USER_FLAGS} --json True".split())
    plan = json.loads(capsys.readouterr().out)
    estimate = plan["reasons"]["model_estimate"]
    assert estimate["value"] == "trace"
    numbers = estimate["numbers"]
    assert numbers["quantised_weights_bytes"] == 6_476_005_376 // 2
    assert numbers["quant_layers"] == 224
    assert numbers["dequant_bytes"] == 4096 * 11008 * 2 + 4 * 4096 * 11008 // 64
    assert plan["device_peak_bytes_planned"] <= 16 * GiB
