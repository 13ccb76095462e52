"""Exact fast path for byte-level BPE tokenizers: `tiktoken` where its ids provably equal
`tokenizers'`.

Tokenising is about 90% of `pipeline build`'s CPU, and `tiktoken` encodes the same byte-level
BPE about 4x faster per document. It is used only where the ids cannot differ:

The tokenizer (checked once, by `FastBPE.check`): a BPE model without dropout or subword
affixes, a token for every byte, a distinct token made by each merge, and every such token being
what the merges make of its own bytes; GPT-2's byte-level split or one of the known GPT-4-style
splits (Llama 3, Qwen2) before a plain byte-level mapping; a normalizer that leaves ASCII as it
is. Why that suffices: `tokenizers` merges the adjacent pair of lowest merge rank, `tiktoken`
the adjacent pair whose joined bytes have the lowest rank, leftmost first in both. Ranking each
merge's token by the merge's index makes the two orders agree on every pair that is a merge rule.
A pair that is not a rule but joins into a ranked token t cannot meet in a `tokenizers` state: if
it did, the merges run on t's bytes alone would reach that same pair and stop short of t, which
the check rules out. So both take the same pair at every step, and a piece that is a whole token
(`tiktoken` returns it at once) is what the merges make of it.

Each document (checked per batch, vectorised): only text of printable ASCII, tab, newline and
carriage return, holding no added token's content, goes to `tiktoken`. There the two regex
engines (Oniguruma in `tokenizers`, fancy-regex in `tiktoken`) cannot disagree on a character
class, and no added token splits the text; a probe set over that alphabet is compared with
`tokenizers` when the fast path is set up. Every other document goes to `tokenizers`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# The GPT-4-style splits of Llama 3 (digits in threes) and Qwen2 (single digits), as their
# tokenizer.json files spell them.
_GPT4_STYLE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = (GPT2_SPLIT, _GPT4_STYLE % "{1,3}", _GPT4_STYLE % "")
# Unicode normalizers leave every ASCII character as it is.
_ASCII_NEUTRAL_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD"})
_FAST_ALPHABET = "\t\n\r" + "".join(chr(c) for c in range(0x20, 0x7F))
# An RE2 pattern (pyarrow.compute) matching any character outside the fast alphabet.
_OUTSIDE_ALPHABET = r"[^\t\n\r\x20-\x7e]"


def byte_chars() -> list[str]:
    """The character that byte-level BPE vocabularies write for each byte value (GPT-2's table:
    printable Latin-1 bytes stand for themselves, the others for code points from 256 up)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: list[str] = [""] * 256
    shifted = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return chars


@dataclass
class FastBPE:
    """Encodes the documents it accepts with `tiktoken`; `check` builds one or says why not."""

    encoding: object  # tiktoken.Encoding over merge-ordered ranks
    rank_to_id: np.ndarray  # (256 + merges,) uint32: the tokenizer's id of each tiktoken rank
    outside: str  # RE2 pattern: a document matching it goes to `tokenizers`
    added: tuple[str, ...]  # added tokens' contents within the fast alphabet
    split_name: str
    documents: int = 0  # documents encoded here so far (all threads)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def check(cls, tok) -> FastBPE | str:
        """The fast path for the `tokenizers.Tokenizer` `tok`, or why it has none (one line)."""
        try:
            import tiktoken
        except ImportError:
            return "tiktoken is not installed (pip install tiktoken)"
        spec = json.loads(tok.to_str())
        reason = _unsupported_shape(spec)
        if reason:
            return reason
        split = _split_pattern(spec.get("pre_tokenizer"))
        if split is None:
            return "its pre-tokenizer is not a known byte-level split"
        model = spec["model"]
        vocab: dict[str, int] = model["vocab"]
        chars = byte_chars()
        missing = [c for c in chars if c not in vocab]
        if missing:
            return f"{len(missing)} of the 256 byte tokens are missing from its vocabulary"
        decode = {c: b for b, c in enumerate(chars)}
        merges = [
            tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]
        ]
        ranks = {bytes([b]): b for b in range(256)}
        rank_to_id = np.zeros(256 + len(merges), dtype=np.uint32)
        rank_to_id[:256] = [vocab[c] for c in chars]
        for i, (left, right) in enumerate(merges):
            joined = left + right
            if any(c not in decode for c in joined):
                continue  # never formed from a byte-level piece
            raw = bytes(decode[c] for c in joined)
            if raw in ranks:
                return f"two merges make the token {joined!r}"
            ranks[raw] = 256 + i
            rank_to_id[256 + i] = vocab[joined]
        added = {t.content for t in tok.get_added_tokens_decoder().values() if t.content}
        if model.get("ignore_merges"):
            # tokenizers then takes a whole piece that is any vocabulary entry; tiktoken only a
            # ranked one.
            orphans = [
                c
                for c in vocab
                if all(ch in decode for ch in c)
                and bytes(decode[ch] for ch in c) not in ranks
                and c not in added
            ]
            if orphans:
                return f"it takes whole words ({len(orphans)} tokens no merge makes)"
        unreachable = _unreachable(vocab, merges, ranks, chars)
        if unreachable:
            return (
                f"its merges do not make {unreachable!r} from that token's own bytes, so "
                "tiktoken's merge order would differ"
            )
        name = "lowmem-" + hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
        encoding = tiktoken.Encoding(name, pat_str=split, mergeable_ranks=ranks, special_tokens={})
        ascii_added = tuple(sorted(t for t in added if all(c in _FAST_ALPHABET for c in t)))
        outside = "|".join(
            [_OUTSIDE_ALPHABET, *("".join(f"\\x{{{ord(c):02x}}}" for c in t) for t in ascii_added)]
        )
        split_name = "GPT-2" if split == GPT2_SPLIT else "GPT-4-style"
        fast = cls(encoding, rank_to_id, outside, ascii_added, split_name)
        mismatch = fast._probe(tok)
        if mismatch is not None:
            return f"tiktoken and tokenizers disagree on {mismatch!r}"
        return fast

    def accepts(self, texts: pa.Array) -> np.ndarray:
        """(len(texts),) bool: the documents this path encodes (null texts never)."""
        other = pc.fill_null(pc.match_substring_regex(texts, self.outside), True)
        # As uint8, the array converts without a copy (and without importing pandas).
        return other.cast(pa.uint8()).to_numpy() == 0

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(uint32 ids back to back, int64 lengths) of `texts`, each accepted by `accepts`."""
        # encode_ordinary releases the GIL, so --num-proc threads encode in parallel.
        ranks = list(map(self.encoding.encode_ordinary, texts))
        lengths = np.fromiter(map(len, ranks), dtype=np.int64, count=len(ranks))
        flat = np.fromiter(
            itertools.chain.from_iterable(ranks), dtype=np.uint32, count=int(lengths.sum())
        )
        with self._lock:
            self.documents += len(texts)
        return self.rank_to_id[flat], lengths

    def _probe(self, tok) -> str | None:
        """The first probe text whose ids differ between the two paths, or None."""
        # Every probe is in the fast alphabet; those holding an added token are not accepted.
        # (Filtered here, as pa.array() on Python strings would import pandas: 0.3 s.)
        texts = [t for t in _probe_texts() if not any(a in t for a in self.added)]
        values, lengths = self.encode(texts)
        self.documents = 0
        expected = tok.encode_batch_fast(texts, add_special_tokens=False)
        ends = np.cumsum(lengths)
        for text, end, length, want in zip(texts, ends, lengths, expected, strict=True):
            if values[end - length : end].tolist() != want.ids:
                return text
        return None


def _unsupported_shape(spec: dict) -> str | None:
    normalizer = spec.get("normalizer")
    steps = [] if normalizer is None else normalizer.get("normalizers", [normalizer])
    if normalizer is not None and normalizer.get("type") != "Sequence":
        steps = [normalizer]
    for step in steps:
        if step.get("type") not in _ASCII_NEUTRAL_NORMALIZERS:
            return f"its normalizer {step.get('type')} may change ASCII text"
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')}, not BPE"
    if model.get("dropout"):
        return "its BPE samples merges (dropout)"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "its BPE marks subwords (prefix or suffix)"
    return None


def _split_pattern(pre: dict | None) -> str | None:
    """The regex that splits text into pieces before the byte-level mapping, if it is known."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        plain = not pre.get("add_prefix_space") and pre.get("use_regex", True)
        return GPT2_SPLIT if plain else None
    steps = pre.get("pretokenizers", [])
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return None
    split, level = steps
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or level.get("type") != "ByteLevel"
        or level.get("add_prefix_space")
        or level.get("use_regex", True)
    ):
        return None
    pattern = (split.get("pattern") or {}).get("Regex")
    return pattern if pattern in KNOWN_SPLITS else None


def _unreachable(
    vocab: dict[str, int], merges: list[tuple], ranks: dict[bytes, int], chars: list[str]
) -> str | None:
    """A ranked token that `tokenizers`' merges, run on its own bytes, do not make; or None."""
    from tokenizers import Tokenizer, models

    merges_only = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    multi = [(raw, rank) for raw, rank in ranks.items() if len(raw) > 1]
    words = ["".join(chars[b] for b in raw) for raw, _ in multi]
    for word, encoding in zip(words, merges_only.encode_batch_fast(words), strict=True):
        if len(encoding.ids) != 1 or encoding.ids[0] != vocab[word]:
            return word
    return None


def _probe_texts() -> list[str]:
    """Short texts over the fast alphabet that exercise every branch of the known splits:
    each character alone and beside each other one, three-character runs of class
    representatives, contractions in both cases, digit runs and whitespace runs."""
    texts = list(_FAST_ALPHABET)
    texts += [a + b for a in _FAST_ALPHABET for b in _FAST_ALPHABET]
    representatives = "aZsSlLdD7 \t\n\r'.<"
    texts += ["".join(p) for p in itertools.product(representatives, repeat=3)]
    for suffix in ("s", "t", "re", "ve", "m", "ll", "d"):
        for case in (suffix, suffix.upper()):
            texts += [f"it'{case}", f"It '{case} x", f"'{case}'{case}"]
    texts += ["1" * n + " " + "9" * n + "x" for n in range(1, 9)]
    texts += [
        " " * n + w + " " * m for n in range(4) for m in range(4) for w in ("word", "\n", "x\ty")
    ]
    texts += [
        "Hello world!  How are you?\r\n\r\nFine,\tthanks...\n\n   indented\n",
        "x = f(a_b, c-d) // 2; <tag attr='v'>text</tag>\n    return None  \n",
        "Numbers: 3.14159, 1,000,000 and 2026-12-02T10:00Z; email me@host.org",
    ]
    return texts
