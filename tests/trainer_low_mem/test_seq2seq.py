"""Encoder-decoder models: packed pairs compute exactly what each pair computes alone."""

from __future__ import annotations

import pytest
import torch

from lowmem_core.errors import ConfigError
from pipeline.batch_spec import PairRows
from trainer_low_mem.config import ModelConfig
from trainer_low_mem.models import resolve_model_kind
from trainer_low_mem.seq2seq import Seq2SeqLM, load_seq2seq_folder

transformers = pytest.importorskip("transformers")
START, EOS = 0, 1


@pytest.fixture(params=[True, False], ids=["t5-tied", "mt5-untied"])
def t5_dir(request, tmp_path):
    config = transformers.T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=START,
        pad_token_id=START,
        eos_token_id=EOS,
        tie_word_embeddings=request.param,
    )
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    return tmp_path / "t5"


def _pairs():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randint(2, 100, (n,), generator=g), torch.randint(2, 100, (m,), generator=g))
        for n, m in ((5, 4), (7, 3), (2, 6))
    ]


def _packed_row(pairs, enc_len: int, dec_len: int) -> dict[str, torch.Tensor]:
    enc, enc_pos, dec, dec_pos, labels = [], [], [], [], []
    for src, tgt in pairs:
        enc.append(src)
        enc_pos.append(torch.arange(len(src)))
        dec.append(torch.cat([torch.tensor([START]), tgt]))
        dec_pos.append(torch.arange(len(tgt) + 1))
        labels.append(torch.cat([tgt, torch.tensor([EOS])]))

    def pad(parts, length, value):
        row = torch.cat(parts)
        return torch.cat([row, torch.full((length - len(row),), value)])[None]

    return {
        "input_ids": pad(enc, enc_len, 0),
        "position_ids": pad(enc_pos, enc_len, -1),
        "decoder_input_ids": pad(dec, dec_len, 0),
        "decoder_position_ids": pad(dec_pos, dec_len, -1),
        "labels": pad(labels, dec_len, -100),
    }


def test_packed_pairs_loss_equals_transformers_loss_pair_by_pair(t5_dir):
    model = load_seq2seq_folder(t5_dir).eval()
    reference = transformers.AutoModelForSeq2SeqLM.from_pretrained(t5_dir).eval()
    pairs = _pairs()
    out = model(**_packed_row(pairs, enc_len=20, dec_len=22))
    expected_sum = 0.0
    for src, tgt in pairs:
        labels = torch.cat([tgt, torch.tensor([EOS])])[None]
        expected_sum += reference(input_ids=src[None], labels=labels).loss * labels.numel()
    assert int(out.n_loss_tokens) == sum(len(t) + 1 for _, t in pairs)
    torch.testing.assert_close(out.loss * out.n_loss_tokens, expected_sum, rtol=1e-5, atol=1e-5)


def test_padding_rows_do_not_change_the_loss_and_gradients_flow(t5_dir):
    model = load_seq2seq_folder(t5_dir)
    assert model.hf_model.training  # from_pretrained's eval mode is undone: dropout trains
    model.eval()  # no dropout, so the two forwards must agree
    pairs = _pairs()[:2]
    tight = model(**_packed_row(pairs, enc_len=12, dec_len=9))
    padded = model(**_packed_row(pairs, enc_len=30, dec_len=25))
    torch.testing.assert_close(padded.loss, tight.loss, rtol=1e-5, atol=1e-6)
    padded.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_decoder_only_folder_is_refused(tmp_path):
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="not an encoder-decoder"):
        load_seq2seq_folder(tmp_path / "gpt2")


def test_from_scratch_builds_from_the_config(t5_dir):
    torch.manual_seed(5)
    scratch = load_seq2seq_folder(t5_dir, from_scratch=True)
    loaded = load_seq2seq_folder(t5_dir)
    assert isinstance(scratch, Seq2SeqLM)
    assert not torch.equal(next(scratch.parameters()), next(loaded.parameters()))


def test_without_position_ids_a_row_is_one_pair(t5_dir):
    model = load_seq2seq_folder(t5_dir).eval()  # no dropout: the losses compare exactly
    ids = torch.randint(2, 100, (2, 24), generator=torch.Generator().manual_seed(2))
    row = torch.arange(24).expand(2, 24)
    implicit = model(input_ids=ids, decoder_input_ids=ids[:, :16], labels=ids[:, :16]).loss
    explicit = model(
        input_ids=ids,
        position_ids=row,
        decoder_input_ids=ids[:, :16],
        decoder_position_ids=row[:, :16],
        labels=ids[:, :16],
    ).loss
    assert torch.equal(implicit, explicit)


def test_a_batch_without_decoder_inputs_is_refused_naming_the_pair_batches(t5_dir):
    model = load_seq2seq_folder(t5_dir)
    ids = torch.randint(2, 100, (2, 8), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ConfigError) as info:
        model(ids, labels=ids)
    assert str(info.value) == (
        "an encoder-decoder takes decoder_input_ids: feed it batches of "
        "pipeline.batch_spec.PairRows (a prompt/response dataset built with --sft)"
    )


def test_the_trace_measures_the_rows_the_data_gives(t5_dir):
    from trainer_low_mem.planner.trace import trace_step_memory

    kind = resolve_model_kind(ModelConfig(model=t5_dir))

    def per_token(enc_len: int, dec_len: int) -> int:
        traced = trace_step_memory(
            lambda: kind.build(100, document_masking=True, weights=False),
            seq_len=64,
            device_type="cpu",
            batch_spec=PairRows(enc_len, dec_len, kind.start_id),
        )
        return traced.activation_bytes_per_token

    whole = per_token(64, 64)
    assert per_token(16, 64) < whole and per_token(64, 16) < whole
