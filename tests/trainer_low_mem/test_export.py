"""The export is a folder `transformers` loads, computing what the trained model computes."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest
import torch

from lowmem_core.errors import ConfigError
from pipeline.tokenizer import ByteTokenizer
from trainer_low_mem.config import CheckpointConfig, JobConfig, ModelConfig
from trainer_low_mem.export import export_model
from trainer_low_mem.model import build_model
from trainer_low_mem.models import DataFacts, resolve_model_kind
from trainer_low_mem.models.builtin import PresetKind

transformers = pytest.importorskip("transformers")
BYTE_DATA = DataFacts(
    path=Path("data"),
    vocab_size=259,
    bos_id=256,
    eos_id=257,
    pad_id=258,
    is_sft=False,
    token_bytes=0,
    index_bytes=None,
    tokenizer_dir=None,
)
TINY = PresetKind("tiny", grad_checkpointing=False)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))


def _randomise_adapters(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.05)


def _export(model, out: Path, data: DataFacts = BYTE_DATA, kind=TINY) -> Path:
    return export_model(kind, model, out, data, adapter_only=False)


def test_builtin_model_exports_as_llama_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    out = _export(model, tmp_path / "final")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    ids = _ids(259)
    torch.testing.assert_close(
        loaded(input_ids=ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5
    )


def test_builtin_lora_is_merged_into_the_export_and_the_live_model_is_untouched(tmp_path):
    pytest.importorskip("peft")
    kind = resolve_model_kind(ModelConfig(model_preset="tiny", lora_rank=4, lora_alpha=8.0))
    torch.manual_seed(0)
    model = kind.build(259, document_masking=False, weights=True).eval()
    _randomise_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = _export(model, tmp_path / "final", kind=kind)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(259)
    torch.testing.assert_close(
        loaded(input_ids=ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_byte_tokenizer_export_encodes_like_the_built_in_tokenizer(tmp_path):
    out = _export(build_model("tiny"), tmp_path / "f")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "héllo wörld\n\ttabs 🙂"
    assert tok(text)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert ByteTokenizer().decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_model_with_lora_exports_merged_and_as_adapter(tmp_path, arch):
    peft = pytest.importorskip("peft")
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    else:
        config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    lora = ModelConfig(model=tmp_path / "src", lora_rank=4, lora_alpha=8.0)
    kind = resolve_model_kind(lora)
    model = kind.build(96, document_masking=True, weights=True).eval()
    _randomise_adapters(model)
    ids = _ids(96)
    expected = model(ids).logits
    data = dataclasses.replace(BYTE_DATA, vocab_size=96)

    merged = _export(model, tmp_path / "final", data, kind)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)

    adapter = export_model(kind, model, tmp_path / "adapter", data, adapter_only=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
    torch.testing.assert_close(with_adapter(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_export_replaces_the_previous_one_and_is_world_readable(tmp_path):
    torch.manual_seed(0)
    out = _export(build_model("tiny"), tmp_path / "final")
    first = (out / "model.safetensors").read_bytes()
    torch.manual_seed(1)
    _export(build_model("tiny"), tmp_path / "final")
    assert (out / "model.safetensors").read_bytes() != first
    # A file the export did not write is kept and refused instead: test_export_safety.py.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    for item in out.iterdir():
        assert stat.S_IMODE(item.stat().st_mode) == 0o644


def test_tokenizer_files_are_copied_from_the_datasets_tokenizer_folder(tmp_path):
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    data = dataclasses.replace(BYTE_DATA, tokenizer_dir=tokenizer_dir)
    out = _export(build_model("tiny"), tmp_path / "final", data)
    assert (out / "tokenizer.json").read_text() == "{}"


def test_only_tokenizer_files_travel_from_a_model_folder(tmp_path):
    folder = tmp_path / "user_model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_text("{}")
    (folder / "config.json").write_text('{"model_type": "stale"}')
    (folder / "model.safetensors").write_bytes(b"stale weights")
    (folder / "notes.txt").write_text("not for the export")
    data = dataclasses.replace(BYTE_DATA, tokenizer_dir=folder)
    out = _export(build_model("tiny"), tmp_path / "final", data)
    assert (out / "tokenizer_config.json").read_text() == "{}"
    assert (out / "special_tokens_map.json").is_file() and not (out / "notes.txt").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "model.safetensors").read_bytes() != b"stale weights"


def test_adapter_only_needs_lora_on_a_hugging_face_model(tmp_path):
    with pytest.raises(ConfigError, match="needs --lora_rank and a Hugging Face --model"):
        JobConfig(
            model=ModelConfig(model_preset="tiny", lora_rank=4),
            checkpoint=CheckpointConfig(export_adapter_only=True),
        )
    pytest.importorskip("peft")
    kind = resolve_model_kind(ModelConfig(model_preset="tiny", lora_rank=4))
    model = kind.build(259, document_masking=False, weights=True)
    with pytest.raises(ConfigError, match="needs a Hugging Face --model"):
        export_model(kind, model, tmp_path / "f", BYTE_DATA, adapter_only=True)
    assert list(tmp_path.iterdir()) == []


def test_a_model_folder_exports_its_own_tokenizer_before_the_datasets(tmp_path):
    config = transformers.GPT2Config(vocab_size=96, n_embd=16, n_layer=1, n_head=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    dataset_tokenizer = tmp_path / "tok"
    dataset_tokenizer.mkdir()
    (dataset_tokenizer / "tokenizer.json").write_text('{"from": "dataset"}')
    data = dataclasses.replace(BYTE_DATA, vocab_size=96, tokenizer_dir=dataset_tokenizer)
    kind = resolve_model_kind(ModelConfig(model=tmp_path / "src"))
    model = kind.build(96, document_masking=True, weights=True)
    out = _export(model, tmp_path / "without", data, kind)
    assert (out / "tokenizer.json").read_text() == '{"from": "dataset"}'
    (tmp_path / "src" / "tokenizer.json").write_text('{"from": "model"}')
    out = _export(model, tmp_path / "with", data, kind)
    assert (out / "tokenizer.json").read_text() == '{"from": "model"}'
