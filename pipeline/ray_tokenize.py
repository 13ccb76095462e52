"""`pipeline tokenize-distributed`: tokenise inputs on a Ray cluster into Parquet token shards.

For corpora one machine tokenises too slowly. Each input file is read and tokenised by one Ray
Data actor with the build's own readers (pipeline/sources.py) and chunk encoder
(pipeline/build.py), so documents, skipped records, BOS and long-document pieces are exactly
those of a local `pipeline build`. Every input file becomes one Parquet file
`tokens-<input index>.parquet` with the columns `source` (input index), `row` (document index
in that input) and `input_ids` (list<uint32>): the ordering key is in the data and in the name,
so the folder read in name order, as `pipeline build DIR --text-field input_ids` reads a Parquet
folder, is the input order. Files are named by key rather than left to Ray's writer, whose
names and order across write tasks do not follow the data. Work is spread over input files: a
single huge file is tokenised by one worker (split it into shards first).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lowmem_core.durable import atomic_folder
from lowmem_core.errors import LowMemError, PipelineError, require_extra
from lowmem_core.locks import FolderLock
from pipeline import output
from pipeline.build import BuildReport, EncodedChunk, encode_chunk
from pipeline.config import TokenizeDistributedConfig
from pipeline.inputs import ReadOptions, Source
from pipeline.ray_reaper import Reaper
from pipeline.sources import read_source, resolve_inputs
from pipeline.tokenizer import Encoded, JsonTokenizer, load_tokenizer

log = logging.getLogger(__name__)

TOKEN_COLUMN = "input_ids"  # what `pipeline build DIR --text-field input_ids` reads
_ROW_GROUP_TOKENS = 1 << 22  # tokens buffered per Parquet row group (16 MiB of uint32)
_SCHEMA = pa.schema(
    [("source", pa.int32()), ("row", pa.int64()), (TOKEN_COLUMN, pa.list_(pa.uint32()))]
)


def tokenize_distributed(cfg: TokenizeDistributedConfig, progress: bool = True) -> BuildReport:
    """Tokenise `cfg.inputs` on Ray into Parquet files in `cfg.out`; return the counts."""
    require_extra("ray.data", "ray", "`pipeline tokenize-distributed`")
    check_address(cfg.address)
    started = time.perf_counter()
    # Workers open the files themselves, possibly on other nodes and in other folders.
    sources = [replace(s, path=s.path.resolve()) for s in resolve_inputs(cfg.inputs)]
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    out = Path(cfg.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # One run per --out; the lock also makes the leftovers of killed runs safe to remove.
    with FolderLock(output.aside(out, "lock"), f"--out {out}", remove_on_release=True):
        output.recover_interrupted(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise PipelineError(f"--out {out} exists and is not an empty folder; give a new folder")
        report = _tokenize(cfg, sources, tokenizer, out, progress)
    for line in report.notes(cfg.text_field):
        log.info(line)
    return replace(report, out_dir=out, seconds=time.perf_counter() - started)


def _tokenize(
    cfg: TokenizeDistributedConfig, sources, tokenizer, out: Path, progress: bool
) -> BuildReport:
    """Run the Ray job into a temp folder beside `out` and swap it in once complete."""
    rdata = require_extra("ray.data", "ray", "`pipeline tokenize-distributed`")
    import ray

    started_ray = False
    # A local cluster started here must not outlive this process, even a kill -9 of it.
    reaper = Reaper() if cfg.address is None and not ray.is_initialized() else None
    try:
        with atomic_folder(out, output.aside(out, "tmp"), output.aside(out, "old")) as tmp:
            started_ray = _connect(ray, cfg.address)
            workers = cfg.num_workers or int(ray.cluster_resources().get("CPU", 1))
            context = rdata.DataContext.get_current()
            context.enable_progress_bars = progress
            # A worker's own error, not Ray's wrapper.
            context.raise_original_map_exception = True
            files = rdata.from_items(
                [{"source": i} for i in range(len(sources))], override_num_blocks=len(sources)
            )
            summaries = files.map_batches(
                _TokenizeFiles,
                batch_size=1,
                batch_format="numpy",
                compute=rdata.ActorPoolStrategy(size=max(1, min(workers, len(sources)))),
                num_cpus=1,
                fn_constructor_kwargs={
                    "sources": sources,
                    "tokenizer": tokenizer,
                    "options": ReadOptions(
                        text_field=cfg.text_field, split=cfg.split, cut=tokenizer.safe_cut
                    ),
                    "strip": cfg.strip,
                    "fast_bpe": cfg.fast_bpe,
                    "out_dir": str(tmp),
                },
            )
            try:
                rows = sorted(summaries.take_all(), key=lambda r: int(r["source"]))
            except Exception as exc:
                error = _project_error(exc)
                if error is None:
                    raise
                raise error from None
            report = _report(rows, sources, tmp)
            if out.exists():
                out.rmdir()  # the empty folder checked above: one filled since stays
    finally:
        if started_ray:
            ray.shutdown()
        if reaper is not None:
            reaper.stop()
    return report


_ADDRESS = re.compile(r"(ray://)?[A-Za-z0-9_.\-]+:\d{1,5}|auto|local")


def check_address(address: str | None) -> None:
    """Refuse an --address Ray would try to resolve and reach for a minute before failing."""
    if address is not None and not _ADDRESS.fullmatch(address):
        raise PipelineError(
            f"--address {address!r} is not a Ray cluster address; give host:port (the head "
            "node's, as `ray start --head` prints it), ray://host:port, auto (the cluster this "
            "machine belongs to), or drop --address to run on this machine"
        )


def _connect(ray, address: str | None) -> bool:
    """Join the cluster at `address` (None: start one on this machine) unless this process
    already has; return whether Ray was started here (and so is shut down here)."""
    if ray.is_initialized():
        return False
    # The dashboard is an option of a cluster started here only; Ray refuses it otherwise.
    extra = {"include_dashboard": False} if address is None else {}
    try:
        ray.init(address=address, logging_level=logging.WARNING, **extra)
    # A garbage address is a ValueError, an unreachable one a ConnectionError, a ray:// client
    # address without `ray[client]` or its server a RuntimeError or an ImportError.
    except (ConnectionError, ValueError, RuntimeError, ImportError, TimeoutError) as exc:
        raise PipelineError(
            f"cannot reach a Ray cluster at --address {address} ({str(exc).splitlines()[0]}); "
            "start one with `ray start --head`, or drop --address to run on this machine"
        ) from None
    return True


def _project_error(exc: BaseException) -> LowMemError | None:
    """The project's error (bad input, bad token ids) that a worker raised, if `exc` carries
    one: Ray wraps it in its task error (`cause` holds the original)."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, LowMemError):
            found = exc  # the innermost is the worker's own
        exc = getattr(exc, "cause", None) or exc.__cause__
    # Ray appends its retry advice to the message; the project's own is its first line.
    return None if found is None else type(found)(str(found).splitlines()[0])


def _report(rows: list[dict], sources: list[Source], folder: Path) -> BuildReport:
    docs = sum(int(r["documents"]) for r in rows)
    if docs == 0:
        raise PipelineError(
            f"no documents with text found in {', '.join(str(s.path) for s in sources)}; "
            "check --text-field and the input files"
        )
    skipped = {
        str(sources[int(r["source"])].path): (int(r["skipped_empty"]), int(r["skipped_null"]))
        for r in rows
        if r["skipped_empty"] or r["skipped_null"]
    }
    return BuildReport(
        out_dir=folder,
        num_documents=docs,
        num_tokens=sum(int(r["tokens"]) for r in rows),
        num_shards=sum(1 for r in rows if r["documents"]),
        seconds=0.0,
        skipped=skipped,
        documents_in_pieces=sum(int(r["in_pieces"]) for r in rows),
    )


# ----------------------------------------------------------------------------- workers


class _TokenizeFiles:
    """A Ray Data actor: tokenises whole input files, one batch row (an input index) at a time,
    and writes each to its Parquet file; returns one summary row per input."""

    def __init__(
        self,
        sources: list[Source],
        tokenizer,
        options: ReadOptions,
        strip: bool,
        fast_bpe: bool,
        out_dir: str,
    ):
        # One core per actor, as the local build's threads: no `tokenizers` pool on top.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if fast_bpe and isinstance(tokenizer, JsonTokenizer):
            tokenizer.use_fast_bpe()  # set up here: the driver sends the tokenizer without it
        self.sources, self.tokenizer = sources, tokenizer
        self.options, self.strip, self.out_dir = options, strip, Path(out_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self._tokenize(int(i)) for i in batch["source"]]
        return {key: np.array([r[key] for r in rows]) for key in rows[0]}

    def _tokenize(self, index: int) -> dict:
        counts = dict.fromkeys(("documents", "tokens", "skipped_empty", "skipped_null"), 0)
        counts |= {"source": index, "in_pieces": 0}

        def encoded() -> Iterator[EncodedChunk]:
            for chunk in read_source(self.sources[index], self.options):
                result = encode_chunk(chunk, self.tokenizer, np.dtype(np.uint32), self.strip)
                counts["skipped_empty"] += result.skipped_empty
                counts["skipped_null"] += result.skipped_null
                counts["in_pieces"] += result.documents_in_pieces
                yield result

        width = max(6, len(str(len(self.sources) - 1)))
        path = self.out_dir / f"tokens-{index:0{width}d}.parquet"
        writer, pending = None, []
        for docs in _whole_documents(encoded()):
            if docs.lengths.size:
                pending.append(docs)
                counts["tokens"] += int(docs.values.size)
            if pending and (sum(d.values.size for d in pending) >= _ROW_GROUP_TOKENS):
                writer = writer or pq.ParquetWriter(path, _SCHEMA, compression="zstd")
                counts["documents"] = _write(writer, pending, index, counts["documents"])
                pending = []
        if pending:
            writer = writer or pq.ParquetWriter(path, _SCHEMA, compression="zstd")
            counts["documents"] = _write(writer, pending, index, counts["documents"])
        if writer is not None:
            writer.close()
        return counts


def _whole_documents(results: Iterable[EncodedChunk]) -> Iterator[Encoded]:
    """Encoded chunks of one input -> whole documents: a .txt document that the reader cut into
    pieces across chunks is joined, as the local build's shard writer joins it."""
    held: list[np.ndarray] = []  # pieces of a document that continues in the next chunk
    for result in results:
        values, lengths = result.encoded.values, result.encoded.lengths
        if held:
            first = int(lengths[0])
            held.append(values[:first])
            values, lengths = values[first:], lengths[1:]
            if result.tail_continues and lengths.size == 0:
                continue
            joined = np.concatenate(held)
            values = np.concatenate([joined, values])
            lengths = np.concatenate([[joined.size], lengths]).astype(np.int64)
            held = []
        if result.tail_continues:
            last = int(lengths[-1])
            held.append(values[values.size - last :])
            values, lengths = values[: values.size - last], lengths[:-1]
        yield Encoded(values, lengths)


def _write(writer: pq.ParquetWriter, parts: list[Encoded], source: int, first_row: int) -> int:
    """Write `parts` as one row group keyed (source, row); return the next row number."""
    lengths = np.concatenate([p.lengths for p in parts])
    offsets = np.zeros(lengths.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(np.concatenate([p.values for p in parts]), pa.uint32())
    end = first_row + lengths.size
    table = pa.table(
        {
            "source": pa.array(np.full(lengths.size, source, dtype=np.int32)),
            "row": pa.array(np.arange(first_row, end, dtype=np.int64)),
            TOKEN_COLUMN: pa.ListArray.from_arrays(pa.array(offsets), values),
        },
        schema=_SCHEMA,
    )
    writer.write_table(table)
    return end
