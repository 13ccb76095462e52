"""The exact fast path of byte-level BPE builds (pipeline/fast_bpe.py): for the tokenizer shapes
it accepts (GPT-2's, Llama 3's, Qwen2's, trained here on the sample corpus), every document gives
the ids `tokenizers` gives; documents outside its alphabet or holding an added token go to
`tokenizers`; and every tokenizer whose ids tiktoken could get wrong is refused with the reason."""

from __future__ import annotations

import json
import pickle
import random
import sys

import numpy as np
import pyarrow as pa
import pytest

from pipeline import fast_bpe, open_dataset
from pipeline.build import build_dataset
from pipeline.config import BuildConfig
from pipeline.fast_bpe import KNOWN_SPLITS, FastBPE, byte_chars
from pipeline.sample_corpus import generate_documents
from pipeline.tokenizer import JsonTokenizer

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("tiktoken")
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_end|>"]
SHAPES = {
    "gpt2": (None, False, False),  # ByteLevel's own split, merges
    "llama3": (KNOWN_SPLITS[1], True, False),  # GPT-4-style split, whole words first
    "qwen2": (KNOWN_SPLITS[2], False, True),  # GPT-4-style split, NFC
}


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_documents(400, seed=11)


def train(docs, split: str | None, ignore_merges: bool, nfc: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    return tok


@pytest.fixture(scope="module")
def trained(corpus) -> dict[str, Tokenizer]:
    return {name: train(corpus, *shape) for name, shape in SHAPES.items()}


def edited(tok: Tokenizer, edit) -> Tokenizer:
    spec = json.loads(tok.to_str())
    edit(spec)
    return Tokenizer.from_str(json.dumps(spec))


def texts_to_encode(corpus) -> list[str]:
    """The sample corpus, random text (weighted to whitespace, quotes and digits, where the splits
    branch, and drawn from ASCII, Latin, Greek, Cyrillic, Arabic, CJK, punctuation, spaces,
    marks and emoji), and documents the fast path must pass on."""
    rng = random.Random(3)
    blocks = [(0x00, 0x80), (0xA0, 0x250), (0x370, 0x500), (0x600, 0x700), (0x2000, 0x2070)]
    blocks += [(0x3000, 0x3100), (0x4E00, 0x4F00), (0xFF00, 0xFF70), (0x1F600, 0x1F650)]
    pool = [chr(c) for a, b in blocks for c in range(a, b)]
    tricky = "  \n\r\t'sStT1234567890.,-<|>\u00a0\u3000\u0301٣"
    fuzz = [
        "".join(rng.choice(tricky if rng.random() < 0.5 else pool) for _ in range(n))
        for n in (rng.randint(1, 80) for _ in range(3000))
    ]
    others = ["café au lait", "tab\x0bvertical", "esc\x1b[0m", "end <|endoftext|> start"]
    others += ["x<|im_end|>", "  indented\u00a0text", "全角\u3000空白", "e\u0301", "l'ſ", ""]
    return corpus + fuzz + others


def save(tok: Tokenizer, path) -> JsonTokenizer:
    tok.save(str(path))
    return JsonTokenizer(path)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_document_gets_the_ids_tokenizers_gives(tmp_path, corpus, trained, shape):
    texts = pa.array(texts_to_encode(corpus), type=pa.large_string())
    plain = save(trained[shape], tmp_path / "tokenizer.json")
    fast = save(trained[shape], tmp_path / "tokenizer.json")
    assert fast.use_fast_bpe() is None
    want, got = plain.encode_arrow(texts), fast.encode_arrow(texts)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.values, want.values)
    report = fast.fast_bpe_report()
    assert report["texts"] == len(texts)
    assert report["fast_texts"] == int(fast._fast.accepts(texts).sum()) > 2500
    assert plain.fast_bpe_report() is None


@pytest.mark.parametrize(
    "shape, text, accepted",
    [
        ("gpt2", "plain text.\n", True),
        ("gpt2", "café, 中文\u3000٣ and\x0bcontrol", True),
        ("gpt2", "x <|im_end|> y", False),  # an added token splits the text first
        ("gpt2", "<|im_end", True),
        ("gpt2", None, False),
        ("gpt2", "l'ſ", True),  # the GPT-2 split is case-sensitive
        ("llama3", "l'ſ", False),  # long s case-maps to S: the engines' folding may differ
        ("llama3", "l's", True),
        ("qwen2", "caf\u00e9", True),  # already NFC
        ("qwen2", "cafe\u0301", False),  # NFC would compose it
        ("qwen2", chr(0x40000), False),  # unassigned in Python's tables
        ("gpt2", chr(0x40000), True),
    ],
)
def test_a_document_goes_to_tiktoken_unless_a_character_could_split_differently(
    trained, shape, text, accepted
):
    fast = FastBPE.check(trained[shape])
    assert fast.accepts(pa.array([text], type=pa.large_string())).tolist() == [accepted]


def test_a_character_whose_class_the_engines_disagree_on_goes_to_tokenizers(monkeypatch, trained):
    facts = {key: np.zeros(0, dtype=np.uint32) for key in fast_bpe._FACTS}
    facts["classes_differ"] = np.array([ord("é")], dtype=np.uint32)
    monkeypatch.setattr(fast_bpe, "_code_point_facts", lambda: facts)
    fast_bpe.unsafe_code_points.cache_clear()
    try:
        fast = FastBPE.check(trained["gpt2"])
        assert fast.accepts(pa.array(["café", "cafe"])).tolist() == [False, True]
    finally:
        fast_bpe.unsafe_code_points.cache_clear()


def test_code_point_facts_are_found_once_and_kept_in_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    found = fast_bpe._code_point_facts()
    saved = list((tmp_path / "lowmem-pipeline" / "fast-bpe").iterdir())
    assert len(saved) == 1 and saved[0].suffix == ".npz"
    assert found["case_maps_to_contraction"].tolist() == [0x17F]  # long s; not sharp s (ss)
    assert 0x40000 in found["unassigned"] and ord("é") not in found["unassigned"]
    monkeypatch.setattr(fast_bpe, "_find_code_point_facts", lambda: pytest.fail("found again"))
    again = fast_bpe._code_point_facts()
    for key in fast_bpe._FACTS:
        np.testing.assert_array_equal(again[key], found[key])
    saved[0].write_bytes(b"damaged")
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    np.testing.assert_array_equal(fast_bpe._code_point_facts()["unassigned"], found["unassigned"])


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda s: s.update(normalizer={"type": "Lowercase"}), "normalizer Lowercase"),
        (
            lambda s: s.update(normalizer={"type": "Sequence", "normalizers": [{"type": "NFKC"}]}),
            None,
        ),
        (lambda s: s["model"].update(dropout=0.1), "dropout"),
        (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer"),
        (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
        (
            lambda s: s.update(
                pre_tokenizer={
                    "type": "Sequence",
                    "pretokenizers": [
                        {
                            "type": "Split",
                            "pattern": {"Regex": r"\w+|\s+"},
                            "behavior": "Isolated",
                            "invert": False,
                        },
                        {
                            "type": "ByteLevel",
                            "add_prefix_space": False,
                            "trim_offsets": False,
                            "use_regex": False,
                        },
                    ],
                }
            ),
            "pre-tokenizer",
        ),
    ],
)
def test_tokenizer_shapes_it_cannot_match_are_refused(trained, edit, reason):
    result = FastBPE.check(edited(trained["gpt2"], edit))
    if reason is None:
        assert isinstance(result, FastBPE)
    else:
        assert isinstance(result, str) and reason in result


def test_subword_prefixes_are_refused(corpus):
    tok = Tokenizer(models.BPE(continuing_subword_prefix="##"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        show_progress=False,
        continuing_subword_prefix="##",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    result = FastBPE.check(tok)
    assert isinstance(result, str) and "marks subwords" in result


def test_a_vocabulary_without_every_byte_is_refused(corpus):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"], show_progress=False)
    )
    result = FastBPE.check(tok)
    assert isinstance(result, str) and "byte tokens are missing" in result


def handmade(words: list[str], merges: list[tuple[str, str]], ignore_merges=False) -> Tokenizer:
    """A byte-level BPE over every byte plus `words`, with the merge table given."""
    vocab = {c: i for i, c in enumerate(byte_chars())}
    for word in words:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def test_a_token_its_merges_do_not_make_from_its_own_bytes_is_refused():
    # "he" merges first, so tokenizers ends "the" at ["t", "he"]: no rule joins them. tiktoken
    # would take the ranked "the" whole.
    tok = handmade(["he", "th", "the"], [("h", "e"), ("t", "h"), ("th", "e")])
    assert tok.encode("the").tokens == ["t", "he"]
    result = FastBPE.check(tok)
    assert isinstance(result, str) and "'the'" in result


def test_two_merges_making_one_token_are_refused():
    tok = handmade(["he", "th", "the"], [("t", "h"), ("h", "e"), ("th", "e"), ("t", "he")])
    result = FastBPE.check(tok)
    assert isinstance(result, str) and "two merges make the token 'the'" in result


def test_whole_words_no_merge_makes_are_refused_when_the_model_takes_whole_words():
    merges = [("t", "h"), ("th", "e")]
    assert isinstance(FastBPE.check(handmade(["th", "the", "xyz"], merges)), FastBPE)
    result = FastBPE.check(handmade(["th", "the", "xyz"], merges, ignore_merges=True))
    assert isinstance(result, str) and "whole words (1 tokens" in result
    assert isinstance(FastBPE.check(handmade(["th", "the"], merges, ignore_merges=True)), FastBPE)


def test_the_probe_catches_a_split_that_differs(monkeypatch, trained):
    monkeypatch.setattr(fast_bpe, "_split_pattern", lambda pre: r"\S+|\s+")
    result = FastBPE.check(trained["gpt2"])
    assert isinstance(result, str) and result.startswith("tiktoken and tokenizers disagree on")


def test_a_tokenizer_sent_to_another_process_sets_up_its_own_fast_path(tmp_path, trained):
    tok = save(trained["gpt2"], tmp_path / "tokenizer.json")
    assert tok.use_fast_bpe() is None
    tok.encode_arrow(pa.array(["counted here"]))
    received = pickle.loads(pickle.dumps(tok))
    assert received.fast_bpe_report() is None
    assert received.use_fast_bpe() is None
    texts = pa.array(["some text", "mehr Text"])
    np.testing.assert_array_equal(
        received.encode_arrow(texts).values, tok.encode_arrow(texts).values
    )
    assert received.fast_bpe_report()["texts"] == 2


def test_without_tiktoken_every_document_goes_to_tokenizers(monkeypatch, tmp_path, trained):
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    tok = save(trained["gpt2"], tmp_path / "tokenizer.json")
    assert tok.use_fast_bpe() == "tiktoken is not installed (pip install tiktoken)"
    assert tok.encode_arrow(pa.array(["some text"])).lengths.size == 1


def build(tmp_path, docs, tokenizer, name, **kwargs):
    inputs = tmp_path / "docs.jsonl"
    inputs.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / name
    cfg = BuildConfig(inputs=[inputs], out=out, tokenizer=str(tokenizer), num_proc=2, **kwargs)
    report = build_dataset(cfg, progress=False)
    return out, json.loads((out / "index.json").read_text())["build"]["fast_bpe"], report


def test_a_build_stores_the_same_dataset_with_or_without_the_fast_path(tmp_path, corpus, trained):
    trained["llama3"].save(str(tmp_path / "tokenizer.json"))
    docs = texts_to_encode(corpus)
    fast, fast_bpe, report = build(tmp_path, docs, tmp_path / "tokenizer.json", "fast")
    plain, off, _ = build(tmp_path, docs, tmp_path / "tokenizer.json", "plain", fast_bpe=False)
    a, b = open_dataset(fast), open_dataset(plain)
    np.testing.assert_array_equal(a.doc_lengths, b.doc_lengths)
    np.testing.assert_array_equal(a.read_tokens(0, a.num_tokens), b.read_tokens(0, b.num_tokens))
    stored = [d for d in docs if d.strip()]  # the build skips blank documents
    accepted = int(FastBPE.check(trained["llama3"]).accepts(pa.array(stored)).sum())
    assert fast_bpe == {"split": "GPT-4-style", "texts": len(stored), "fast_texts": accepted}
    assert off is None
    assert report.notes("text")[0] == (
        f"tokenised {accepted:,} of {len(stored):,} texts with tiktoken, whose ids provably "
        "equal the tokenizer's (GPT-4-style split); the rest with tokenizers"
    )


def test_a_build_says_why_its_tokenizer_has_no_fast_path(tmp_path, corpus, trained):
    lowercase = edited(trained["gpt2"], lambda s: s.update(normalizer={"type": "Lowercase"}))
    lowercase.save(str(tmp_path / "tokenizer.json"))
    out, fast_bpe, report = build(tmp_path, corpus[:20], tmp_path / "tokenizer.json", "out")
    reason = "its normalizer Lowercase changes text a Unicode normal form keeps"
    assert fast_bpe == {"refused": reason}
    assert report.notes("text")[0] == (
        f"tokenised with tokenizers alone, no exact fast path: {reason}"
    )
    assert len(open_dataset(out)) == 20
