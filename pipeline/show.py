"""`python -m pipeline show DIR --sample N`: stored samples as the loader will label them.

Each document is decoded with the tokenizer its dataset records (special tokens written out),
with the text of its labelled tokens between « and », followed by the EOS the loader appends
after every sample; a header line gives its token counts and labelled spans. It is the exact text
a model is trained on, so a template's rendering and the turns that carry loss can be checked
by eye before a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowmem_core.errors import PipelineError, require_extra
from lowmem_core.format import INDEX_NAME
from pipeline.config import ShowConfig
from pipeline.dataset import TokenDataset, open_dataset
from pipeline.manifest import read_manifest

OPEN, CLOSE = "\u00ab", "\u00bb"  # « and », around labelled text


@dataclass(frozen=True)
class Sample:
    """What the loader makes of one document: its tokens, the (start, length) spans that carry
    labels, and the EOS it appends after them (labelled unless the build cut the response)."""

    index: int
    tokens: np.ndarray  # (n,) the stored token ids
    spans: np.ndarray  # (k, 2) int64 (start, length) of labelled tokens
    eos_id: int
    eos_labelled: bool

    @property
    def labelled_tokens(self) -> int:
        return int(self.spans[:, 1].sum()) + int(self.eos_labelled)


def read_sample(ds: TokenDataset, i: int) -> Sample:
    cut = ds.response_cut is not None and bool(ds.response_cut[i])
    return Sample(i, np.asarray(ds[i]), ds.label_spans(i), ds.eos_id, not cut)


class _Decoder:
    """Token ids -> text with special tokens written out: the dataset's own tokenizer, or the ids
    themselves where none is recorded (a `datasets` folder)."""

    def __init__(self, ds: TokenDataset, spec: str | None):
        recorded = _recorded_tokenizer(ds.path)
        if spec is None:
            spec = "byte" if recorded.get("kind") == "byte" else recorded.get("source")
        self._names = {ds.bos_id: "<bos>", ds.eos_id: "<eos>", ds.pad_id: "<pad>"}
        self._tok = None
        self.spec = spec
        if spec is None or spec == "byte":
            return
        self._tok = _open_tokenizers(Path(spec))
        size = self._tok.get_vocab_size(with_added_tokens=True)
        if size > ds.vocab_size:
            raise PipelineError(
                f"the tokenizer {spec} has {size} tokens but {ds.path} was built with "
                f"{ds.vocab_size}; pass the one it was built with as --tokenizer PATH"
            )

    def text(self, ids: np.ndarray) -> str:
        if self._tok is not None:
            return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
        if self.spec == "byte":
            return _byte_text(ids, self._names)
        return " ".join(str(int(i)) for i in ids)


def _byte_text(ids: np.ndarray, names: dict) -> str:
    """Runs of bytes as UTF-8 text, the byte tokenizer's BOS/EOS/PAD by name."""
    out, run = [], bytearray()
    for i in map(int, ids):
        if i < 256:
            run.append(i)
            continue
        out.append(run.decode("utf-8", errors="replace"))
        run = bytearray()
        out.append(names.get(i, f"<{i}>"))
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)


def _recorded_tokenizer(path: Path) -> dict:
    if not (path / INDEX_NAME).is_file():
        return {}  # a `datasets` folder records no tokenizer
    return read_manifest(path).tokenizer


def _open_tokenizers(path: Path):
    tokenizers = require_extra("tokenizers", "tokenizers", "decoding a tokenizer.json dataset")
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise PipelineError(
            f"the dataset's tokenizer {path} is gone (no {file}); pass it as --tokenizer PATH"
        )
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise PipelineError(f"{file} is not a valid tokenizer.json ({exc}); pass another") from None


def render(sample: Sample, decoder: _Decoder) -> str:
    """The sample's text with « » around its labelled runs, then the appended EOS."""
    parts, at = [], 0
    for start, length in sample.spans.tolist():
        parts.append(decoder.text(sample.tokens[at:start]))
        parts.append(OPEN + decoder.text(sample.tokens[start : start + length]) + CLOSE)
        at = start + length
    parts.append(decoder.text(sample.tokens[at:]))
    eos = decoder.text(np.array([sample.eos_id]))
    parts.append(OPEN + eos + CLOSE if sample.eos_labelled else eos)
    return "".join(parts)


def header(sample: Sample, count: int, decoder: _Decoder) -> str:
    spans = " ".join(f"({s}, {n})" for s, n in sample.spans.tolist())
    token = json.dumps(decoder.text(np.array([sample.eos_id])), ensure_ascii=False)
    state = "labelled" if sample.eos_labelled else "not labelled: its response was cut"
    return (
        f"sample {sample.index} of {count}: {sample.tokens.size} tokens, "
        f"{sample.labelled_tokens} labelled; labelled spans (start, length): {spans or 'none'}; "
        f"the loader appends EOS {token} ({state})"
    )


def show(cfg: ShowConfig) -> list[str]:
    """The printout of documents [sample, sample + count) of cfg.dataset, one string each."""
    with open_dataset(cfg.dataset) as ds:
        n = len(ds)
        if cfg.sample >= n:
            raise PipelineError(
                f"--sample {cfg.sample} is past the end of {cfg.dataset}, which holds {n} "
                f"samples; pass --sample 0 to {n - 1}"
            )
        decoder = _Decoder(ds, cfg.tokenizer)
        out = [f"{cfg.dataset} ({ds.kind}, {n} samples, tokenizer {decoder.spec or 'none'})"]
        for i in range(cfg.sample, min(cfg.sample + cfg.count, n)):
            sample = read_sample(ds, i)
            out.append(header(sample, n, decoder) + "\n" + render(sample, decoder))
    return out
