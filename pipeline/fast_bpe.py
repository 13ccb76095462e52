r"""Exact fast path for byte-level BPE tokenizers: `tiktoken` where its ids provably equal
`tokenizers'`.

Tokenising is about 90% of `pipeline build`'s CPU, and `tiktoken` encodes the same byte-level
BPE about 4x faster per document. It is used only where the ids cannot differ:

The tokenizer (checked once, by `FastBPE.check`): a BPE model without dropout or subword
affixes, a token for every byte, a distinct token made by each merge, and every such token being
what the merges make of its own bytes; GPT-2's byte-level split or one of the known GPT-4-style
splits (Llama 3, Qwen2) before a plain byte-level mapping; no normalizer but Unicode normal
forms. Why that suffices: `tokenizers` merges the adjacent pair of lowest merge rank, `tiktoken`
the adjacent pair whose joined bytes have the lowest rank, leftmost first in both. Ranking each
merge's token by the merge's index makes the two orders agree on every pair that is a merge rule.
A pair that is not a rule but joins into a ranked token t cannot meet in a `tokenizers` state: if
it did, the merges run on t's bytes alone would reach that same pair and stop short of t, which
the check rules out. So both take the same pair at every step, and a piece that is a whole token
(`tiktoken` returns it at once) is what the merges make of it.

The pieces (checked per document, vectorised): the known splits see of a character only whether
it is a letter (\p{L}), a number (\p{N}) or whitespace (\s), and, in the GPT-4-style contractions,
its case. So a document goes to `tiktoken` unless it holds a character on which the two regex
engines (Oniguruma in `tokenizers`, fancy-regex in `tiktoken`) disagree about a class (found by
running each class over every code point in both, kept in the user's cache), a character that
case-maps to a contraction's letters, or an added token that `tokenizers` matches in a way a
plain search does not (lstrip, rstrip, single_word, or on normalised text); and, with a
normalizer, unless it is already in that normal form. Under a case-insensitive split or a
normalizer, a code point that Python's Unicode tables leave unassigned also sends it to
`tokenizers`. A probe set is compared with `tokenizers` when the fast path is set up.

Added tokens (a chat's `<|im_start|>`, `<|im_end|>`): `tokenizers` first cuts the raw text at
every added token whose flags are all off and that is matched on the raw text, leftmost-longest,
and then normalises, splits and merges each piece between them on its own. So a text holding
such tokens is cut the same way here (the longest token first at each place), each piece is
judged and encoded as a document, and the token's id goes between them; the text goes to
`tiktoken` when every piece does.

The check takes seconds for a 150k-merge vocabulary, so its outcome is kept in the user's
cache, one file per tokenizer.json and library versions (`check(tok, cache_key=...)`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import unicodedata
import zipfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lowmem_core.durable import atomic_file
from pipeline.index_cache import user_cache_root

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# The GPT-4-style splits of Llama 3 (digits in threes) and Qwen2 (single digits), as their
# tokenizer.json files spell them.
_GPT4_STYLE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = (GPT2_SPLIT, _GPT4_STYLE % "{1,3}", _GPT4_STYLE % "")
# Normalizers that leave a text already in their normal form as it is.
_NORMAL_FORMS = frozenset({"NFC", "NFD", "NFKC", "NFKD"})
_CONTRACTIONS = frozenset({"s", "t", "re", "ve", "m", "ll", "d"})
_LAST_CODE_POINT = 0x10FFFF
_FACTS = ("classes_differ", "case_maps_to_contraction", "unassigned")
# Why a text left the fast path, by the code `FastBPE.reasons` gives it (0: it did not).
LEFT_REASONS = (
    "",
    "no text (null)",
    "an added token tokenizers matches with lstrip, rstrip, single_word or after normalising",
    "a character the two regex engines may split differently",
    "text not in the normalizer's normal form",
)
_NULL, _ADDED, _CHARACTER, _NOT_NORMAL = 1, 2, 3, 4
# Bump when what the check caches changes shape.
_CHECK_CACHE_VERSION = 1


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
    outside: str | None  # RE2 class of the characters that send a document to `tokenizers`
    forms: tuple[str, ...]  # the normalizer's Unicode normal forms, in order
    split_name: str
    cut_at: dict[str, int]  # added tokens texts are cut at first, as tokenizers does: text -> id
    refused_added: tuple[str, ...]  # added tokens it cannot match as tokenizers does
    split: str  # the pre-tokenizer's regex, as `encoding` splits with it

    def __post_init__(self) -> None:
        # Longest first: at each place Python's alternation takes the first that matches, which
        # is then the longest, as tokenizers' leftmost-longest matching takes.
        longest = sorted(self.cut_at, key=len, reverse=True)
        self._cut_re = (
            re.compile("(" + "|".join(map(re.escape, longest)) + ")") if longest else None
        )
        self._cut_any = _re2_alternation(longest)
        self._refused_any = _re2_alternation(self.refused_added)
        # Each token cut at gets a rank past the merges', so one id lookup serves both.
        self._cut_rank = {t: self.rank_to_id.size + k for k, t in enumerate(self.cut_at)}
        self._all_ids = np.concatenate(
            [self.rank_to_id, np.array(list(self.cut_at.values()), dtype=np.uint32)]
        )

    @classmethod
    def check(cls, tok, cache_key: str | None = None) -> FastBPE | str:
        """The fast path for the `tokenizers.Tokenizer` `tok`, or why it has none (one line).
        `cache_key` names `tok`'s tokenizer.json (a digest of it): the outcome is then kept in
        the user's cache and read back next time."""
        try:
            import tiktoken
        except ImportError:
            return "tiktoken is not installed (pip install tiktoken)"
        if cache_key is None:
            return cls._check(tok, tiktoken)
        path = _check_cache_path(cache_key, tiktoken)
        cached = _read_check(path, tiktoken)
        if cached is not None:
            return cached
        found = cls._check(tok, tiktoken)
        _write_check(path, found)
        return found

    @classmethod
    def _check(cls, tok, tiktoken) -> FastBPE | str:
        saved = tok.to_str()
        spec = json.loads(saved)
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
        added_tokens = tok.get_added_tokens_decoder()
        added = {t.content for t in added_tokens.values() if t.content}
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
        name = "lowmem-" + hashlib.sha256(saved.encode()).hexdigest()[:16]
        encoding = tiktoken.Encoding(name, pat_str=split, mergeable_ranks=ranks, special_tokens={})
        forms = tuple(step["type"] for step in _normalizer_steps(spec.get("normalizer")))
        unsafe = unsafe_code_points("(?i" in split, bool(forms))
        outside = _re2_class(unsafe) if unsafe.size else None
        cut_at, refused_added = {}, []
        for token_id, t in sorted(added_tokens.items()):
            if not t.content:
                continue
            if t.lstrip or t.rstrip or t.single_word or t.normalized:
                refused_added.append(t.content)
            else:
                cut_at[t.content] = int(token_id)
        split_name = "GPT-2" if split == GPT2_SPLIT else "GPT-4-style"
        fast = cls(
            encoding, rank_to_id, outside, forms, split_name, cut_at, tuple(refused_added), split
        )
        mismatch = fast._probe(tok)
        if mismatch is not None:
            return f"tiktoken and tokenizers disagree on {mismatch!r}"
        return fast

    def accepts(self, texts: pa.Array, strings: list | None = None) -> np.ndarray:
        """(len(texts),) bool: the documents this path encodes (null texts never). `strings`:
        the same texts as Python strings, where the caller has them already."""
        return self.reasons(texts, strings) == 0

    def reasons(self, texts: pa.Array, strings: list | None = None) -> np.ndarray:
        """(len(texts),) uint8: 0 where this path encodes the document, else why not (an index
        into LEFT_REASONS). A document holding added tokens is judged piece by piece."""
        codes = self._whole_reasons(texts, strings)
        if self._cut_any is None:
            return codes
        holds = pc.fill_null(pc.match_substring_regex(texts, self._cut_any), False)
        held = np.flatnonzero(holds.to_numpy(zero_copy_only=False) & (codes == 0))
        if held.size == 0:
            return codes
        if strings is None:
            held_strings = texts.take(held).to_pylist()
        else:
            held_strings = [strings[i] for i in held]
        # re.split with one group gives [piece, token, piece, ..., piece]: the pieces are even.
        pieces = [self._cut_re.split(text)[::2] for text in held_strings]
        counts = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        flat = list(itertools.chain.from_iterable(pieces))
        piece_codes = self._whole_reasons(pa.array(flat, type=pa.large_string()), flat)
        codes[held] = np.maximum.reduceat(piece_codes, _starts(counts))
        return codes

    def _whole_reasons(self, texts: pa.Array, strings: list | None) -> np.ndarray:
        codes = np.where(pc.is_null(texts).to_numpy(zero_copy_only=False), _NULL, 0)
        codes = codes.astype(np.uint8)
        for pattern, code in ((self._refused_any, _ADDED), (self.outside, _CHARACTER)):
            if pattern is None:
                continue
            found = pc.fill_null(pc.match_substring_regex(texts, pattern), False)
            codes[(codes == 0) & found.to_numpy(zero_copy_only=False)] = code
        if self.forms:
            # ASCII is in every normal form; other text is checked as the normalizer would see it.
            ascii_text = pc.fill_null(pc.string_is_ascii(texts), True).to_numpy(
                zero_copy_only=False
            )
            check = np.flatnonzero((codes == 0) & ~ascii_text)
            if strings is None:
                found = texts.take(check).to_pylist()
            else:
                found = [strings[i] for i in check]
            for i, text in zip(check, found, strict=True):
                if not all(unicodedata.is_normalized(form, text) for form in self.forms):
                    codes[i] = _NOT_NORMAL
        return codes

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(uint32 ids back to back, int64 lengths) of `texts`, each accepted by `accepts`."""
        # encode_ordinary releases the GIL, so --num-proc threads encode in parallel.
        if self._cut_re is None:
            ranks = list(map(self.encoding.encode_ordinary, texts))
        else:
            ranks = list(map(self._encode_cut, texts))
        lengths = np.fromiter(map(len, ranks), dtype=np.int64, count=len(ranks))
        flat = np.fromiter(
            itertools.chain.from_iterable(ranks), dtype=np.uint32, count=int(lengths.sum())
        )
        return self._all_ids[flat], lengths

    def _encode_cut(self, text: str) -> list[int]:
        """Ranks of `text` cut at its added tokens: each piece encoded alone, each token its own
        rank past the merges'."""
        parts = self._cut_re.split(text)
        if len(parts) == 1:
            return self.encoding.encode_ordinary(text)
        ranks: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ranks.append(self._cut_rank[part])
            elif part:
                ranks.extend(self.encoding.encode_ordinary(part))
        return ranks

    def _probe(self, tok) -> str | None:
        """The first probe text whose ids differ between the two paths, or None."""
        texts = _probe_texts()
        for token in itertools.islice(itertools.chain(self.cut_at, self.refused_added), 64):
            # Added tokens between, beside and inside text, and glued to each other.
            texts += [token, f"a{token}b", f" {token} ", f"\n{token}\n\n", token + token]
            texts += [f"x{token[:-1]}", f"{token[1:]}y", f"héllo{token}wörld 12"]
        accepted = self.accepts(pa.array(texts, type=pa.large_string()), texts)  # as documents
        texts = [t for t, ok in zip(texts, accepted, strict=True) if ok]
        values, lengths = self.encode(texts)
        expected = tok.encode_batch_fast(texts, add_special_tokens=False)
        ends = np.cumsum(lengths)
        for text, end, length, want in zip(texts, ends, lengths, expected, strict=True):
            if values[end - length : end].tolist() != want.ids:
                return text
        return None


def _normalizer_steps(normalizer: dict | None) -> list[dict]:
    """The normalizers a tokenizer.json applies, in order."""
    if normalizer is None:
        return []
    if normalizer.get("type") == "Sequence":
        return normalizer.get("normalizers", [])
    return [normalizer]


def _unsupported_shape(spec: dict) -> str | None:
    for step in _normalizer_steps(spec.get("normalizer")):
        if step.get("type") not in _NORMAL_FORMS:
            return f"its normalizer {step.get('type')} changes text a Unicode normal form keeps"
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
    words = ["".join(chars[b] for b in raw) for raw in ranks if len(raw) > 1]
    for word, encoding in zip(words, merges_only.encode_batch_fast(words), strict=True):
        if len(encoding.ids) != 1 or encoding.ids[0] != vocab[word]:
            return word
    return None


@functools.cache
def unsafe_code_points(case_insensitive: bool, normalized: bool) -> np.ndarray:
    """Sorted code points (uint32) that may split differently in the two regex engines: those
    whose letter/number/whitespace class the engines disagree on; with `case_insensitive`,
    those that case-map to a contraction's letters; with either, those Python's Unicode tables
    leave unassigned (the other tables may map or normalise them)."""
    found = _code_point_facts()
    parts = [found["classes_differ"]]
    if case_insensitive:
        parts.append(found["case_maps_to_contraction"])
    if case_insensitive or normalized:
        parts.append(found["unassigned"])
    return np.unique(np.concatenate(parts))


def _code_point_facts() -> dict[str, np.ndarray]:
    """What `unsafe_code_points` combines, for every code point. Finding it takes 2-3 s, so it
    is kept in the user's cache, one file per version of the libraries and tables it reads."""
    import tiktoken
    import tokenizers

    versions = f"{tokenizers.__version__}-{tiktoken.__version__}-{unicodedata.unidata_version}"
    path = user_cache_root() / "fast-bpe" / f"code-points-{versions}.npz"
    try:
        with np.load(path) as saved:
            return {key: saved[key] for key in _FACTS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # not there yet, or damaged: find it again
    facts = _find_code_point_facts()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            np.savez_compressed(f, **facts)
    except OSError:
        pass  # an unwritable cache only means finding it again next time
    return facts


def _find_code_point_facts() -> dict[str, np.ndarray]:
    import tiktoken
    from tokenizers import Regex, pre_tokenizers

    every = np.concatenate([np.arange(0xD800), np.arange(0xE000, _LAST_CODE_POINT + 1)])
    every = every.astype(np.uint32)
    text = every.tobytes().decode("utf-32-le")
    byte_ranks = {bytes([b]): b for b in range(256)}
    differ = [np.zeros(0, dtype=np.uint32)]
    for cls in (r"\p{L}", r"\p{N}", r"\s"):
        # tiktoken keeps only the text its pattern matches; a "removed" split only the rest.
        only = tiktoken.Encoding(
            "lowmem-class", pat_str=cls, mergeable_ranks=byte_ranks, special_tokens={}
        )
        matched = bytes(only.encode_ordinary(text)).decode("utf-8").encode("utf-32-le")
        member = np.ones(every.size, dtype=bool)
        for _, (start, end) in pre_tokenizers.Split(Regex(cls), "removed").pre_tokenize_str(text):
            member[start:end] = False
        differ.append(np.setxor1d(every[member], np.frombuffer(matched, dtype=np.uint32)))
    beyond_ascii = [chr(c) for c in every.tolist() if c >= 0x80]
    # A subject character matches a case-insensitive pattern letter only as a whole: long s
    # (folds to s) can stand for "s", while sharp s (folds to "ss") cannot.
    case_maps = [
        ord(c)
        for c in beyond_ascii
        if any(m.casefold() in _CONTRACTIONS for m in (c, c.lower(), c.upper()))
    ]
    unassigned = [ord(c) for c in beyond_ascii if unicodedata.category(c) == "Cn"]
    return {
        "classes_differ": np.unique(np.concatenate(differ)),
        "case_maps_to_contraction": np.array(case_maps, dtype=np.uint32),
        "unassigned": np.array(unassigned, dtype=np.uint32),
    }


def _re2_class(code_points: np.ndarray) -> str:
    """An RE2 character class matching exactly `code_points` (sorted, unique), as ranges."""
    breaks = np.flatnonzero(np.diff(code_points.astype(np.int64)) != 1)
    starts = code_points[np.concatenate([[0], breaks + 1])]
    ends = code_points[np.concatenate([breaks, [code_points.size - 1]])]
    ranges = (
        f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}"
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True)
    )
    return "[" + "".join(ranges) + "]"


def _probe_texts() -> list[str]:
    """Short texts that exercise every branch of the known splits: each printable ASCII
    character and one of each kind beyond (letters of several scripts, numbers that are not
    digits, Unicode spaces, marks, symbols) alone and beside each other; three-character runs of
    class representatives; contractions in both cases; digit runs and whitespace runs."""
    ascii_chars = "\t\n\r\x0b\x0c" + "".join(chr(c) for c in range(0x20, 0x7F))
    beyond = "éßİıΣσ中ー한٣Ⅻ½\u00a0\u3000\u2028\u0085\u0301\u200d€😀\U000e0041"
    alphabet = ascii_chars + beyond
    texts = list(alphabet)
    texts += [a + b for a in alphabet for b in alphabet]
    representatives = "aZsSlLdD7 \t\n\r'.<é中٣\u3000"
    texts += ["".join(p) for p in itertools.product(representatives, repeat=3)]
    for suffix in ("s", "t", "re", "ve", "m", "ll", "d"):
        for case in (suffix, suffix.upper()):
            texts += [f"it'{case}", f"It '{case} x", f"'{case}'{case}", f"l'{case}é"]
    texts += ["1" * n + " " + "9" * n + "x" + "٣" * n for n in range(1, 9)]
    texts += [
        " " * n + w + " " * m for n in range(4) for m in range(4) for w in ("word", "\n", "x\ty")
    ]
    texts += [
        "Hello world!  How are you?\r\n\r\nFine,\tthanks...\n\n   indented\n",
        "x = f(a_b, c-d) // 2; <tag attr='v'>text</tag>\n    return None  \n",
        "Numbers: 3.14159, 1,000,000 and 2026-12-02T10:00Z; email me@host.org",
        "Ça coûte 12 € — « très » cher !\u00a0Déjà vu.\n",
        "東京は晴れ。気温は２５度です。\u3000次の段落\n",
        "Привет, мир! Ёлка 2024 г.\n",
        "مرحبا ٣٤٥ بالعالم\n",
    ]
    return texts


def _starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _re2_alternation(texts) -> str | None:
    """An RE2 pattern matching any of `texts` literally, or None for none."""
    escaped = ["".join(f"\\x{{{ord(c):x}}}" for c in t) for t in texts]
    return "|".join(escaped) or None


def _check_cache_path(cache_key: str, tiktoken):
    import tokenizers

    versions = f"{tokenizers.__version__}-{tiktoken.__version__}-{unicodedata.unidata_version}"
    name = f"check-{_CHECK_CACHE_VERSION}-{cache_key}-{versions}.npz"
    return user_cache_root() / "fast-bpe" / name


def _read_check(path, tiktoken) -> FastBPE | str | None:
    """The check's kept outcome, or None when there is none (or it cannot be read)."""
    try:
        with np.load(path) as saved:
            meta = json.loads(str(saved["meta"]))
            if "refused" in meta:
                return meta["refused"]
            token_bytes, offsets = saved["token_bytes"].tobytes(), saved["offsets"]
            rank_to_id = saved["rank_to_id"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    bounds = offsets.tolist()
    ranks = {
        token_bytes[a:b]: rank
        for rank, (a, b) in enumerate(itertools.pairwise(bounds))
        if b > a  # a merge never formed from a byte-level piece has no bytes and no rank
    }
    encoding = tiktoken.Encoding(
        meta["name"], pat_str=meta["split"], mergeable_ranks=ranks, special_tokens={}
    )
    return FastBPE(
        encoding,
        rank_to_id,
        meta["outside"],
        tuple(meta["forms"]),
        meta["split_name"],
        meta["cut_at"],
        tuple(meta["refused_added"]),
        meta["split"],
    )


def _write_check(path, found: FastBPE | str) -> None:
    if isinstance(found, str):
        arrays = {"meta": np.array(json.dumps({"refused": found}))}
    else:
        by_rank = [_token_bytes(found.encoding, rank) for rank in range(found.rank_to_id.size)]
        offsets = np.zeros(len(by_rank) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in by_rank], out=offsets[1:])
        meta = {
            "name": found.encoding.name,
            "split": found.split,
            "outside": found.outside,
            "forms": list(found.forms),
            "split_name": found.split_name,
            "cut_at": found.cut_at,
            "refused_added": list(found.refused_added),
        }
        arrays = {
            "meta": np.array(json.dumps(meta)),
            "token_bytes": np.frombuffer(b"".join(by_rank), dtype=np.uint8),
            "offsets": offsets,
            "rank_to_id": found.rank_to_id,
        }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            np.savez(f, **arrays)
    except OSError:
        pass  # an unwritable cache only means checking again next time


def _token_bytes(encoding, rank: int) -> bytes:
    """The bytes of `rank`, or none where no merge made a byte-level token there."""
    try:
        return encoding.decode_single_token_bytes(rank)
    except KeyError:
        return b""
