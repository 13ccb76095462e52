"""The exact fast path of byte-level BPE builds (pipeline/fast_bpe.py): for the tokenizer shapes
it accepts (GPT-2's, Llama 3's, Qwen2's, trained here on the sample corpus), every document gives
the ids `tokenizers` gives; documents outside its alphabet or holding an added token go to
`tokenizers`; and every tokenizer whose ids tiktoken could get wrong is refused with the reason."""

from __future__ import annotations

import json
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import fast_bpe, open_dataset
from pipeline.build import build_dataset
from pipeline.config import BuildConfig
from pipeline.fast_bpe import KNOWN_SPLITS, LEFT_REASONS, FastBPE, byte_chars
from pipeline.sample_corpus import generate_documents
from pipeline.tokenizer import JsonTokenizer

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("tiktoken")
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_end|>"]
QWEN3 = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "qwen3"
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
        ("gpt2", "x <|im_end|> y", True),  # cut at the added token, each piece judged
        ("qwen2", "cafe\u0301<|im_end|>x", False),  # a piece NFC would compose
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
    reasons = FastBPE.check(trained["llama3"]).reasons(pa.array(stored))
    accepted = int((reasons == 0).sum())
    left = {LEFT_REASONS[k]: int(n) for k, n in enumerate(np.bincount(reasons)) if k and n}
    assert list(left) == ["a character the two regex engines may split differently"]
    assert fast_bpe == {
        "split": "GPT-4-style",
        "texts": len(stored),
        "fast_texts": accepted,
        "left": left,
    }
    assert off is None
    assert report.notes("text")[0] == (
        f"tokenised {accepted:,} of {len(stored):,} texts with tiktoken, whose ids provably "
        "equal the tokenizer's (GPT-4-style split); the rest with tokenizers "
        f"({len(stored) - accepted:,}: a character the two regex engines may split differently)"
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


def chat_texts(rng: random.Random, count: int, specials: list[str]) -> list[str]:
    """Texts shaped like rendered chats: added tokens between, beside and glued to text (words,
    digits, whitespace runs, accents, CJK, and a half-written added token)."""
    bits = [
        "Hello",
        " world",
        "\n",
        "\n\n",
        "  ",
        "12345",
        "é",
        "中文",
        "'s",
        "<|",
        "|>",
        ".",
        "\t",
    ]
    bits += ["user", "assistant", "<think>", "</think>", "<|im_start"]
    return [
        "".join(rng.choice(specials if rng.random() < 0.25 else bits) for _ in range(n))
        for n in (rng.randint(1, 60) for _ in range(count))
    ]


def assert_same_ids(tok: JsonTokenizer, reference: Tokenizer, texts: list[str]) -> np.ndarray:
    """Asserts `tok` encodes `texts` (in one batch) as `reference` does; returns the ids."""
    got = tok.encode_arrow(pa.array(texts, type=pa.large_string()))
    ends = np.cumsum(got.lengths)
    want = reference.encode_batch(texts, add_special_tokens=False)
    for text, end, length, w in zip(texts, ends, got.lengths, want, strict=True):
        assert got.values[end - length : end].tolist() == w.ids, text
    return got.values


@pytest.mark.parametrize("shape", list(SHAPES))
def test_texts_holding_added_tokens_take_the_fast_path_with_the_same_ids(tmp_path, trained, shape):
    texts = chat_texts(random.Random(5), 2000, SPECIALS) + ["cafe\u0301<|im_end|>x"]
    tok = save(trained[shape], tmp_path / "tokenizer.json")
    assert tok.use_fast_bpe() is None
    assert_same_ids(tok, trained[shape], texts)
    holding = [t for t in texts if any(s in t for s in SPECIALS)]
    assert len(holding) > 1000
    report = tok.fast_bpe_report()
    # Only a piece NFC would compose leaves (under the NFC normalizer), counted by why.
    if shape == "qwen2":
        assert report["fast_texts"] == len(texts) - 1
        assert report["left"] == {"text not in the normalizer's normal form": 1}
    else:
        assert report == {"split": report["split"], "texts": len(texts), "fast_texts": len(texts)}


@pytest.mark.parametrize(
    "flag, text, reason",
    [
        ("lstrip", "x <|im_end|> y", 2),
        ("rstrip", "x<|im_end|>  y", 2),
        ("single_word", "x<|im_end|>y", 2),
        ("normalized", "x<|im_end|>y", 2),
    ],
)
def test_an_added_token_matched_otherwise_than_by_plain_search_sends_its_text_away(
    tmp_path, trained, flag, text, reason
):
    def flagged(spec):
        for token in spec["added_tokens"]:
            if token["content"] == "<|im_end|>":
                token[flag] = True

    tok_ = edited(trained["gpt2"], flagged)
    fast = FastBPE.check(tok_)
    assert fast.refused_added == ("<|im_end|>",)
    texts = pa.array([text, "x <|endoftext|> y"])
    assert fast.reasons(texts).tolist() == [reason, 0]
    assert LEFT_REASONS[reason].startswith("an added token tokenizers matches with lstrip")
    assert_same_ids(save(tok_, tmp_path / "tokenizer.json"), tok_, [text, "x <|endoftext|> y"])


def test_the_longest_added_token_wins_where_two_start_at_one_place(tmp_path, trained):
    def more(spec):
        for k, content in enumerate(["<|im", "<|im_end|>x", "<|"]):
            spec["added_tokens"].append(
                {
                    "id": 1200 + k,
                    "content": content,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": k == 0,
                }
            )

    tok_ = edited(trained["qwen2"], more)
    tok = save(tok_, tmp_path / "tokenizer.json")
    assert tok.use_fast_bpe() is None
    texts = ["a<|im_end|>x<|im_end|>b", "<|im<|im_end|>", "<|<|im_start|>", "<|im_end|"]
    texts += chat_texts(random.Random(8), 500, [*SPECIALS, "<|im", "<|im_end|>x", "<|"])
    assert_same_ids(tok, tok_, texts)
    assert tok.fast_bpe_report()["fast_texts"] == len(texts)


def test_the_check_is_kept_in_the_user_cache_per_tokenizer(monkeypatch, tmp_path, trained):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = save(trained["qwen2"], tmp_path / "tokenizer.json")
    assert first.use_fast_bpe() is None
    kept = list((tmp_path / "cache" / "lowmem-pipeline" / "fast-bpe").glob("check-*.npz"))
    assert len(kept) == 1 and first.id in kept[0].name
    monkeypatch.setattr(FastBPE, "_check", classmethod(lambda *a: pytest.fail("checked again")))
    again = JsonTokenizer(tmp_path / "tokenizer.json")
    assert again.use_fast_bpe() is None
    for name in ("outside", "forms", "split_name", "cut_at", "refused_added", "split"):
        assert getattr(again._fast, name) == getattr(first._fast, name)
    np.testing.assert_array_equal(again._fast.rank_to_id, first._fast.rank_to_id)
    texts = chat_texts(random.Random(2), 300, SPECIALS)
    np.testing.assert_array_equal(
        assert_same_ids(again, trained["qwen2"], texts),
        first.encode_arrow(pa.array(texts)).values,
    )
    kept[0].write_bytes(b"damaged")  # read as absent: checked afresh
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert JsonTokenizer(tmp_path / "tokenizer.json").use_fast_bpe() is None


def test_a_refusal_is_kept_in_the_user_cache_too(monkeypatch, tmp_path, trained):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lowercase = edited(trained["gpt2"], lambda s: s.update(normalizer={"type": "Lowercase"}))
    reason = save(lowercase, tmp_path / "tokenizer.json").use_fast_bpe()
    monkeypatch.setattr(FastBPE, "_check", classmethod(lambda *a: pytest.fail("checked again")))
    assert JsonTokenizer(tmp_path / "tokenizer.json").use_fast_bpe() == reason


@pytest.mark.parametrize("fast", [True, False])
def test_token_offsets_are_where_each_token_starts_in_its_text(tmp_path, trained, fast):
    texts = chat_texts(random.Random(4), 400, SPECIALS) + ["", "é中😀<|im_end|>x"]
    tok = save(trained["qwen2"], tmp_path / "tokenizer.json")
    if fast:
        assert tok.use_fast_bpe() is None
    encoded, starts = tok.encode_with_offsets(texts)
    np.testing.assert_array_equal(
        encoded.values, tok.encode_arrow(pa.array(texts, type=pa.large_string())).values
    )
    want = trained["qwen2"].encode_batch(texts, add_special_tokens=False)
    assert starts.tolist() == [start for w in want for start, _ in w.offsets]


@pytest.mark.skipif(not QWEN3.is_dir(), reason="needs ../shared/tokenizers/qwen3")
def test_rendered_chats_take_the_fast_path_with_qwen3s_ids():
    tok = JsonTokenizer(QWEN3)
    assert tok.use_fast_bpe() is None
    specials = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "<|endoftext|>"]
    rng = random.Random(9)
    texts = [
        "".join(
            f"<|im_start|>{role}\n{body}<|im_end|>\n"
            for role, body in zip(
                ["system", "user", "assistant"] * 2, chat_texts(rng, 6, specials), strict=True
            )
        )
        for _ in range(300)
    ]
    texts += chat_texts(rng, 1000, specials) + ["<|im_start|>user\ncafe\u0301<|im_end|>\n"]
    assert_same_ids(tok, tok._tok, texts)
    report = tok.fast_bpe_report()
    assert report["fast_texts"] == report["texts"] - 1
    assert report["left"] == {"text not in the normalizer's normal form": 1}
