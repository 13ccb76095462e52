"""A user's Hugging Face model folder trains through the trainer's forward contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowmem_core.errors import ConfigError
from trainer_low_mem.config import ModelConfig
from trainer_low_mem.hf_model import HFCausalLM, load_model_folder, read_folder_config
from trainer_low_mem.model import build_model
from trainer_low_mem.models import DataFacts, resolve_model_kind

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _configs() -> dict:
    common = dict(vocab_size=VOCAB, max_position_embeddings=64, eos_token_id=1, bos_token_id=0)
    return {
        "llama": transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        ),
        "qwen2": transformers.Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        ),
        "gpt2": transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            eos_token_id=1,
            bos_token_id=0,
        ),
    }


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def model_dir(request, tmp_path):
    torch.manual_seed(0)
    config = _configs()[request.param]
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / request.param)
    return tmp_path / request.param


def _docs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, VOCAB, (n,), generator=g) for n in (5, 9, 3)]


def _packed(docs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    return ids, pos


def _labels_within_docs(docs: list[torch.Tensor]) -> torch.Tensor:
    """Labels that never ask a document's last token to predict the next document."""
    pieces = []
    for d in docs:
        label = d.clone()
        label[0] = -100  # the first token of each document is no target of its predecessor
        pieces.append(label)
    return torch.cat(pieces)[None]


def test_weights_load_and_step_zero_loss_equals_transformers_own(model_dir):
    model = load_model_folder(model_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.eval()
    assert model.loss_path == "chunked"
    for doc in _docs():
        ids = doc[None]
        ours = model(ids, labels=ids)
        theirs = reference(input_ids=ids, labels=ids).loss
        assert ours.n_loss_tokens.item() == len(doc) - 1
        torch.testing.assert_close(ours.loss, theirs, rtol=1e-5, atol=1e-6)


def test_packed_loss_equals_the_samples_one_at_a_time(model_dir):
    model = load_model_folder(model_dir).eval()
    docs = _docs()
    ids, pos = _packed(docs)
    packed = model(ids, position_ids=pos, labels=_labels_within_docs(docs))
    one_by_one = [model(d[None], labels=d[None]) for d in docs]
    total = sum(o.loss * o.n_loss_tokens for o in one_by_one)
    count = sum(int(o.n_loss_tokens) for o in one_by_one)
    assert int(packed.n_loss_tokens) == count
    torch.testing.assert_close(packed.loss * packed.n_loss_tokens, total, rtol=1e-5, atol=1e-5)


def test_without_document_masking_packed_documents_see_each_other(model_dir):
    model = load_model_folder(model_dir, document_masking=False).eval()
    docs = _docs()
    ids, pos = _packed(docs)
    packed = model(ids, position_ids=pos, labels=_labels_within_docs(docs))
    one_by_one = [model(d[None], labels=d[None]) for d in docs]
    total = sum(o.loss * o.n_loss_tokens for o in one_by_one)
    assert not torch.allclose(packed.loss * packed.n_loss_tokens, total, rtol=1e-4)


def test_builtin_model_packed_loss_equals_the_samples_one_at_a_time():
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=VOCAB, document_masking=True).eval()
    docs = _docs()
    ids, pos = _packed(docs)
    packed = model(ids, position_ids=pos, labels=_labels_within_docs(docs))
    one_by_one = [model(d[None], labels=d[None]) for d in docs]
    total = sum(o.loss * o.n_loss_tokens for o in one_by_one)
    torch.testing.assert_close(packed.loss * packed.n_loss_tokens, total, rtol=1e-5, atol=1e-5)


def test_from_scratch_ignores_the_weights_and_a_config_only_folder_trains(model_dir, tmp_path):
    loaded = load_model_folder(model_dir)
    torch.manual_seed(123)
    scratch = load_model_folder(model_dir, from_scratch=True)
    first = next(loaded.parameters())
    assert not torch.equal(first, next(scratch.parameters()))
    config_only = tmp_path / "config-only"
    transformers.AutoConfig.from_pretrained(model_dir).save_pretrained(config_only)
    with pytest.raises(ConfigError, match="holds no weights .* pass --from_scratch"):
        load_model_folder(config_only)
    model = load_model_folder(config_only, from_scratch=True)
    ids = _docs()[0][None]
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_model_that_softcaps_its_logits_takes_the_chunked_loss_with_its_softcap(tmp_path):
    config = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=3.0,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "g")
    model = load_model_folder(tmp_path / "g").eval()
    assert model.loss_path == "chunked"
    assert "final_logit_softcapping elementwise" in model.loss_path_reason
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g").eval()
    ids = _docs()[1][None]
    torch.testing.assert_close(
        model(ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: tmp / "missing", "is not a local folder"),
        (lambda tmp: "meta-llama/Llama-3.2-1B", "never downloaded"),
        (lambda tmp: (tmp / "f.txt").write_text("x") and tmp / "f.txt", "is a file"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no config.json"),
    ],
)
def test_bad_model_folders_get_one_line(tmp_path, make, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        load_model_folder(make(tmp_path))
    assert "\n" not in str(info.value)


def test_dataset_vocabulary_and_eos_are_checked_against_the_model(model_dir):
    kind = resolve_model_kind(ModelConfig(model=model_dir))

    def data(vocab_size: int, eos_id: int) -> DataFacts:
        return DataFacts(
            path=Path("data"),
            vocab_size=vocab_size,
            bos_id=0,
            eos_id=eos_id,
            pad_id=0,
            is_sft=False,
            token_bytes=0,
            index_bytes=None,
            tokenizer_dir=None,
        )

    kind.check_data(data(VOCAB, 1))
    with pytest.raises(ConfigError, match=f"{VOCAB + 5} ids .* {VOCAB} rows"):
        kind.check_data(data(VOCAB + 5, 1))
    with pytest.raises(ConfigError, match="EOS is 1"):
        kind.check_data(data(VOCAB, 7))


def test_the_row_limit_is_the_configs_position_limit(model_dir):
    # max_position_embeddings (Llama, Qwen2) or n_positions (GPT-2): 64 in every config here.
    assert resolve_model_kind(ModelConfig(model=model_dir)).max_seq_len == 64


def test_an_unreadable_config_json_gets_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ConfigError) as info:
        read_folder_config(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'config.json'} cannot be read by transformers (")
    assert "\n" not in message and "save the model again" in message


def test_adapter_is_an_nn_module_with_the_contract(model_dir):
    model = load_model_folder(model_dir)
    assert isinstance(model, HFCausalLM)
    ids = _docs()[0][None]
    assert model(ids).logits.shape == (1, ids.shape[1], VOCAB)


def test_without_transformers_the_error_names_the_extra(monkeypatch, model_dir):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ConfigError, match=r"lowmem-pipeline\[hf\]"):
        load_model_folder(model_dir)
