"""A document longer than a piece is tokenised in pieces cut only where the tokenizer gives the
whole document's ids: its stored ids equal the tokenizer's own encoding of the whole, for every
tokenizer kind, whether it has line breaks, long runs of spaces or one long word, read from .txt
(cut while read) or JSON Lines (cut while encoded). The tokenizers are trained here on the
sample corpus (no downloads), except the real Qwen3 one in ../shared when it is there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import open_dataset, sources
from pipeline.build import build_dataset
from pipeline.config import BuildConfig
from pipeline.sample_corpus import generate_documents
from pipeline.tokenizer import JsonTokenizer

tokenizers = pytest.importorskip("tokenizers")

PIECE = 2000  # characters per piece in these tests (the build's is 512 Ki)
QWEN3 = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "qwen3" / "tokenizer.json"
SPECIALS = ["<unk>", "<s>", "</s>", "[UNK]", "[CLS]", "[SEP]"]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_documents(300, seed=7)


def byte_level(corpus):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def metaspace(corpus):
    """SentencePiece style: a Unigram over words that start with "▁" (T5, newer Llamas)."""
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    trainer = tokenizers.trainers.UnigramTrainer(
        vocab_size=600, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def llama2_legacy(corpus):
    """Llama 2's tokenizer.json: "▁" put before the text and for each space by the normalizer,
    no pre-tokenizer (the whole text is one pre-token), a vocabulary without "x▁" tokens."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def gemma_style(corpus):
    """Gemma's tokenizer.json: "▁" for each space by the normalizer, a pre-tokenizer splitting at
    " " that finds none after it: one pre-token, cut before spaces."""
    spec = json.loads(llama2_legacy(corpus).to_str())
    spec["normalizer"] = spec["normalizer"]["normalizers"][1]
    spec["pre_tokenizer"] = {
        "type": "Split",
        "pattern": {"String": " "},
        "behavior": "MergedWithPrevious",
        "invert": False,
    }
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def metaspace_unsplit(corpus):
    """Llama 2 converted without its legacy normalizer: Metaspace marks the spaces and the first
    word but does not split, so the whole text is one pre-token."""
    spec = json.loads(llama2_legacy(corpus).to_str())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "\u2581",
        "prepend_scheme": "first",
        "split": False,
    }
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def wordpiece(corpus):
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    trainer = tokenizers.trainers.WordPieceTrainer(
        vocab_size=600, special_tokens=SPECIALS, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def qwen3(corpus):
    if not QWEN3.is_file():
        pytest.skip("needs ../shared/tokenizers/qwen3")
    return tokenizers.Tokenizer.from_file(str(QWEN3))


KINDS = {
    "byte": None,
    "byte-level-bpe": byte_level,
    "metaspace-unigram": metaspace,
    "llama2-legacy": llama2_legacy,
    "gemma-style": gemma_style,
    "metaspace-unsplit": metaspace_unsplit,
    "wordpiece": wordpiece,
    "qwen3": qwen3,
}


def documents(corpus) -> dict[str, str]:
    """Long documents without line breaks, each a few pieces long (or with one)."""
    rng = np.random.default_rng(0)
    prose = " ".join(d.replace("\n", " ") for d in corpus[:60])[: 4 * PIECE]
    words = prose.split()
    return {
        "dna": "".join(rng.choice(list("ACGT"), size=3 * PIECE)),
        "random-letters": "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 3 * PIECE)),
        "run-of-spaces": " ".join(words[:300]) + " " * (2 * PIECE) + " ".join(words[300:600]),
        "long-word": " ".join(words[:300]) + " x" + "ab" * PIECE + " " + " ".join(words[300:]),
        "double-spaces": "  ".join(words)[: 3 * PIECE],
        "one-line-prose": prose + " caf\u00e9 \u6f22\u5b57 na\u00efve",
        "with-line-breaks": "\n".join(corpus[:40])[: 3 * PIECE],
    }


@pytest.fixture(scope="module")
def tokenizer_files(corpus, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tokenizers")
    files = {"byte": "byte"}
    for name, make in KINDS.items():
        if make is None:
            continue
        try:
            tok = make(corpus)
        except pytest.skip.Exception:
            continue
        tok.save(str(folder / f"{name}.json"))
        files[name] = str(folder / f"{name}.json")
    return files


def expected_ids(spec: str, text: str) -> list[int]:
    if spec == "byte":
        return list(text.encode())
    return tokenizers.Tokenizer.from_file(spec).encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_long_documents_keep_the_tokenizers_ids(
    tmp_path, monkeypatch, corpus, tokenizer_files, kind, suffix
):
    if kind not in tokenizer_files:
        pytest.skip("needs ../shared/tokenizers/qwen3")
    monkeypatch.setattr(sources, "PIECE_CHARS", PIECE)
    monkeypatch.setattr(sources, "CHUNK_BYTES", PIECE // 2)
    docs = documents(corpus)
    path = tmp_path / f"docs{suffix}"
    if suffix == ".txt":  # one document per line: the documents hold no line break of their own
        texts = {k: v for k, v in docs.items() if "\n" not in v}
        path.write_text("\n".join(texts.values()) + "\n")
    else:
        texts = docs
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts.values()))
    longest = []
    real = JsonTokenizer.encode_arrow

    def spy(self, batch, continues=False):
        longest.append(max(len(t) for t in batch.to_pylist()))
        return real(self, batch, continues)

    monkeypatch.setattr(JsonTokenizer, "encode_arrow", spy)
    split = "lines" if suffix == ".txt" else "blank_lines"
    spec = tokenizer_files[kind]
    report = build_dataset(
        BuildConfig(inputs=[path], out=tmp_path / "out", tokenizer=spec, split=split),
        progress=False,
    )
    ds = open_dataset(tmp_path / "out")
    assert len(ds) == len(texts)
    for i, (name, text) in enumerate(texts.items()):
        assert ds[i].tolist() == expected_ids(spec, text), name
    assert report.documents_in_pieces == len(texts)
    # Stretches with no place to cut go whole: the DNA, the random letters, the run of spaces
    # and the long word (one pre-token each; Metaspace can cut before any space of a run).
    unsplit = {"byte": 0, "metaspace-unigram": 3}.get(kind, 4)
    assert report.unsplit_stretches == unsplit
    assert sum(n > PIECE for n in longest) == (0 if kind == "byte" else unsplit)


def test_a_long_run_of_spaces_and_a_long_word_are_cut_around_not_inside(tokenizer_files):
    """The places `safe_cut` finds are where Qwen's pre-tokenizer starts a pre-token: before a
    run of spaces and before the space that starts a word, never inside either."""
    if "qwen3" not in tokenizer_files:
        pytest.skip("needs ../shared/tokenizers/qwen3")
    tok = JsonTokenizer(Path(tokenizer_files["qwen3"]))
    # " word" x 100, then 5000 spaces (a pre-token), then " xxx..." (the last space starts it).
    text = "word" + " word" * 99 + " " * 5001 + "x" * 5000 + " tail" * 100
    spaces, word = 499, 499 + 5000
    assert tok.safe_cut(text, 1, word - 1) == spaces
    assert tok.safe_cut(text, 1, word + 4000) == word
    assert tok.safe_cut(text, spaces + 1, word - 1) is None
    assert tok.safe_cut(text, word + 1, word + 5000) is None
    whole = tok._tok.encode(text, add_special_tokens=False).ids
    for cut in (spaces, word):
        left = tok._tok.encode(text[:cut], add_special_tokens=False).ids
        right = tok._tok.encode(text[cut:], add_special_tokens=False).ids
        assert left + right == whole


def test_no_cut_follows_a_character_that_a_token_joins_to_the_next_space(tmp_path):
    """A SentencePiece vocabulary holding ">▁" (Gemma 3 has ">▁</"): a space after ">" may be
    merged into it, so the text is never cut there; elsewhere it is, with the ids of the whole."""
    mark = "\u2581"
    vocab = {"<unk>": 0, "</s>": 1, mark: 2, ">": 3, "a": 4, "b": 5, f">{mark}": 6, f"{mark}a": 7}
    merges = [(">", mark), (mark, "a")]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token="<unk>"))
    tok.normalizer = tokenizers.normalizers.Replace(" ", mark)
    tok.save(str(tmp_path / "tok.json"))
    jt = JsonTokenizer(tmp_path / "tok.json")
    text = "b a> a> ab" * 50
    cuts = []
    while (cut := jt.safe_cut(text, 1, (cuts[-1] - 1) if cuts else len(text))) is not None:
        cuts.append(cut)
    assert cuts and all(text[c] == " " and text[c - 1] not in "> " for c in cuts)
    assert len(cuts) == text.count("b a")
    whole = tok.encode(text).ids
    for cut in cuts:
        assert tok.encode(text[:cut]).ids + tok.encode(text[cut:]).ids == whole
