"""`pipeline build`: text/JSONL/Parquet/`datasets` inputs -> Arrow token shards + index.json.

Inputs are read in chunks of documents (pipeline/sources.py), tokenised a chunk at a time
(vectorised: an Arrow cast for bytes, `encode_batch_fast` for a Hugging Face tokenizer, both
releasing the GIL) by `num_proc` threads, and handed to the shard writer (pipeline/shards.py)
in a temporary folder beside the output, which replaces the output only when every file and
`index.json` are complete and fsynced (pipeline/output.py). With `--sft`, each prompt/response
or chat record becomes one document with its prompt length and, for a chat with several
supervised turns, its labelled spans (pipeline/sft.py), and index.json says "kind": "sft".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from lowmem_core.durable import fsync_path
from lowmem_core.errors import PipelineError
from lowmem_core.format import COLUMN, FORMAT, INDEX_NAME, KIND_SFT, KIND_TEXT
from lowmem_core.locks import FolderLock
from pipeline import output, sources
from pipeline.config import BuildConfig
from pipeline.output import check_out
from pipeline.sft import LazyChat, SftFields, encode_records, limit_samples, split_records
from pipeline.shards import ShardWriter
from pipeline.sources import (
    Chunk,
    ReadOptions,
    RecordChunk,
    Source,
    clean,
    read_records,
    read_source,
    resolve_inputs,
)
from pipeline.tokenizer import (
    Encoded,
    JsonTokenizer,
    load_tokenizer,
    token_dtype_for,
    with_prefix,
)
from pipeline.workers import ordered_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildReport:
    out_dir: Path
    num_documents: int
    num_tokens: int
    num_shards: int
    seconds: float
    skipped: dict[str, tuple[int, int]] = field(default_factory=dict)  # input -> (empty, null)
    documents_in_pieces: int = 0  # documents longer than sources.PIECE_CHARS, in pieces
    unsplit_stretches: int = 0  # stretches over PIECE_CHARS with no place to cut, encoded whole
    samples_truncated: int = 0  # --long-samples truncate: responses cut to fit
    samples_dropped: int = 0  # --long-samples drop (or no room left for a response)
    max_sample_tokens: int | None = None
    samples_tokenised_apart: int = 0  # sft samples whose whole ids do not start with the prompt's
    tokenizing: str | None = None  # how a tokenizer.json encoded the texts, for the user
    turns: int = 0  # assistant turns in the chat records
    turns_supervised: int = 0  # of them labelled (--train-on-turns)
    label_tokens: int = 0  # sft: tokens that carry labels, with the EOS the loader appends

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)

    def notes(self, text_field: str) -> list[str]:
        """One line per thing the user should know: how texts were tokenised, and what was
        left out or cut."""
        lines = [self.tokenizing] if self.tokenizing else []
        lines += [
            f"skipped {empty + null} records of {path} without text ({empty} empty or "
            f"whitespace only, {null} null or without the field {text_field!r})"
            for path, (empty, null) in self.skipped.items()
        ]
        if self.documents_in_pieces:
            lines.append(
                f"tokenised {self.documents_in_pieces} documents longer than "
                f"{sources.PIECE_CHARS:,} characters in pieces (memory stays bounded), cut only "
                "where the tokenizer's pre-tokenizer splits and its ids are those of the whole"
            )
        if self.unsplit_stretches:
            lines.append(
                f"{self.unsplit_stretches} stretches of text longer than "
                f"{sources.PIECE_CHARS:,} characters have no such place (one word, one run of "
                "spaces, or a tokenizer without a pre-tokenizer) and were tokenised whole: "
                "memory grows with them"
            )
        if self.samples_truncated or self.samples_dropped:
            lines.append(
                f"samples longer than {self.max_sample_tokens} tokens (with the EOS): "
                f"{self.samples_truncated} truncated (response cut at the end), "
                f"{self.samples_dropped} dropped; the EOS after a cut response is no target"
            )
        if self.turns:
            lines.append(
                f"labelled {self.turns_supervised:,} of {self.turns:,} assistant turns in chat "
                f"records (--train-on-turns); {self.label_tokens:,} label tokens of "
                f"{self.num_tokens:,}, with the EOS after each sample"
            )
        if self.samples_tokenised_apart:
            lines.append(
                f"{self.samples_tokenised_apart} samples have a token spanning the end of the "
                "prompt (the whole sample's ids do not start with the prompt's own): their "
                "prompt and response were tokenised apart, so no prompt text is trained and no "
                "response text masked"
            )
        return lines


# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodedChunk:
    encoded: Encoded  # values already in the dataset's dtype
    tail_continues: bool
    source: Source
    skipped_empty: int
    skipped_null: int
    documents_in_pieces: int
    prompt_lengths: np.ndarray | None = None  # (num_docs,) int64, for prompt/response records
    response_cut: np.ndarray | None = None  # (num_docs,) bool, for prompt/response records
    samples_truncated: int = 0
    samples_dropped: int = 0
    samples_tokenised_apart: int = 0
    unsplit_stretches: int = 0
    spans: tuple[np.ndarray, np.ndarray] | None = None  # sft: (span counts, (S, 2) spans)
    turns: tuple[int, int] = (0, 0)  # sft: assistant turns, of them supervised
    label_tokens: int = 0  # sft: labelled tokens, with the EOS after each uncut sample


def encode_chunk(chunk: Chunk, tokenizer, dtype: np.dtype, strip: bool) -> EncodedChunk:
    cleaned = clean(chunk, strip)
    docs = cleaned.docs
    if isinstance(docs, pa.ChunkedArray):
        docs = docs.combine_chunks()
    in_pieces = unsplit = 0
    if pa.types.is_large_string(docs.type):
        encoded, in_pieces, unsplit = _encode_texts(docs, tokenizer, cleaned)
        where = np.ones(encoded.lengths.size, dtype=bool)
        where[:1] = not cleaned.head_continues  # a piece that continues a document has its BOS
        encoded = with_prefix(encoded, tokenizer.prefix, where)
        _check_ids(encoded.values, tokenizer, f"the tokenizer {tokenizer.id} produced")
    else:
        encoded = _token_lists(docs, tokenizer, chunk.source.path)
    values = encoded.values.astype(dtype, copy=False)
    return EncodedChunk(
        Encoded(values, encoded.lengths),
        cleaned.tail_continues,
        chunk.source,
        cleaned.skipped_empty,
        cleaned.skipped_null,
        in_pieces,
        unsplit_stretches=unsplit,
    )


def _encode_texts(texts: pa.Array, tokenizer, cleaned) -> tuple[Encoded, int, int]:
    """Encode `texts`; one longer than a piece is encoded in pieces and its lengths summed.
    Returns the ids, the documents in pieces started here and the stretches encoded whole."""
    limit = sources.PIECE_CHARS
    chars = pc.utf8_length(texts).to_numpy(zero_copy_only=False)
    long = np.flatnonzero(chars > limit)
    started_here = np.ones(chars.size, dtype=bool)
    started_here[:1] = not cleaned.head_continues
    cut = chars > limit
    cut[-1:] |= cleaned.tail_continues
    in_pieces = int((started_here & cut).sum())
    head = cleaned.head_continues  # texts[0] goes on a document cut where safe_cut said
    if long.size == 0:
        return tokenizer.encode_arrow(texts, continues=head), in_pieces, 0
    parts, prev, unsplit = [], 0, 0
    for i in long:
        if i > prev:
            parts.append(tokenizer.encode_arrow(texts.slice(prev, i - prev), prev == 0 and head))
        encoded, whole = _encode_long(texts[int(i)].as_py(), tokenizer, i == 0 and head)
        parts.append(encoded)
        unsplit += whole
        prev = int(i) + 1
    if prev < len(texts):
        parts.append(tokenizer.encode_arrow(texts.slice(prev)))
    return (
        Encoded(
            np.concatenate([p.values for p in parts]), np.concatenate([p.lengths for p in parts])
        ),
        in_pieces,
        unsplit,
    )


def _encode_long(text: str, tokenizer, continues: bool) -> tuple[Encoded, int]:
    """`text` as one document, encoded in pieces of about PIECE_CHARS cut where the tokenizer
    gives the ids of the whole (`safe_cut`); a stretch with no such place goes whole. Returns
    the ids and how many pieces were longer than PIECE_CHARS. `continues`: `text` itself goes
    on a document cut before it."""
    pieces, start, limit, unsplit = [], 0, sources.PIECE_CHARS, 0
    while start < len(text):
        end = _piece_end(text, start, limit, tokenizer)
        unsplit += end - start > limit
        piece = pa.array([text[start:end]], pa.large_string())
        pieces.append(tokenizer.encode_arrow(piece, continues or start > 0).values)
        start = end
    values = np.concatenate(pieces)
    return Encoded(values, np.array([values.size], dtype=np.int64)), unsplit


def _piece_end(text: str, start: int, limit: int, tokenizer) -> int:
    """The end of the piece of `text` from `start`: the last place to cut in its second half,
    else the last in the next `limit` characters, and so on; else the end of the text."""
    lo, hi = start + limit // 2, start + limit
    while hi < len(text):
        cut = tokenizer.safe_cut(text, lo, hi)
        if cut is not None:
            return cut
        lo, hi = hi + 1, hi + limit
    return len(text)


def _token_lists(docs: pa.Array, tokenizer, path: Path) -> Encoded:
    flat = docs.flatten()
    if flat.null_count:
        raise PipelineError(f"token id lists in {path} hold nulls; give every id as an integer")
    values = flat.to_numpy(zero_copy_only=False) if len(flat) else np.zeros(0, np.int64)
    if values.size and (values.min() < 0 or values.max() >= tokenizer.vocab_size):
        raise PipelineError(
            f"token ids in {path} range over [{values.min()}, {values.max()}] but the tokenizer's "
            f"vocabulary has {tokenizer.vocab_size} ids; pass the --tokenizer that produced them"
        )
    offsets = docs.offsets.to_numpy()
    return Encoded(values=values, lengths=np.diff(offsets).astype(np.int64))


def _encode_records(
    chunk: RecordChunk,
    tokenizer,
    dtype: np.dtype,
    fields: SftFields,
    chat: LazyChat | None,
    limit: tuple[int, str] | None,
    last_only: bool = False,
) -> EncodedChunk:
    """Prompt/response and chat records -> one document each + prompt lengths and spans."""
    parsed = split_records(
        chunk.records, fields, str(chunk.source.path), chat, chunk.first, chunk.unit, last_only
    )
    pairs = encode_records(tokenizer, parsed, tokenizer.prefix, tokenizer.eos_id)
    _check_ids(pairs.values, tokenizer, f"the tokenizer {tokenizer.id} produced")
    truncated = dropped = 0
    if limit is not None:
        pairs, truncated, dropped = limit_samples(pairs, *limit)
    encoded = Encoded(pairs.values.astype(dtype, copy=False), pairs.lengths)
    return EncodedChunk(
        encoded,
        False,
        chunk.source,
        0,
        0,
        0,
        pairs.prompt_lengths,
        pairs.response_cut,
        truncated,
        dropped,
        pairs.tokenised_apart,
        spans=(pairs.span_counts, pairs.spans),
        turns=(pairs.turns, pairs.turns_supervised),
        label_tokens=pairs.label_tokens + int((~pairs.response_cut).sum()),
    )


def _check_ids(values: np.ndarray, tokenizer, what: str) -> None:
    if values.size and int(values.max()) >= tokenizer.vocab_size:
        raise PipelineError(
            f"{what} token id {int(values.max())} but its vocabulary has {tokenizer.vocab_size} "
            "ids; fix the tokenizer's added tokens or pass another --tokenizer"
        )


def build_dataset(cfg: BuildConfig, progress: bool = True) -> BuildReport:
    """Build the dataset that `cfg` describes; return counts and the build rate."""
    started = time.perf_counter()
    sources = resolve_inputs(cfg.inputs)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    out = Path(cfg.out)
    check_out(out, cfg.overwrite, sources)
    created = output.make_parent(out)
    try:
        with FolderLock(output.aside(out, "lock"), f"output {out}", remove_on_release=True):
            output.recover_interrupted(out)
            check_out(out, cfg.overwrite, sources)  # again: another build may have finished
            tmp = output.aside(out, "tmp")
            tmp.mkdir()
            try:
                report = _write(cfg, sources, tokenizer, tmp, progress)
                output.commit_out(tmp, out)
            except BaseException as exc:
                written = output.folder_bytes(tmp) if tmp.is_dir() else 0
                shutil.rmtree(tmp, ignore_errors=True)
                if output.disk_full(exc):
                    raise PipelineError(
                        f"the disk holding {out.parent} filled up after {written / 2**20:.1f} MiB "
                        f"of the dataset ({exc.strerror or str(exc).splitlines()[0]}); nothing "
                        "was written: free space or choose another --out"
                    ) from None
                raise
    except BaseException:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    for line in report.notes(cfg.text_field):
        log.info(line)
    return replace(report, out_dir=out, seconds=time.perf_counter() - started)


@contextlib.contextmanager
def _one_core_per_thread() -> Iterator[None]:
    """Each of the --num-proc threads tokenises on one core: the `tokenizers` thread pool is off
    while the build runs (unless TOKENIZERS_PARALLELISM is set): faster than threads feeding
    one pool (5.0 s vs 5.7 s on 30 MB with 2 threads), and --num-proc is the cores used."""
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


@contextlib.contextmanager
def _system_allocator() -> Iterator[None]:
    """Arrow allocates with the C library's malloc while the build runs. Its default, mimalloc,
    kept the pages of freed chunk buffers in its arena: 38 MB resident after a 30 MB corpus,
    43 MB after 300 MB, though Arrow never held more than 12 MB at once."""
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def _write(
    cfg: BuildConfig, sources: list[Source], tokenizer, tmp: Path, progress: bool
) -> BuildReport:
    dtype = token_dtype_for(tokenizer.vocab_size)
    if cfg.fast_bpe and isinstance(tokenizer, JsonTokenizer):
        tokenizer.use_fast_bpe()  # the report below says how it went
    if cfg.sft:
        fields = SftFields(cfg.prompt_field, cfg.response_field, cfg.messages_field)
        names = (fields.prompt, fields.response, fields.messages)
        chunks = (chunk for source in sources for chunk in read_records(source, names))
        chat = None
        if Path(cfg.tokenizer).is_dir():
            chat = LazyChat(Path(cfg.tokenizer), cfg.template_kwargs(), tokenizer.eos_id)
        limit = None
        if cfg.max_sample_tokens is not None:
            limit = (cfg.max_sample_tokens, cfg.long_samples)
        encode = partial(
            _encode_records,
            tokenizer=tokenizer,
            dtype=dtype,
            fields=fields,
            chat=chat,
            limit=limit,
            last_only=cfg.train_on_turns == "last",
        )
    else:
        options = ReadOptions(text_field=cfg.text_field, split=cfg.split, cut=tokenizer.safe_cut)
        chunks = (chunk for source in sources for chunk in read_source(source, options))
        encode = partial(encode_chunk, tokenizer=tokenizer, dtype=dtype, strip=cfg.strip)
    writer = ShardWriter(tmp, dtype, cfg.max_shard_tokens, prompt_lengths=cfg.sft)
    skipped: dict[str, list[int]] = {}
    in_pieces = unsplit = 0
    cut = [0, 0, 0]  # samples truncated, dropped, tokenised apart
    turns = [0, 0, 0]  # assistant turns, of them supervised, label tokens
    # A with-block closes the bar on errors too, so the error line starts a line of its own.
    with (
        tqdm(unit=" docs", unit_scale=True, desc="build", disable=not progress) as bar,
        _one_core_per_thread(),
        _system_allocator(),
    ):
        for result in ordered_map(encode, chunks, cfg.num_proc):
            writer.append(
                result.encoded,
                result.tail_continues,
                result.prompt_lengths,
                result.response_cut,
                result.spans,
            )
            turns[0] += result.turns[0]
            turns[1] += result.turns[1]
            turns[2] += result.label_tokens
            if result.skipped_empty or result.skipped_null:
                counts = skipped.setdefault(str(result.source.path), [0, 0])
                counts[0] += result.skipped_empty
                counts[1] += result.skipped_null
            in_pieces += result.documents_in_pieces
            unsplit += result.unsplit_stretches
            cut[0] += result.samples_truncated
            cut[1] += result.samples_dropped
            cut[2] += result.samples_tokenised_apart
            bar.update(int(result.encoded.lengths.size))
        shards = writer.close()
    num_docs = sum(s["num_documents"] for s in shards)
    num_tokens = sum(s["num_tokens"] for s in shards)
    if num_docs == 0 or num_tokens == 0:
        fix = "--prompt-field/--response-field" if cfg.sft else "--text-field"
        raise PipelineError(
            f"no documents with text found in {', '.join(str(s.path) for s in sources)}; "
            f"check {fix} and the input files"
        )
    index = {
        "format": FORMAT,
        "kind": KIND_SFT if cfg.sft else KIND_TEXT,
        "num_documents": num_docs,
        "num_tokens": num_tokens,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "column": COLUMN,
        "tokenizer": {
            "kind": tokenizer.kind,
            "id": tokenizer.id,
            "source": tokenizer.source,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
            "documents_start_with_bos": bool(tokenizer.prefix),
        },
        "files": shards,
        "sources": [str(s.path) for s in sources],
        "build": {
            "split": cfg.split,
            "strip": cfg.strip,
            "skipped_records": sum(sum(c) for c in skipped.values()),
            "documents_in_pieces": in_pieces,
            "unsplit_stretches": unsplit,
            "fast_bpe": (
                tokenizer.fast_bpe_report() if isinstance(tokenizer, JsonTokenizer) else None
            ),
        },
    }
    if cfg.sft:
        index["build"]["long_samples"] = {
            "max_sample_tokens": cfg.max_sample_tokens,
            "mode": cfg.long_samples,
            "truncated": cut[0],
            "dropped": cut[1],
        }
        index["build"]["tokenised_apart"] = cut[2]
        index["build"]["label_tokens"] = turns[2]
        index["build"]["chat"] = _chat_record(cfg, chat, turns)
        index["build"]["fields"] = {
            "prompt": cfg.prompt_field,
            "response": cfg.response_field,
            "messages": cfg.messages_field,
        }
    index_path = tmp / INDEX_NAME
    index_path.write_text(json.dumps(index, indent=1))
    fsync_path(index_path)
    return BuildReport(
        tmp,
        num_docs,
        num_tokens,
        len(shards),
        0.0,
        {k: (v[0], v[1]) for k, v in skipped.items()},
        in_pieces,
        unsplit,
        cut[0],
        cut[1],
        cfg.max_sample_tokens,
        cut[2],
        _tokenizing_note(index["build"]["fast_bpe"]),
        turns[0],
        turns[1],
        turns[2],
    )


def _chat_record(cfg: BuildConfig, chat: LazyChat | None, turns: list[int]) -> dict:
    """What index.json says of the chat records: the template's keyword arguments, which turns
    were labelled, and how the template ends a turn (its final EOS is dropped, as the loader
    appends one after every sample)."""
    template = chat.loaded if chat is not None else None
    return {
        "train_on_turns": cfg.train_on_turns,
        "template_kwargs": cfg.template_kwargs(),
        "assistant_turns": turns[0],
        "turns_supervised": turns[1],
        "generation_markers": template.markers if template else None,
        "turn_end": template.turn_end if template else None,
        "turn_ends_with_eos": template.turn_ends_with_eos if template else None,
        "eos_after_sample": "appended by the loader (a final EOS the template writes is dropped)",
    }


def _tokenizing_note(fast_bpe: dict | None) -> str | None:
    if fast_bpe is None:
        return None
    if "refused" in fast_bpe:
        return f"tokenised with tokenizers alone, no exact fast path: {fast_bpe['refused']}"
    rest = "" if fast_bpe["fast_texts"] == fast_bpe["texts"] else "; the rest with tokenizers"
    if fast_bpe.get("left"):
        rest += " (" + "; ".join(f"{n:,}: {why}" for why, n in fast_bpe["left"].items()) + ")"
    return (
        f"tokenised {fast_bpe['fast_texts']:,} of {fast_bpe['texts']:,} texts with tiktoken, "
        f"whose ids provably equal the tokenizer's ({fast_bpe['split']} split){rest}"
    )
