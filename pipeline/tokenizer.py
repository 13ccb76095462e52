"""Tokenizers for `pipeline build`: the built-in byte tokenizer and a `tokenizers` tokenizer.json.

Both encode a whole batch of texts at once and return flat token values plus per-document
lengths, so the builder never loops per token in Python. The byte tokenizer is a zero-copy cast
of an Arrow string array to binary: token i of a document is its i-th UTF-8 byte.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lowmem_core.errors import PipelineError

# Special tokens of the byte tokenizer sit right after the 256 byte values.
BYTE_BOS_ID, BYTE_EOS_ID, BYTE_PAD_ID = 256, 257, 258
BYTE_VOCAB_SIZE = 259

# Names under which tokenizer.json files commonly declare their specials, most specific first.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]", "<|end_of_text|>")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "[CLS]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


@dataclass(frozen=True)
class Encoded:
    """A batch of encoded documents: `values` holds all tokens back to back."""

    values: np.ndarray  # (sum(lengths),) uint32 token ids
    lengths: np.ndarray  # (num_docs,) int64 tokens per document


class ByteTokenizer:
    """ids 0-255 are UTF-8 bytes; 256 BOS, 257 EOS, 258 PAD. Needs no download."""

    kind = "byte"
    id = "byte-v1"
    vocab_size = BYTE_VOCAB_SIZE
    bos_id, eos_id, pad_id = BYTE_BOS_ID, BYTE_EOS_ID, BYTE_PAD_ID

    def encode_arrow(self, texts: pa.Array) -> Encoded:
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


class JsonTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (the `tokenizers` extra)."""

    kind = "tokenizers"

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise PipelineError(
                "--tokenizer given as a tokenizer.json needs the `tokenizers` package; "
                "install it with `pip install lowmem-pipeline[tokenizers]`"
            ) from exc
        if not path.is_file():
            raise PipelineError(f"tokenizer file {path} does not exist; pass --tokenizer byte or a tokenizer.json path")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise PipelineError(f"{path} is not a valid tokenizer.json ({exc}); pass a file saved by `tokenizers`") from exc
        self.id = "tokenizers-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.eos_id = _first_present(vocab, _EOS_NAMES)
        self.bos_id = _first_present(vocab, _BOS_NAMES)
        self.pad_id = _first_present(vocab, _PAD_NAMES)
        if self.eos_id is None:
            raise PipelineError(
                f"{path} declares no end-of-text token (looked for {', '.join(_EOS_NAMES)}); "
                "add one to the tokenizer so packed documents can be separated"
            )
        if self.pad_id is None:
            self.pad_id = self.eos_id  # padded positions carry label -100, so their id never trains

    def encode_arrow(self, texts: pa.Array) -> Encoded:
        encodings = self._tok.encode_batch(texts.to_pylist(), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        if len(encodings) == 0 or lengths.sum() == 0:
            return Encoded(values=np.zeros(0, np.uint32), lengths=lengths)
        values = np.concatenate([np.asarray(e.ids, dtype=np.uint32) for e in encodings])
        return Encoded(values=values, lengths=lengths)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def _first_present(vocab: dict[str, int], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in vocab:
            return int(vocab[name])
    return None


def load_tokenizer(spec: str) -> ByteTokenizer | JsonTokenizer:
    """`byte` for the built-in tokenizer, else a path to a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    return JsonTokenizer(Path(spec))


def token_dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32: half the bytes to map and copy for most vocabularies."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
