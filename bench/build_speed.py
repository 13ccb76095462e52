"""`bench build`: `pipeline build` against Hugging Face `datasets` on the same corpus, in one run.

Both sides tokenise the same generated JSON Lines corpus with the same `tokenizers` byte-level
BPE tokenizer (trained here on the sample corpus) and the same number of processes: ours with
`--num-proc N`, `datasets` with `load_dataset("json")` + `map(batched=True, num_proc=N)` +
`save_to_disk`. Ours encodes the documents its exact fast path accepts with `tiktoken`
(pipeline/fast_bpe.py) and the rest with the tokenizer itself. Each side runs in a fresh
process pinned to the same N cores (so neither can use more), with its own empty cache; its
peak memory is the largest sum, over the whole process tree, of PSS (shared pages split between
the processes that map them) sampled every 50 ms; USS (pages no other process maps) is shown
beside it, as PSS also moves with whatever else on the machine maps the same libraries. Both
datasets must hold the same documents with the same token ids, every one compared, or the
comparison is void.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

from bench.config import BuildSpeedConfig
from bench.machine import describe, machine_facts
from lowmem_core.errors import ConfigError

SIDES = ("pipeline build", "datasets map")

_OURS = """
import json, sys, time
t0 = time.perf_counter()
from pipeline.build import build_dataset
from pipeline.config import BuildConfig
a = json.loads(sys.argv[1])
t1 = time.perf_counter()
r = build_dataset(BuildConfig(inputs=[a["corpus"]], out=a["out"], tokenizer=a["tokenizer"],
                              num_proc=a["num_proc"]), progress=False)
t2 = time.perf_counter()
print(json.dumps({"tokens": r.num_tokens, "documents": r.num_documents, "work_s": t2 - t1,
                  "import_s": t1 - t0}))
"""

_HF = """
import json, sys, time
t0 = time.perf_counter()
import datasets
from tokenizers import Tokenizer
datasets.disable_progress_bars()
a = json.loads(sys.argv[1])
t1 = time.perf_counter()
tok = Tokenizer.from_file(a["tokenizer"])

def encode(batch):
    return {"input_ids": [e.ids for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}

ds = datasets.load_dataset("json", data_files=a["corpus"], split="train", cache_dir=a["cache"])
ds = ds.map(encode, batched=True, num_proc=a["num_proc"], remove_columns=ds.column_names)
ds.save_to_disk(a["out"])
t2 = time.perf_counter()
lengths = ds.data.column("input_ids").combine_chunks().value_lengths()
print(json.dumps({"tokens": int(lengths.sum().as_py()), "documents": len(ds), "work_s": t2 - t1,
                  "import_s": t1 - t0}))
"""


@dataclass(frozen=True)
class SideResult:
    side: str
    corpus_mb: float
    seconds: float  # the work, from reading the corpus to the saved dataset (imports excluded)
    process_seconds: float  # the whole process, interpreter start and imports included
    cpu_seconds: float  # user + system CPU time of the whole process tree (steadier under load)
    tokens: int
    documents: int
    peak_pss_bytes: int  # largest PSS sum over the process tree
    peak_rss_bytes: int  # largest RSS sum over the process tree (counts shared pages twice)
    peak_uss_bytes: int  # largest USS sum over the process tree (private pages only)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


# ----------------------------------------------------------------------------- inputs


def _tokenizer(cache: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer.json trained on the sample corpus (cached)."""
    path = cache / f"bpe-{vocab_size}.json"
    if path.is_file():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pipeline.sample_corpus import generate_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(generate_documents(3000, seed=99), trainer)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tok.save(str(tmp))
    tmp.replace(path)
    return path


def _corpus(cache: Path, size_mb: float, seed: int) -> Path:
    """JSON Lines of about `size_mb` MB: the sample corpus's documents, reshuffled each pass."""
    path = cache / f"corpus-{size_mb:g}mb-{seed}.jsonl"
    if path.is_file():
        return path
    from pipeline.sample_corpus import generate_documents

    base = generate_documents(min(20_000, max(500, int(size_mb * 1000))), seed=seed)
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in base]
    rng = np.random.default_rng(seed)
    target, written, i = int(size_mb * 1e6), 0, 0
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        while written < target:
            for k in rng.permutation(len(lines)):
                line = f'{{"id": {i}, {lines[k][1:]}\n'
                fh.write(line)
                written += len(line.encode())
                i += 1
                if written >= target:
                    break
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- running a side


class TreeSampler:
    """Peak PSS, RSS and USS summed over a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.05):
        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.peak_pss = self.peak_rss = self.peak_uss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pss = rss = uss = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                except psutil.Error:
                    continue
                pss += info.pss
                rss += info.rss
                uss += info.uss
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.peak_uss = max(self.peak_uss, uss)
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class PinnedRun:
    outcome: dict  # the JSON object the command printed on its last stdout line
    process_seconds: float  # the whole process, interpreter start and imports included
    cpu_seconds: float  # user + system CPU time of the whole process tree
    peak_pss_bytes: int  # largest PSS sum over the process tree
    peak_rss_bytes: int  # largest RSS sum over the process tree
    peak_uss_bytes: int  # largest USS sum over the process tree


def run_pinned(python_args: list[str], cores: list[int], what: str) -> PinnedRun:
    """`python PYTHON_ARGS` in a fresh interpreter pinned to `cores`, offline, with this repo
    importable; its tree's memory is sampled every 50 ms. `what` names it in the error."""
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *python_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )
    sampler = TreeSampler(proc.pid)
    stdout, stderr = proc.communicate()
    sampler.stop()
    process_s = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"{what} failed ({last}); run it alone to see why")
    outcome = json.loads(stdout.strip().splitlines()[-1])
    return PinnedRun(
        outcome, process_s, cpu_s, sampler.peak_pss, sampler.peak_rss, sampler.peak_uss
    )


def _run_side(
    side: str, corpus: Path, tokenizer: Path, cfg: BuildSpeedConfig, work: Path
) -> SideResult:
    """One side's build into WORK/out (left there for `_first_difference`)."""
    out, cache = work / "out", work / "cache"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = {
        "corpus": str(corpus),
        "out": str(out),
        "tokenizer": str(tokenizer),
        "num_proc": cfg.num_proc,
        "cache": str(cache),
    }
    cores = sorted(os.sched_getaffinity(0))[: cfg.num_proc]
    script = textwrap.dedent(_OURS if side == SIDES[0] else _HF)
    run = run_pinned(["-c", script, json.dumps(args)], cores, f"bench build: the {side} run")
    shutil.rmtree(cache, ignore_errors=True)
    return SideResult(
        side,
        corpus.stat().st_size / 1e6,
        run.outcome["work_s"],
        run.process_seconds,
        run.cpu_seconds,
        run.outcome["tokens"],
        run.outcome["documents"],
        run.peak_pss_bytes,
        run.peak_rss_bytes,
        run.peak_uss_bytes,
    )


def _first_difference(ours: Path, theirs: Path, window_tokens: int = 1 << 24) -> str | None:
    """Where two built datasets' documents or token ids first differ, or None if equal."""
    from pipeline.dataset import open_dataset

    with (
        open_dataset(ours, index_cache=ours.parent / "index") as a,
        open_dataset(theirs, index_cache=theirs.parent / "index") as b,
    ):
        return _compare(a, b, window_tokens)


def _compare(a, b, window_tokens: int) -> str | None:
    lengths_a, lengths_b = a.doc_lengths, b.doc_lengths
    if lengths_a.size != lengths_b.size:
        return f"{lengths_a.size} vs {lengths_b.size} documents"
    if not np.array_equal(lengths_a, lengths_b):
        doc = int(np.flatnonzero(lengths_a != lengths_b)[0])
        return f"document {doc} has {lengths_a[doc]} vs {lengths_b[doc]} tokens"
    total = int(lengths_a.sum())
    for start in range(0, total, window_tokens):
        end = min(total, start + window_tokens)
        x, y = a.read_tokens(start, end), b.read_tokens(start, end)
        if not np.array_equal(x, y):
            at = start + int(np.flatnonzero(x != y)[0])
            return f"token {at} is {x[at - start]} vs {y[at - start]}"
    return None


# ----------------------------------------------------------------------------- the run


def run_build_bench(cfg: BuildSpeedConfig, progress=print) -> dict:
    """Run every (corpus size, side) pair; return the JSON-ready report."""
    if len(os.sched_getaffinity(0)) < cfg.num_proc:
        raise ConfigError(
            f"--num-proc {cfg.num_proc} needs as many cores, this process may use "
            f"{len(os.sched_getaffinity(0))}; lower --num-proc"
        )
    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(cache, cfg.vocab_size)
    results: list[SideResult] = []
    for size_mb in cfg.sizes_mb:
        corpus = _corpus(cache, size_mb, cfg.seed)
        works = [cache / "work" / f"side{i}" for i in range(len(SIDES))]
        for side, work in zip(SIDES, works, strict=True):
            progress(f"bench build: {side} on {corpus.name} ({cfg.num_proc} processes) ...")
            results.append(_run_side(side, corpus, tokenizer, cfg, work))
        try:
            differs = _first_difference(works[0] / "out", works[1] / "out")
        finally:
            shutil.rmtree(cache / "work", ignore_errors=True)
        if differs is not None:
            raise ConfigError(
                f"bench build: the two builds disagree on {corpus.name} ({differs}); the "
                "comparison is void"
            )
    return {
        "machine": machine_facts(),
        "config": {
            **asdict(cfg),
            "cache_dir": str(cfg.cache_dir),
            "json_path": str(cfg.json_path) if cfg.json_path else None,
        },
        "results": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in results],
        "speedup": {
            f"{r.corpus_mb:.0f}": h.seconds / r.seconds
            for r, h in zip(results[::2], results[1::2], strict=True)
        },
    }


def table(report: dict) -> str:
    """A Markdown table: per corpus size and side, time, rate, ratio and peak memory."""
    rows = [
        "| corpus MB | build | seconds | tokens/s | speed vs datasets | CPU s (tree) "
        "| peak PSS MB (tree) | peak USS MB (tree) | peak RSS MB (tree) | process s |",
        "|---" * 10 + "|",
    ]
    results = report["results"]
    for ours, hf in zip(results[::2], results[1::2], strict=True):
        for r in (ours, hf):
            ratio = f"{hf['seconds'] / r['seconds']:.2f}x"
            rows.append(
                f"| {r['corpus_mb']:.0f} | {r['side']} | {r['seconds']:.2f} | "
                f"{r['tokens_per_s'] / 1e6:.2f} M | {ratio} | {r['cpu_seconds']:.2f} | "
                f"{r['peak_pss_bytes'] / 2**20:.0f} | {r['peak_uss_bytes'] / 2**20:.0f} | "
                f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['process_seconds']:.2f} |"
            )
    return "\n".join(rows)


def run_and_report(cfg: BuildSpeedConfig) -> int:
    report = run_build_bench(cfg, progress=lambda line: print(line, file=sys.stderr))
    print(describe(report["machine"]))
    print(f"{cfg.num_proc} processes, byte-level BPE of {cfg.vocab_size} tokens")
    print(table(report))
    if cfg.json_path is not None:
        cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_path.write_text(json.dumps(report, indent=1) + "\n")
    return 0
