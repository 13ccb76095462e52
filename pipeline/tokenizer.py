"""Tokenizers for `pipeline build`: the built-in byte tokenizer and a Hugging Face tokenizer.

A Hugging Face tokenizer is a `tokenizers` tokenizer.json, given as the file or as the model or
tokenizer folder holding it; in a folder, BOS/EOS/PAD come from tokenizer_config.json (or
special_tokens_map.json), as `transformers` reads them. Both kinds encode a whole batch of texts
at once and return flat token values plus per-document lengths, so the builder never loops per
token in Python. With `use_fast_bpe`, a byte-level BPE tokenizer hands the documents where
`tiktoken` provably gives its ids to `tiktoken` (pipeline/fast_bpe.py), about 4x faster.
Both say where a long document may be cut (`safe_cut`) so that its pieces, tokenised apart and
joined, give the ids of the whole.

Special tokens in stored documents: EOS is never stored (the loader puts `eos_id` after every
document), and a BOS that the tokenizer's post-processor puts before a text starts every
stored document, as `tokenizer(text)["input_ids"]` starts, so packed rows read
`BOS doc EOS BOS doc EOS ...` (Llama, Mistral, Gemma); token-id inputs are stored as given.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lowmem_core.errors import PipelineError, require_extra
from pipeline.fast_bpe import LEFT_REASONS, FastBPE, byte_chars

# Special tokens of the byte tokenizer sit right after the 256 byte values.
BYTE_BOS_ID, BYTE_EOS_ID, BYTE_PAD_ID = 256, 257, 258
BYTE_VOCAB_SIZE = 259

# A cut of a long document is judged on this many characters each side of it, by the tokenizer
# itself, and looked for this many characters at a time (JsonTokenizer.safe_cut).
CUT_MARGIN = 256
_CUT_WINDOW = 4096
# SentencePiece models as tokenizer.json writes them: a normalizer that writes "▁" for every
# space (Gemma), after one before the text (Llama 2, Mistral 7B v0.1: PREPEND).
_SPACE_TO_MARK = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
_PREPEND_MARK = {"type": "Prepend", "prepend": "\u2581"}


@dataclass(frozen=True)
class _SpaceCuts:
    """A SentencePiece model whose whole text is one pre-token, cut before a space instead: no
    token holds "▁" after a character outside `joiners`, so no merge joins a word to the "▁"
    of the space after it (Llama 2: none; Gemma 3: ">", of ">▁</")."""

    joiners: frozenset[str]
    drops_space: bool  # the model puts "▁" before every text: a piece after a cut loses its space


# Names under which bare tokenizer.json files commonly declare their specials, most specific first.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]", "<|end_of_text|>")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "[CLS]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Encoded:
    """A batch of encoded documents: `values` holds all tokens back to back."""

    values: np.ndarray  # (sum(lengths),) uint32 token ids
    lengths: np.ndarray  # (num_docs,) int64 tokens per document


def with_prefix(encoded: Encoded, prefix: tuple[int, ...], where: np.ndarray) -> Encoded:
    """`encoded` with the ids of `prefix` put before each document where `where` (bool) is set."""
    if not prefix or not where.any():
        return encoded
    add = np.where(where, len(prefix), 0)
    lengths = encoded.lengths + add
    starts = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    values = np.empty(int(starts[-1]), dtype=np.uint32)
    # Token k of document i moves right by the prefixes before it and its own.
    shift = np.repeat(np.cumsum(add), encoded.lengths)
    values[np.arange(encoded.values.size) + shift] = encoded.values
    heads = starts[:-1][where]
    for j, token in enumerate(prefix):
        values[heads + j] = token
    return Encoded(values=values, lengths=lengths)


class ByteTokenizer:
    """ids 0-255 are UTF-8 bytes; 256 BOS, 257 EOS, 258 PAD. Needs no download."""

    kind = "byte"
    id = "byte-v1"
    source = None
    vocab_size = BYTE_VOCAB_SIZE
    bos_id, eos_id, pad_id = BYTE_BOS_ID, BYTE_EOS_ID, BYTE_PAD_ID
    prefix: tuple[int, ...] = ()

    def encode_arrow(self, texts: pa.Array, continues: bool = False) -> Encoded:
        binary = texts.cast(pa.large_binary())
        offsets = np.frombuffer(binary.buffers()[1], dtype=np.int64)[
            binary.offset : binary.offset + len(binary) + 1
        ]
        data = binary.buffers()[2]
        raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        values = raw[offsets[0] : offsets[-1]].astype(np.uint32)
        return Encoded(values=values, lengths=np.diff(offsets))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def safe_cut(self, text: str, lo: int, hi: int, partial: bool = False) -> int | None:
        """Any place: every character's bytes are its ids (see JsonTokenizer.safe_cut)."""
        hi = min(hi, len(text) - 1)
        return hi if hi >= max(lo, 1) else None


class JsonTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json, alone or in a model/tokenizer folder."""

    kind = "tokenizers"

    def __init__(self, path: Path, eos_token: str | None = None):
        Tokenizer = require_extra("tokenizers", "tokenizers", "a tokenizer.json").Tokenizer
        folder = path if path.is_dir() else None
        file = _tokenizer_file(path)
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise PipelineError(
                f"{file} is not a valid tokenizer.json ({exc}); pass a file saved by `tokenizers`"
            ) from None
        # A tokenizer.json saved with truncation or padding would cut or pad every document.
        self._tok.no_truncation()
        self._tok.no_padding()
        # Where `safe_cut` may cut: before a space, or where the pre-tokenizer splits.
        self._space_cuts = _space_cuts(self._tok)
        self._fast: FastBPE | None = None
        self._fast_refused: str | None = None  # why `use_fast_bpe` found no exact fast path
        self._texts = [0, 0]  # encoded by the fast path, encoded in all (with it in use)
        self._left = np.zeros(len(LEFT_REASONS), dtype=np.int64)  # texts that left it, by why
        self._byte_lengths: np.ndarray | None = None  # (vocab_size,) int64, byte-level only
        self._count_lock = threading.Lock()  # --num-proc threads encode at once
        self.source = str(path.resolve())
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Added tokens may sit past the base vocabulary with gaps: the largest id decides.
        self.vocab_size = max(
            self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1
        )
        config = _special_config(folder) if folder is not None else {}
        where = f"{folder}/{config.get('_file')}" if config else str(file)
        self.eos_id = self._special(config, "eos_token", eos_token, where, vocab, _EOS_NAMES)
        if self.eos_id is None:
            raise PipelineError(
                f"{where} declares no end-of-text token (looked for {', '.join(_EOS_NAMES)}); "
                "pass --eos-token TOKEN naming the tokenizer's end-of-text token"
            )
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        added = _prefix_of(full, plain)
        self.bos_id = self._special(
            config, "bos_token", None, where, vocab, _BOS_NAMES if not config else ()
        )
        if self.bos_id is None and len(added) == 1 and added[0] != self.eos_id:
            self.bos_id = added[0]
        # What the post-processor puts before a text, less an EOS (the loader adds those).
        self.prefix = tuple(i for i in added if i != self.eos_id)
        self.pad_id = self._special(
            config, "pad_token", None, where, vocab, _PAD_NAMES if not config else ()
        )
        if self.pad_id is None:
            self.pad_id = self.eos_id  # padded positions carry label -100, so their id never trains
        digest = hashlib.sha256(file.read_bytes())
        digest.update(json.dumps([self.bos_id, self.eos_id, self.pad_id, self.prefix]).encode())
        self.id = "tokenizers-" + digest.hexdigest()[:16]

    def _special(
        self,
        config: dict,
        key: str,
        override: str | None,
        where: str,
        vocab: dict,
        names: tuple[str, ...],
    ) -> int | None:
        if override is not None:
            if override not in vocab:
                raise PipelineError(
                    f"--eos-token {override!r} is not a token of {self.source}; pass one of its "
                    f"special tokens ({', '.join(sorted(_added_tokens(self._tok))) or 'none'})"
                )
            return int(vocab[override])
        if key in config:
            token = config[key]
            if token is None:
                return None
            if token not in vocab:
                raise PipelineError(
                    f"{where} names {key} {token!r} but the tokenizer has no such token; fix the "
                    "file or pass --eos-token TOKEN"
                )
            return int(vocab[token])
        return _first_present(vocab, names)

    def __getstate__(self) -> dict:
        # Sent to other processes (Ray workers) without the fast path or its lock: a receiver
        # sets up its own with `use_fast_bpe`, and counts its own texts.
        state = dict(self.__dict__, _fast=None, _fast_refused=None, _texts=[0, 0])
        del state["_left"]  # a receiver may map arrays read-only (Ray): it makes its own
        del state["_count_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(
            state,
            _count_lock=threading.Lock(),
            _left=np.zeros(len(LEFT_REASONS), dtype=np.int64),
        )

    def use_fast_bpe(self) -> str | None:
        """Encode with `tiktoken` the texts whose ids it provably gives as this tokenizer would
        (pipeline/fast_bpe.py). None when set up, else why not (one line)."""
        fast = FastBPE.check(self._tok, cache_key=self.id)
        if isinstance(fast, str):
            self._fast_refused = fast
            return fast
        self._fast = fast
        return None

    def fast_bpe_report(self) -> dict | None:
        """Since `use_fast_bpe`: the split and how many texts `tiktoken` encoded, of all, and
        why the others left it ("left": {reason: texts}, only when some did); or why there was
        no fast path. None when `use_fast_bpe` was not called."""
        if self._fast_refused is not None:
            return {"refused": self._fast_refused}
        if self._fast is None:
            return None
        fast, total = self._texts
        report = {"split": self._fast.split_name, "texts": total, "fast_texts": fast}
        left = {LEFT_REASONS[k]: int(n) for k, n in enumerate(self._left) if k and n}
        if left:
            report["left"] = left
        return report

    def encode_arrow(self, texts: pa.Array, continues: bool = False) -> Encoded:
        """Ids of each text without special tokens (the builder adds `prefix` where it belongs).
        `continues`: texts[0] goes on a document cut where `safe_cut` said."""
        strings = texts.to_pylist()
        drops_space = self._space_cuts is not None and self._space_cuts.drops_space
        if continues and drops_space and strings and strings[0].startswith(" "):
            strings[0] = strings[0][1:]  # its space: the normalizer's "▁" before every text
            texts = pa.array(strings, pa.large_string())
        if self._fast is None:
            return self._encode_strings(strings)
        fast = self._fast_texts(texts, strings)
        if fast.all():
            return Encoded(*self._fast.encode(strings))
        if not fast.any():
            return self._encode_strings(strings)
        where_fast, where_other = np.flatnonzero(fast), np.flatnonzero(~fast)
        return interleave(
            (where_fast, Encoded(*self._fast.encode([strings[i] for i in where_fast]))),
            (where_other, self._encode_strings([strings[i] for i in where_other])),
        )

    def encode_with_offsets(self, strings: list[str]) -> tuple[Encoded, np.ndarray]:
        """`encode_arrow` of `strings` (the same ids) and, for every token, the character of its
        text where it starts ((sum(lengths),) int64; a token that starts inside a character's
        UTF-8 bytes gets that character). On the fast path the places follow from the ids (each
        token's byte count: the text is in the normalizer's form there, so bytes are the
        text's); elsewhere they are the tokenizer's own offsets."""
        texts = pa.array(strings, type=pa.large_string())
        fast = self._fast_texts(texts, strings)
        where_fast, where_other = np.flatnonzero(fast), np.flatnonzero(~fast)
        parts = []
        if where_fast.size:
            chosen = [strings[i] for i in where_fast]
            encoded = Encoded(*self._fast.encode(chosen))
            parts.append((where_fast, encoded, self._byte_level_starts(chosen, encoded)))
        if where_other.size:
            chosen = [strings[i] for i in where_other]
            parts.append((where_other, *self._encode_with_own_offsets(chosen)))
        encoded = interleave(*((where, part) for where, part, _ in parts))
        as_values = [(where, Encoded(starts, part.lengths)) for where, part, starts in parts]
        starts = interleave(*as_values).values.astype(np.int64)
        return encoded, starts

    def _encode_with_own_offsets(self, strings: list[str]) -> tuple[Encoded, np.ndarray]:
        encodings = self._tok.encode_batch(strings, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(strings))
        count = int(lengths.sum())
        ids = itertools.chain.from_iterable(e.ids for e in encodings)
        starts = itertools.chain.from_iterable((a for a, _ in e.offsets) for e in encodings)
        return (
            Encoded(np.fromiter(ids, dtype=np.uint32, count=count), lengths),
            np.fromiter(starts, dtype=np.int64, count=count),
        )

    def _byte_level_starts(self, strings: list[str], encoded: Encoded) -> np.ndarray:
        """Where each fast-path token starts, in characters of its text."""
        if self._byte_lengths is None:
            chars = set(byte_chars())
            table = np.zeros(self.vocab_size, dtype=np.int64)
            for token, i in self._tok.get_vocab(with_added_tokens=False).items():
                # The fast path's check made sure every token it gives is byte-level.
                table[i] = len(token) if set(token) <= chars else 0
            for i, added in self._tok.get_added_tokens_decoder().items():
                table[i] = len(added.content.encode())
            self._byte_lengths = table
        token_bytes = self._byte_lengths[encoded.values]
        starts = np.empty(encoded.values.size, dtype=np.int64)
        at = 0
        for text, n in zip(strings, encoded.lengths.tolist(), strict=True):
            code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            utf8_bytes = 1 + (code_points >= 0x80).astype(np.int64) + (code_points >= 0x800)
            utf8_bytes += code_points >= 0x10000
            char_of_byte = np.repeat(np.arange(code_points.size), utf8_bytes)
            own = token_bytes[at : at + n]
            starts[at : at + n] = char_of_byte[np.cumsum(own) - own]
            at += n
        return starts

    def _fast_texts(self, texts: pa.Array, strings: list[str]) -> np.ndarray:
        """(len(texts),) bool: those the fast path encodes, counted in the report with why the
        others left it."""
        if self._fast is None:
            return np.zeros(len(texts), dtype=bool)
        reasons = self._fast.reasons(texts, strings)
        with self._count_lock:
            self._texts[0] += int((reasons == 0).sum())
            self._texts[1] += reasons.size
            self._left += np.bincount(reasons, minlength=len(LEFT_REASONS))
        return reasons == 0

    def safe_cut(self, text: str, lo: int, hi: int, partial: bool = False) -> int | None:
        """The last place in [lo, hi] where `text` can be cut so that its two sides' ids, joined,
        are the ids of the whole; None when there is none.

        A place qualifies where a pre-token of the tokenizer's own pre-tokenizer starts (BPE,
        Unigram, WordPiece and WordLevel models never join across one) and the tokenizer, given
        CUT_MARGIN characters either side, gives the same ids cut there as whole (a normalizer
        that composes characters makes a place unsafe). A SentencePiece tokenizer.json whose
        whole text is one pre-token (Llama 2, Gemma 3) is cut before a space that follows a
        character no token joins to a "▁" (`_SpaceCuts`); where its normalizer puts "▁" before
        every text, the piece after the cut is encoded without that space
        (`encode_arrow(continues=True)`). Other tokenizers without a pre-tokenizer, or with one
        that never splits, have no such place. With `partial`,
        `text` goes on past its end, so its last CUT_MARGIN characters are not judged.
        """
        hi = min(hi, len(text) - (CUT_MARGIN if partial else 1))
        lo = max(lo, 1)
        top = hi
        while top >= lo:
            bottom = max(lo, top - _CUT_WINDOW)
            for cut in reversed(self._places(text, bottom, top)):
                if self._same_ids_cut(text, cut):
                    return cut
            top = bottom - 1
        return None

    def _places(self, text: str, bottom: int, top: int) -> list[int]:
        """Where a pre-token starts in text[bottom : top + 1], in order."""
        if self._space_cuts is not None:  # a space after a character no token joins to "▁"
            window, joiners = text[bottom - 1 : top + 1], self._space_cuts.joiners
            return [
                bottom - 1 + m.start()
                for m in re.finditer("(?<=[^ \u2581]) ", window)
                if window[m.start() - 1] not in joiners
            ]
        pre = self._tok.pre_tokenizer
        if pre is None:
            return []
        start = max(0, bottom - CUT_MARGIN)
        # The first pre-token starts at the window's edge, not at a place of the text.
        splits = pre.pre_tokenize_str(text[start : top + CUT_MARGIN])[1:]
        return [start + begin for _, (begin, _) in splits if bottom <= start + begin <= top]

    def _same_ids_cut(self, text: str, cut: int) -> bool:
        left, right = text[max(0, cut - CUT_MARGIN) : cut], text[cut : cut + CUT_MARGIN]
        after = right[1:] if self._space_cuts and self._space_cuts.drops_space else right
        both, first, second = self._tok.encode_batch_fast(
            [left + right, left, after], add_special_tokens=False
        )
        return both.ids == first.ids + second.ids

    def _encode_strings(self, strings: list[str]) -> Encoded:
        # The ids equal encode_batch's; skipping the character offsets saves about 15% of the
        # tokenising time. Each Encoding is read once and freed before the flat array is built.
        encodings = self._tok.encode_batch_fast(strings, add_special_tokens=False)
        ids = [e.ids for e in encodings]
        del encodings
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        values = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum())
        )
        return Encoded(values=values, lengths=lengths)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def interleave(*parts: tuple[np.ndarray, Encoded]) -> Encoded:
    """One batch from encoded parts, each given with the batch positions of its documents."""
    count = sum(where.size for where, _ in parts)
    lengths = np.empty(count, dtype=np.int64)
    for where, part in parts:
        lengths[where] = part.lengths
    starts = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    values = np.empty(int(starts[-1]), dtype=np.uint32)
    for where, part in parts:
        # Token k of a part's document j lands at its batch start plus k minus the part's own start.
        own = np.zeros(where.size, dtype=np.int64)
        np.cumsum(part.lengths[:-1], out=own[1:])
        shift = np.repeat(starts[where] - own, part.lengths)
        values[np.arange(part.values.size) + shift] = part.values
    return Encoded(values=values, lengths=lengths)


def _space_cuts(tok) -> _SpaceCuts | None:
    """How a SentencePiece tokenizer.json whose whole text is one pre-token may be cut: a
    normalizer that writes "▁" for every space (maybe after one before the text) and no
    pre-tokenizer, or a Split at " " (none is left once spaces are "▁": Gemma); or no normalizer
    and a Metaspace pre-tokenizer that does not split. None for any other tokenizer."""
    from tokenizers import pre_tokenizers

    pre, normalizer = tok.pre_tokenizer, tok.normalizer
    if normalizer is None:
        shaped = isinstance(pre, pre_tokenizers.Metaspace)
    else:
        shaped = pre is None or isinstance(pre, pre_tokenizers.Split)
    if not shaped:
        return None
    spec = json.loads(tok.to_str())
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    if normalizer is None:
        if pre.get("split") is not False or pre.get("replacement") != "\u2581":
            return None
        drops_space = False  # a piece that starts with a space starts with "▁": none is added
    else:
        steps = normalizer.get("normalizers", [normalizer])
        if steps not in ([_SPACE_TO_MARK], [_PREPEND_MARK, _SPACE_TO_MARK]):
            return None
        if pre is not None and (pre.get("pattern") != {"String": " "} or pre.get("invert")):
            return None
        drops_space = steps[0] == _PREPEND_MARK
    joiners = frozenset(
        m.group(1) for token in tok.get_vocab() for m in re.finditer("([^\u2581])\u2581", token)
    )
    return _SpaceCuts(joiners, drops_space)


def _tokenizer_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.exists():
        raise PipelineError(
            f"tokenizer {path} does not exist; pass --tokenizer byte, a tokenizer.json file or a "
            "Hugging Face model folder"
        )
    if (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    names = sorted(p.name for p in path.iterdir())
    hint = ""
    if "tokenizer.model" in names:
        hint = (
            " (its tokenizer.model converts with `transformers.AutoTokenizer"
            ".from_pretrained(DIR).save_pretrained(DIR)`)"
        )
    raise PipelineError(
        f"--tokenizer {path} is a folder without tokenizer.json (it holds: "
        f"{', '.join(names[:8]) or 'nothing'}{', ...' if len(names) > 8 else ''}); pass a "
        f"folder saved by `transformers` or `tokenizers`, or the tokenizer.json itself{hint}"
    )


def _special_config(folder: Path) -> dict:
    """bos_token/eos_token/pad_token of a model folder, as token strings."""
    for name in _CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PipelineError(f"{path} is not valid JSON ({exc}); fix or remove it") from None
        if not isinstance(raw, dict):
            raise PipelineError(f"{path} holds a {type(raw).__name__}, not an object; fix it")
        config = {"_file": name}
        for key in ("bos_token", "eos_token", "pad_token"):
            if key in raw:
                token = raw[key]
                config[key] = token.get("content") if isinstance(token, dict) else token
        if len(config) > 1:
            return config
    return {}


def _prefix_of(full: list[int], plain: list[int]) -> tuple[int, ...]:
    """The ids that `full` (with special tokens) holds before the text's own ids `plain`."""
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start])
    return ()


def _added_tokens(tok) -> list[str]:
    return [t.content for t in tok.get_added_tokens_decoder().values() if t.special]


def _first_present(vocab: dict[str, int], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in vocab:
            return int(vocab[name])
    return None


def load_tokenizer(spec: str, eos_token: str | None = None) -> ByteTokenizer | JsonTokenizer:
    """`byte` for the built-in tokenizer, else a tokenizer.json or a folder that holds one."""
    if spec == "byte":
        if eos_token is not None:
            raise PipelineError(
                "--eos-token applies to a Hugging Face tokenizer; the byte tokenizer's EOS is "
                f"fixed at {BYTE_EOS_ID}: drop --eos-token or pass --tokenizer PATH"
            )
        return ByteTokenizer()
    return JsonTokenizer(Path(spec), eos_token)


def token_dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32: half the bytes to map and copy for most
    vocabularies."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
