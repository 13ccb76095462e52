"""Model kinds: the family a model config resolves to, what each kind answers (row limit,
vocabulary, the dataset check, the batches it takes, its identity), and the vocabulary and
document masking the job takes from the data (tests/trainer_low_mem/test_job.py: that `plan` and
`train` decide alike)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowmem_core.errors import ConfigError
from pipeline import open_dataset
from pipeline.batch_spec import PairRows, TokenRows
from pipeline.build import build_dataset
from pipeline.config import BuildConfig
from pipeline.sample_corpus import write_sample_sft
from trainer_low_mem.config import DataConfig, JobConfig, LaunchConfig, MemoryConfig, ModelConfig
from trainer_low_mem.job import build_job
from trainer_low_mem.launch import Launch
from trainer_low_mem.model import resolve_preset
from trainer_low_mem.models import DataFacts, resolve_model_kind, trainable_parameter_count
from trainer_low_mem.models.builtin import PresetKind
from trainer_low_mem.models.hf_causal import HFCausalKind
from trainer_low_mem.models.hf_seq2seq import Seq2SeqKind
from trainer_low_mem.models.lora import LoraKind

transformers = pytest.importorskip("transformers")
ONE_PROCESS = Launch.from_flags(LaunchConfig(), "no")


def _facts(vocab: int = 259, eos: int = 257, sft: bool = False) -> DataFacts:
    return DataFacts(
        path=Path("data"),
        vocab_size=vocab,
        bos_id=None,
        eos_id=eos,
        pad_id=eos,
        is_sft=sft,
        token_bytes=0,
        index_bytes=None,
        tokenizer_dir=None,
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("llama") / "llama"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    """A T5 folder, config only: relative positions, so no row limit; decoder start 0."""
    config = transformers.T5Config(
        vocab_size=300,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=257,
    )
    out = tmp_path_factory.mktemp("t5") / "t5"
    config.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def byte_sft_dir(tmp_path_factory) -> Path:
    """Sample prompt/response records built with the byte tokenizer."""
    root = tmp_path_factory.mktemp("byte_sft")
    records = write_sample_sft(root, num_train=24, num_eval=1)
    out = root / "train_sft"
    build_dataset(BuildConfig(inputs=[records["train"]], out=out, sft=True), progress=False)
    return out


def _job_config(data: Path, model: ModelConfig, max_seq_len: int = 64) -> JobConfig:
    return JobConfig(
        data=DataConfig(data=data, max_seq_len=max_seq_len),
        model=model,
        memory=MemoryConfig(host_ram_limit="4GiB"),
    )


def test_a_model_config_resolves_to_its_family(llama_dir, t5_dir):
    preset = resolve_model_kind(ModelConfig(model_preset="tiny"))
    assert isinstance(preset, PresetKind)
    assert (preset.what, preset.max_seq_len, preset.vocab_size) == ("preset 'tiny'", 512, 259)
    causal = resolve_model_kind(ModelConfig(model=llama_dir))
    assert isinstance(causal, HFCausalKind)
    assert (causal.what, causal.max_seq_len, causal.vocab_size) == (f"--model {llama_dir}", 64, 96)
    seq2seq = resolve_model_kind(ModelConfig(model=t5_dir))
    assert isinstance(seq2seq, Seq2SeqKind)
    assert (seq2seq.max_seq_len, seq2seq.vocab_size, seq2seq.start_id) == (2**31 - 1, 300, 0)
    lora = resolve_model_kind(ModelConfig(model=llama_dir, lora_rank=4))
    assert isinstance(lora, LoraKind) and isinstance(lora.base, HFCausalKind)
    assert (lora.what, lora.max_seq_len) == (causal.what, 64)


def test_4bit_weights_on_an_encoder_decoder_are_refused(t5_dir):
    with pytest.raises(ConfigError, match="^--load_in_4bit is for decoder-only models"):
        resolve_model_kind(ModelConfig(model=t5_dir, lora_rank=4, load_in_4bit=True))


def test_a_preset_takes_the_dataset_vocabulary():
    kind = resolve_model_kind(ModelConfig(model_preset="tiny"))
    model = kind.build(300, document_masking=False, weights=True)
    assert model.embed.weight.shape[0] == 300
    assert kind.shape(300) == resolve_preset("tiny", 300)
    kind.check_data(_facts(vocab=40_000))  # a preset fits any vocabulary
    trainable, total = trainable_parameter_count(model)
    assert trainable == total == resolve_preset("tiny", 300).param_count()


def test_the_job_takes_vocabulary_and_document_masking_from_the_data(
    sample_dataset_dir, byte_sft_dir
):
    tiny = ModelConfig(model_preset="tiny")
    plain = build_job(
        _job_config(sample_dataset_dir, tiny), ONE_PROCESS, open_dataset(sample_dataset_dir)
    )
    assert (plain.vocab_size, plain.document_masking, plain.data.is_sft) == (259, False, False)
    assert plain.batch_spec == TokenRows(64, packing=True)
    assert not plain.build_model().document_masking
    sft = build_job(_job_config(byte_sft_dir, tiny), ONE_PROCESS, open_dataset(byte_sft_dir))
    assert (sft.document_masking, sft.data.is_sft) == (True, True)
    forced = ModelConfig(model_preset="tiny", document_masking=True)
    job = build_job(
        _job_config(sample_dataset_dir, forced), ONE_PROCESS, open_dataset(sample_dataset_dir)
    )
    assert job.document_masking and job.build_model().document_masking
    # Without a dataset (`plan`): --vocab_size, else the model's own.
    assert (
        build_job(_job_config(sample_dataset_dir, tiny), ONE_PROCESS, vocab_size=300).vocab_size
        == 300
    )
    assert build_job(_job_config(sample_dataset_dir, tiny), ONE_PROCESS).vocab_size == 259


def test_lora_leaves_only_adapters_trainable():
    pytest.importorskip("peft")
    kind = resolve_model_kind(ModelConfig(model_preset="tiny", lora_rank=2))
    model = kind.build(259, document_masking=False, weights=True)
    trainable, total = trainable_parameter_count(model)
    assert 0 < trainable < total
    assert kind.describe(model) == "built-in preset tiny (vocabulary 259), LoRA rank 2"


def test_a_model_folder_is_checked_against_the_dataset(llama_dir):
    kind = resolve_model_kind(ModelConfig(model=llama_dir))
    model = kind.build(96, document_masking=True, weights=True)
    assert kind.describe(model).startswith(f"{llama_dir} (llama, its weights; loss: ")
    kind.check_data(_facts(vocab=96, eos=1))
    with pytest.raises(ConfigError, match="vocabulary of 259 ids but the model's embedding has 96"):
        kind.check_data(_facts(vocab=259, eos=1))
    with pytest.raises(ConfigError, match="ends documents with token 7 but the model's EOS is 1"):
        kind.check_data(_facts(vocab=96, eos=7))


def test_an_encoder_decoder_trains_on_pairs_only(t5_dir):
    kind = resolve_model_kind(ModelConfig(model=t5_dir))
    kind.check_data(_facts(eos=257, sft=True))
    with pytest.raises(ConfigError, match="is an encoder-decoder .* build it with `python -m"):
        kind.check_data(_facts(eos=257, sft=False))


def test_each_kind_says_which_batches_it_takes(llama_dir, t5_dir, byte_sft_dir):
    tiny = resolve_model_kind(ModelConfig(model_preset="tiny"))
    assert tiny.batch_spec(None, 64, False, None) == TokenRows(64, packing=False)
    causal = resolve_model_kind(ModelConfig(model=llama_dir, lora_rank=4))
    assert causal.batch_spec(None, 32, True, None) == TokenRows(32, packing=True)
    seq2seq = resolve_model_kind(ModelConfig(model=t5_dir))
    assert seq2seq.batch_spec(None, 64, True, None) == PairRows(64, 64, start_id=0)
    ds = open_dataset(byte_sft_dir)
    assert seq2seq.batch_spec(ds, 64, True, None) == PairRows.for_dataset(ds, 64, 0)
    saved = {"enc_len": 48, "dec_len": 16, "pack_window": 1}
    assert seq2seq.batch_spec(ds, 64, True, saved) == PairRows(48, 16, 0, pack_window=1)


def test_the_identity_names_the_model_and_its_adapters(llama_dir):
    tiny = resolve_model_kind(ModelConfig(model_preset="tiny"))
    assert tiny.identity(300) == {
        "preset": "tiny",
        **resolve_preset("tiny", 300).__dict__,
        "lora": None,
    }
    lora = ModelConfig(model=llama_dir, lora_rank=4, lora_alpha=8.0, lora_target_modules=["q_proj"])
    identity = resolve_model_kind(lora).identity(96)
    assert identity["folder_config"]["model_type"] == "llama"
    # As training states have recorded LoRA since it was added, so they resume.
    assert identity["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": "['q_proj']"}
    assert resolve_model_kind(ModelConfig(model=llama_dir)).identity(96)["lora"] is None
