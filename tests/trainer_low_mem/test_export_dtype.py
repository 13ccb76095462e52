"""The export is written in the source's dtype (or --export_dtype) with the source's `use_cache`,
loads with transformers and computes the trained model's logits within that dtype's tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowmem_core.errors import ConfigError
from trainer_low_mem.cli import parse_job_config
from trainer_low_mem.config import ModelConfig
from trainer_low_mem.export import export_model
from trainer_low_mem.loop import train
from trainer_low_mem.models import DataFacts, resolve_model_kind
from trainer_low_mem.sample_model import write_sample_model
from trainer_low_mem.seq2seq import write_sample_t5

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Logits of a model rounded to the dtype against the float32 model: within this share of the
# largest logit (bf16 keeps 8 bits of mantissa, fp16 11).
LOGIT_TOLERANCE = {"float32": 1e-5, "bfloat16": 0.03, "float16": 0.005}


def _resave(folder: Path, auto, dtype: torch.dtype, **config_changes) -> Path:
    """`folder`'s model saved again in `dtype` (as a bf16 hub download is), config changed."""
    model = auto.from_pretrained(folder, dtype=torch.float32)
    for key, value in config_changes.items():
        setattr(model.config, key, value)
    model.to(dtype).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16(tmp_path_factory, build_sample_sft) -> dict[str, Path]:
    """A bf16 Llama folder (weights 2 bytes each, config dtype bfloat16) and its SFT data."""
    root = tmp_path_factory.mktemp("bf16")
    model = _resave(
        write_sample_model(root / "model"), transformers.AutoModelForCausalLM, torch.bfloat16
    )
    return build_sample_sft(root, model, num_train=24, num_eval=2)


def _train(model: Path, data: Path, out: Path, *extra: str):
    flags = [
        "--model", str(model), "--data", str(data), "--output_dir", str(out),
        "--max_seq_len", "128", "--auto_plan=False", "--batch_size_per_gpu", "2",
        "--gradient_accumulation_steps", "1", "--max_steps", "1", "--save_every", "0",
        "--num_readers", "1", "--progress_bar=False", *extra,
    ]  # fmt: skip
    return train(parse_job_config(flags))


def _weights(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype ("BF16", ...) in the folder's model.safetensors."""
    with safe_open(folder / "model.safetensors", framework="pt") as fh:
        return {key: fh.get_slice(key).get_dtype() for key in fh.keys()}  # noqa: SIM118


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_a_bf16_folder_trains_and_exports_bf16_with_its_use_cache(bf16, tmp_path):
    result = _train(bf16["model"], bf16["train_data"], tmp_path / "out")
    final = result.export_dir
    config = _config(final)
    assert (config["dtype"], config["use_cache"]) == ("bfloat16", True)
    source = _weights(bf16["model"])
    assert _weights(final) == source  # every tensor bf16, the tied head written once
    size = (final / "model.safetensors").stat().st_size
    assert size <= 1.01 * (bf16["model"] / "model.safetensors").stat().st_size
    loaded = transformers.AutoModelForCausalLM.from_pretrained(final)
    assert loaded.dtype == torch.bfloat16 and loaded.config.use_cache is True


def test_without_a_dtype_in_config_the_weights_decide(bf16, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for item in bf16["model"].iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    config = _config(model)
    del config["dtype"]
    (model / "config.json").write_text(json.dumps(config))
    final = _train(model, bf16["train_data"], tmp_path / "out").export_dir
    assert set(_weights(final).values()) == {"BF16"} and _config(final)["dtype"] == "bfloat16"


def test_export_dtype_overrides_the_source(bf16, tmp_path):
    final = _train(
        bf16["model"], bf16["train_data"], tmp_path / "out", "--export_dtype", "float32"
    ).export_dir
    assert set(_weights(final).values()) == {"F32"} and _config(final)["dtype"] == "float32"


def test_a_source_without_the_cache_keeps_it_off(bf16, tmp_path):
    model = tmp_path / "model"
    write_sample_model(model)
    _resave(model, transformers.AutoModelForCausalLM, torch.float32, use_cache=False)
    final = _train(model, bf16["train_data"], tmp_path / "out").export_dir
    assert (_config(final)["use_cache"], _config(final)["dtype"]) == (False, "float32")


def test_adapter_only_takes_no_export_dtype():
    argv = ["--model", "m", "--lora_rank", "4", "--export_adapter_only"]
    with pytest.raises(ConfigError, match="--export_dtype bfloat16 applies to merged weights"):
        parse_job_config([*argv, "--export_dtype", "bfloat16"])
    assert parse_job_config(argv).checkpoint.export_dtype == "auto"


# -- the exported model computes the trained model's logits -----------------------------------
def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every weight moved, as training would (LoRA adapters included)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.add_(0.02 * noise)
    return module.eval()


def _data(vocab: int, tokenizer_dir: Path | None) -> DataFacts:
    return DataFacts(
        path=Path("data"),
        vocab_size=vocab,
        bos_id=None,
        eos_id=1,
        pad_id=0,
        is_sft=True,
        token_bytes=0,
        index_bytes=None,
        tokenizer_dir=tokenizer_dir,
    )


@pytest.fixture(scope="module")
def bf16_t5(tmp_path_factory) -> Path:
    folder = write_sample_t5(tmp_path_factory.mktemp("t5") / "t5")
    return _resave(folder, transformers.AutoModelForSeq2SeqLM, torch.bfloat16)


CASES = [
    # (case id, model, LoRA rank, --export_dtype, the dtype the export must have)
    ("llama-bf16-auto", "llama", None, "auto", "bfloat16"),
    ("llama-bf16-lora-auto", "llama", 4, "auto", "bfloat16"),
    ("llama-bf16-as-fp16", "llama", None, "float16", "float16"),
    ("t5-bf16-auto", "t5", None, "auto", "bfloat16"),
    ("preset-auto", "tiny", None, "auto", "float32"),
    ("preset-as-bf16", "tiny", None, "bfloat16", "bfloat16"),
]
SAFETENSORS_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@pytest.mark.parametrize(
    ("model_name", "lora_rank", "export_dtype", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_the_export_computes_the_trained_models_logits(
    bf16, bf16_t5, tmp_path, model_name, lora_rank, export_dtype, expected
):
    if lora_rank is not None:
        pytest.importorskip("peft")
    folder = {"llama": bf16["model"], "t5": bf16_t5}.get(model_name)
    which = {"model_preset": model_name} if folder is None else {"model": folder}
    kind = resolve_model_kind(ModelConfig(**which, lora_rank=lora_rank))
    kind = kind.with_export_dtype(export_dtype)
    vocab = 259 if folder is None else kind.vocab_size
    torch.manual_seed(0)
    model = _perturbed(kind.build(vocab, document_masking=False, weights=True))
    out = export_model(kind, model, tmp_path / "final", _data(vocab, None), adapter_only=False)
    assert _config(out)["dtype"] == expected
    assert set(_weights(out).values()) == {SAFETENSORS_NAMES[expected]}
    ids = torch.randint(2, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if model_name == "t5":
            decoder_ids = ids[:, :7]
            trained = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
            loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
            exported = loaded(input_ids=ids, decoder_input_ids=decoder_ids).logits
        else:
            trained = model(ids).logits
            loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
            exported = loaded(input_ids=ids).logits
    assert loaded.dtype == DTYPES[expected]
    atol = LOGIT_TOLERANCE[expected] * float(trained.abs().max())
    torch.testing.assert_close(exported.float(), trained, rtol=0, atol=atol)
    # The live model is untouched by the export: it keeps training in float32.
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_tied_weights_are_written_once_whatever_the_dtype(tmp_path):
    kind = resolve_model_kind(ModelConfig(model=write_sample_model(tmp_path / "m")))
    model = kind.build(kind.vocab_size, document_masking=False, weights=True)
    data = _data(kind.vocab_size, None)
    for dtype in ("float32", "bfloat16"):
        out = export_model(
            kind.with_export_dtype(dtype), model, tmp_path / dtype, data, adapter_only=False
        )
        assert "lm_head.weight" not in _weights(out), dtype
