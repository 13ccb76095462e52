"""The job's model: preset or the user's folder, checked against the data, init weights, LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowmem_core.errors import ConfigError
from trainer_low_mem.config import ModelConfig
from trainer_low_mem.export import export_model
from trainer_low_mem.model_setup import DataFacts, build_job_model

transformers = pytest.importorskip("transformers")


def _facts(vocab: int = 259, eos: int = 257, sft: bool = False) -> DataFacts:
    return DataFacts(Path("data"), vocab, None, eos, eos, sft, None)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def test_preset_takes_the_dataset_vocabulary_and_masking_follows_the_data_kind():
    job = build_job_model(ModelConfig(model_preset="tiny"), _facts(vocab=300))
    assert job.model.embed.weight.shape[0] == 300
    assert not job.document_masking
    assert build_job_model(ModelConfig(model_preset="tiny"), _facts(sft=True)).document_masking
    forced = build_job_model(ModelConfig(model_preset="tiny", document_masking=True), _facts())
    assert forced.document_masking and forced.model.document_masking
    assert job.trainable_params == job.total_params


def test_lora_leaves_only_adapters_trainable():
    job = build_job_model(ModelConfig(model_preset="tiny", lora_rank=2), _facts())
    assert 0 < job.trainable_params < job.total_params
    assert "LoRA rank 2" in job.description


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


def test_a_model_folder_is_checked_against_the_dataset(llama_dir):
    job = build_job_model(ModelConfig(model=llama_dir), _facts(vocab=96, eos=1))
    assert "llama" in job.description
    with pytest.raises(ConfigError, match="embedding has 96 rows"):
        build_job_model(ModelConfig(model=llama_dir), _facts(vocab=259, eos=1))


def test_init_from_an_export_of_the_builtin_model_restores_its_logits(tmp_path):
    torch.manual_seed(1)
    trained = build_job_model(ModelConfig(model_preset="tiny"), _facts()).model.eval()
    export_model(trained, tmp_path / "final", special_ids={"eos_id": 257}, tokenizer_dir=None)
    torch.manual_seed(2)
    job = build_job_model(ModelConfig(model_preset="tiny", init_from=tmp_path / "final"), _facts())
    ids = _ids(259)
    torch.testing.assert_close(job.model.eval()(ids).logits, trained(ids).logits)


def test_init_from_a_training_state_and_from_an_hf_export(tmp_path, llama_dir):
    torch.manual_seed(1)
    trained = build_job_model(ModelConfig(model_preset="tiny"), _facts()).model
    (tmp_path / "state").mkdir()
    save_file(trained.state_dict(), tmp_path / "state" / "model.safetensors")
    job = build_job_model(ModelConfig(model_preset="tiny", init_from=tmp_path / "state"), _facts())
    assert all(
        torch.equal(a, b) for a, b in zip(job.model.parameters(), trained.parameters(), strict=True)
    )

    scratch = ModelConfig(model=llama_dir, from_scratch=True, init_from=llama_dir)
    restored = build_job_model(scratch, _facts(vocab=96, eos=1)).model.eval()
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
        build_job_model(ModelConfig(model_preset="tiny", init_from=make(tmp_path)), _facts())


def test_init_from_another_architecture_or_lora_state_is_refused(tmp_path):
    torch.manual_seed(1)
    small = build_job_model(ModelConfig(model_preset="tiny"), _facts(vocab=300)).model
    (tmp_path / "other").mkdir()
    save_file(small.state_dict(), tmp_path / "other" / "model.safetensors")
    with pytest.raises(ConfigError, match="has shape"):
        build_job_model(ModelConfig(model_preset="tiny", init_from=tmp_path / "other"), _facts())
    lora = build_job_model(ModelConfig(model_preset="tiny", lora_rank=2), _facts()).model
    (tmp_path / "lora").mkdir()
    save_file(
        {k: v.contiguous() for k, v in lora.state_dict().items()},
        tmp_path / "lora" / "model.safetensors",
    )
    with pytest.raises(ConfigError, match="holds LoRA adapters"):
        build_job_model(ModelConfig(model_preset="tiny", init_from=tmp_path / "lora"), _facts())
