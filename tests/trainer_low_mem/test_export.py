"""The export is a folder `transformers` loads, computing what the trained model computes."""

from __future__ import annotations

import json
import stat

import pytest
import torch

from lowmem_core.errors import ConfigError
from pipeline.tokenizer import ByteTokenizer
from trainer_low_mem.export import export_model
from trainer_low_mem.hf_model import load_model_folder
from trainer_low_mem.lora import LoraSettings, apply_lora
from trainer_low_mem.model import build_model

transformers = pytest.importorskip("transformers")
BYTE_IDS = {"bos_id": 256, "eos_id": 257, "pad_id": 258}


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))


def _randomise_adapters(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.05)


def test_builtin_model_exports_as_llama_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    out = export_model(model, tmp_path / "final", special_ids=BYTE_IDS, tokenizer_dir=None)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    ids = _ids(259)
    torch.testing.assert_close(
        loaded(input_ids=ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5
    )


def test_builtin_lora_is_merged_into_the_export_and_the_live_model_is_untouched(tmp_path):
    torch.manual_seed(0)
    model = apply_lora(build_model("tiny"), LoraSettings(4, 8.0, 0.0, None)).eval()
    _randomise_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export_model(model, tmp_path / "final", special_ids=BYTE_IDS, tokenizer_dir=None)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(259)
    torch.testing.assert_close(
        loaded(input_ids=ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_byte_tokenizer_export_encodes_like_the_built_in_tokenizer(tmp_path):
    out = export_model(
        build_model("tiny"), tmp_path / "f", special_ids=BYTE_IDS, tokenizer_dir=None
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "héllo wörld\n\ttabs 🙂"
    assert tok(text)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert ByteTokenizer().decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_model_with_lora_exports_merged_and_as_adapter(tmp_path, arch):
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
    model = apply_lora(load_model_folder(tmp_path / "src"), LoraSettings(4, 8.0, 0.0, None)).eval()
    _randomise_adapters(model)
    ids = _ids(96)
    expected = model(ids).logits

    merged = export_model(model, tmp_path / "final", special_ids={}, tokenizer_dir=None)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)

    adapter = export_model(
        model, tmp_path / "adapter", special_ids={}, tokenizer_dir=None, adapter_only=True
    )
    import peft

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
    torch.testing.assert_close(with_adapter(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_export_replaces_the_previous_one_and_is_world_readable(tmp_path):
    model = build_model("tiny")
    out = export_model(model, tmp_path / "final", special_ids=BYTE_IDS, tokenizer_dir=None)
    (out / "stale.txt").write_text("from the previous export")
    export_model(model, tmp_path / "final", special_ids=BYTE_IDS, tokenizer_dir=None)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    for item in out.iterdir():
        assert stat.S_IMODE(item.stat().st_mode) == 0o644


def test_tokenizer_files_are_copied_from_the_given_folder(tmp_path):
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    out = export_model(
        build_model("tiny"), tmp_path / "final", special_ids=BYTE_IDS, tokenizer_dir=tokenizer_dir
    )
    assert (out / "tokenizer.json").read_text() == "{}"


def test_only_tokenizer_files_travel_from_a_model_folder(tmp_path):
    folder = tmp_path / "user_model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_text("{}")
    (folder / "config.json").write_text('{"model_type": "stale"}')
    (folder / "model.safetensors").write_bytes(b"stale weights")
    (folder / "notes.txt").write_text("not for the export")
    out = export_model(
        build_model("tiny"), tmp_path / "final", special_ids=BYTE_IDS, tokenizer_dir=folder
    )
    assert (out / "tokenizer_config.json").read_text() == "{}"
    assert (out / "special_tokens_map.json").is_file() and not (out / "notes.txt").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "model.safetensors").read_bytes() != b"stale weights"


def test_adapter_only_without_lora_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs LoRA on a Hugging Face"):
        export_model(
            build_model("tiny"),
            tmp_path / "f",
            special_ids=BYTE_IDS,
            tokenizer_dir=None,
            adapter_only=True,
        )
    assert list(tmp_path.iterdir()) == []
