"""Tokenizers of `pipeline build`: a Hugging Face model folder gives BOS/EOS/PAD from its
tokenizer_config.json, documents are stored as `transformers` tokenises them (with the BOS its
post-processor adds, without EOS), and long documents cut in pieces keep their tokens. The
tokenizers are trained here on the sample corpus (no downloads)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline import PipelineError, open_dataset, sources
from pipeline.build import build_dataset
from pipeline.config import BuildConfig
from pipeline.sample_corpus import generate_documents
from pipeline.tokenizer import Encoded, load_tokenizer, with_prefix

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_end|>"]  # ids 0-3


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_documents(300, seed=7)


def train_bpe(docs, bos_template: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    if bos_template:  # Llama style: BOS before every text
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 0)]
        )
    return tok


def model_folder(path, docs, bos_template: bool, **specials):
    import transformers

    tok = train_bpe(docs, bos_template)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", **specials}
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(path)
    return path


def build(tmp_path, docs, tokenizer, **kwargs):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    build_dataset(
        BuildConfig(inputs=[tmp_path / "docs.jsonl"], out=out, tokenizer=str(tokenizer), **kwargs),
        progress=False,
    )
    return out


@pytest.mark.parametrize("bos_template", [True, False])
def test_model_folder_documents_are_what_transformers_gives_without_eos(
    tmp_path, corpus, bos_template
):
    import transformers

    folder = model_folder(tmp_path / "model", corpus, bos_template)
    out = build(tmp_path, corpus[:50], folder)
    ds = open_dataset(out)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert [ds[i].tolist() for i in range(len(ds))] == [hf(d)["input_ids"] for d in corpus[:50]]
    assert (
        (ds.bos_id, ds.eos_id, ds.pad_id)
        == (0, 1, 2)
        == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    )
    tok = json.loads((out / "index.json").read_text())["tokenizer"]
    assert tok["documents_start_with_bos"] is bos_template
    assert tok["source"] == str(folder.resolve())
    assert all((ds[i][0] == 0) == bos_template for i in range(len(ds)))


def test_specials_come_from_tokenizer_config_and_eos_token_overrides(tmp_path, corpus):
    folder = model_folder(
        tmp_path / "model", corpus, False, eos_token="<|im_end|>", pad_token="</s>"
    )
    tok = load_tokenizer(str(folder))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 3, 1)
    assert load_tokenizer(str(folder), eos_token="</s>").eos_id == 1
    assert load_tokenizer(str(folder), eos_token="</s>").id != tok.id  # other specials, other id
    with pytest.raises(
        PipelineError,
        match=r"--eos-token 'nope' is not a token of .*; pass one of "
        r"its special tokens \(</s>, <pad>, <s>, <\|im_end\|>\)",
    ):
        load_tokenizer(str(folder), eos_token="nope")
    with pytest.raises(PipelineError, match="--eos-token applies to a Hugging Face tokenizer"):
        load_tokenizer("byte", eos_token="</s>")


def test_a_bare_tokenizer_json_guesses_specials_by_name_and_keeps_the_post_processor_bos(
    tmp_path, corpus
):
    train_bpe(corpus, bos_template=True).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.prefix) == (0, 1, 2, (0,))


@pytest.mark.parametrize("fast_bpe", [True, False])
def test_truncation_or_padding_saved_in_tokenizer_json_never_cuts_a_document(
    tmp_path, corpus, fast_bpe
):
    tok = train_bpe(corpus, bos_template=False)
    whole = [tok.encode(d, add_special_tokens=False).ids for d in corpus[:20]]
    tok.enable_truncation(max_length=16)
    tok.enable_padding(length=16)
    tok.save(str(tmp_path / "tokenizer.json"))
    out = build(tmp_path, corpus[:20], tmp_path / "tokenizer.json", fast_bpe=fast_bpe)
    ds = open_dataset(out)
    assert [ds[i].tolist() for i in range(len(ds))] == whole
    assert max(map(len, whole)) > 16


def test_config_naming_a_token_the_tokenizer_lacks(tmp_path, corpus):
    folder = model_folder(tmp_path / "model", corpus, False)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|eot|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(
        PipelineError,
        match=r"tokenizer_config\.json names eos_token '<\|eot\|>' but the "
        r"tokenizer has no such token; fix the file or pass --eos-token",
    ):
        load_tokenizer(str(folder))
    assert load_tokenizer(str(folder), eos_token="</s>").eos_id == 1


@pytest.mark.parametrize(
    "files, message",
    [
        (
            {"config.json": "{}"},
            r"is a folder without tokenizer\.json \(it holds: config\.json\); pass a "
            r"folder saved by `transformers` or `tokenizers`, or the tokenizer\.json",
        ),
        (
            {"tokenizer.model": "x"},
            r"its tokenizer\.model converts with `transformers\.AutoTokenizer",
        ),
    ],
)
def test_a_folder_without_tokenizer_json_says_so(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(PipelineError, match=message):
        load_tokenizer(str(tmp_path))


def test_a_long_document_cut_in_pieces_keeps_its_tokens_and_one_bos(tmp_path, corpus, monkeypatch):
    folder = model_folder(tmp_path / "model", corpus, True)
    long_doc = "\n".join(corpus[:40])
    whole = load_tokenizer(str(folder))._tok.encode(long_doc).ids  # with its BOS
    monkeypatch.setattr(sources, "CHUNK_BYTES", 500)
    monkeypatch.setattr(sources, "PIECE_CHARS", 500)
    (tmp_path / "a.txt").write_text(long_doc.replace("\n\n", "\n") + "\n")
    out = tmp_path / "cut"
    report = build_dataset(
        BuildConfig(inputs=[tmp_path / "a.txt"], out=out, tokenizer=str(folder)), progress=False
    )
    assert report.documents_in_pieces == 1
    assert open_dataset(out)[0].tolist() == whole


def test_with_prefix_puts_ids_before_the_chosen_documents():
    encoded = Encoded(np.array([5, 6, 7, 8], np.uint32), np.array([2, 0, 2], np.int64))
    out = with_prefix(encoded, (1, 9), np.array([True, True, False]))
    assert out.values.tolist() == [1, 9, 5, 6, 1, 9, 7, 8]
    assert out.lengths.tolist() == [4, 2, 2]
    assert with_prefix(encoded, (), np.ones(3, bool)) is encoded


def test_byte_tokenizer_is_utf8_bytes():
    tok = load_tokenizer("byte")
    out = tok.encode_arrow(pa.array(["é", "", "ab"], pa.large_string()))
    assert out.values.tolist() == [0xC3, 0xA9, 97, 98] and out.lengths.tolist() == [2, 0, 2]
