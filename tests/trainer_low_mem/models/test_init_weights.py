"""`--init_from`: a new run starts from an export or a training state of the same architecture,
any model kind; anything else is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowmem_core.errors import ConfigError
from trainer_low_mem.config import ModelConfig
from trainer_low_mem.export import export_model
from trainer_low_mem.models import DataFacts, resolve_model_kind
from trainer_low_mem.models.init_weights import load_initial_weights

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


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def _build(model: ModelConfig, vocab: int = 259, seed: int = 0):
    """(kind, model) as the trainer builds them, weights seeded."""
    kind = resolve_model_kind(model)
    torch.manual_seed(seed)
    return kind, kind.build(vocab, document_masking=False, weights=True)


def _initialised(model: ModelConfig, source: Path, vocab: int = 259) -> torch.nn.Module:
    """A freshly built model (other seed) with the weights of `source` loaded."""
    kind, module = _build(model, vocab, seed=2)
    load_initial_weights(kind, module, source)
    return module


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_init_from_an_export_of_the_builtin_model_restores_its_logits(tmp_path):
    tiny = ModelConfig(model_preset="tiny")
    kind, trained = _build(tiny, seed=1)
    export_model(kind, trained.eval(), tmp_path / "final", BYTE_DATA, adapter_only=False)
    restored = _initialised(tiny, tmp_path / "final").eval()
    ids = _ids(259)
    torch.testing.assert_close(restored(ids).logits, trained(ids).logits)


def test_init_from_a_training_state_and_from_an_hf_export(tmp_path, llama_dir):
    tiny = ModelConfig(model_preset="tiny")
    _, trained = _build(tiny, seed=1)
    (tmp_path / "state").mkdir()
    save_file(trained.state_dict(), tmp_path / "state" / "model.safetensors")
    restored = _initialised(tiny, tmp_path / "state")
    assert all(
        torch.equal(a, b) for a, b in zip(restored.parameters(), trained.parameters(), strict=True)
    )

    scratch = ModelConfig(model=llama_dir, from_scratch=True, init_from=llama_dir)
    restored = _initialised(scratch, llama_dir, vocab=96).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = _ids(96)
    torch.testing.assert_close(restored(ids).logits, original(input_ids=ids).logits)


def test_a_lora_run_starts_from_the_base_weights_of_an_export_or_a_state(tmp_path, llama_dir):
    # Fresh adapters add nothing (peft's B starts at zero): the logits are the source model's.
    pytest.importorskip("peft")
    kind, trained = _build(ModelConfig(model_preset="tiny"), seed=1)
    export_model(kind, trained.eval(), tmp_path / "final", BYTE_DATA, adapter_only=False)
    (tmp_path / "state").mkdir()
    save_file(trained.state_dict(), tmp_path / "state" / "model.safetensors")
    lora = ModelConfig(model_preset="tiny", lora_rank=2)
    ids = _ids(259)
    for source in (tmp_path / "final", tmp_path / "state"):
        restored = _initialised(lora, source).eval()
        torch.testing.assert_close(restored(ids).logits, trained(ids).logits)

    hf_lora = ModelConfig(model=llama_dir, from_scratch=True, lora_rank=2)
    restored = _initialised(hf_lora, llama_dir, vocab=96).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = _ids(96)
    torch.testing.assert_close(restored(ids).logits, original(input_ids=ids).logits)


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda tmp: tmp / "nope", "is not a folder"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "holds no .safetensors"),
    ],
)
def test_bad_init_from_folders(tmp_path, make, named):
    with pytest.raises(ConfigError, match=named):
        _initialised(ModelConfig(model_preset="tiny"), make(tmp_path))


def test_init_from_another_architecture_or_lora_state_is_refused(tmp_path):
    tiny = ModelConfig(model_preset="tiny")
    _, small = _build(tiny, vocab=300, seed=1)
    (tmp_path / "other").mkdir()
    save_file(small.state_dict(), tmp_path / "other" / "model.safetensors")
    with pytest.raises(ConfigError, match="has shape"):
        _initialised(tiny, tmp_path / "other")
    pytest.importorskip("peft")
    _, lora = _build(ModelConfig(model_preset="tiny", lora_rank=2), seed=1)
    (tmp_path / "lora").mkdir()
    save_file(
        {k: v.contiguous() for k, v in lora.state_dict().items()},
        tmp_path / "lora" / "model.safetensors",
    )
    with pytest.raises(ConfigError, match="holds LoRA adapters"):
        _initialised(tiny, tmp_path / "lora")
