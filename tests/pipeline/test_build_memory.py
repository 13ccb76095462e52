"""`pipeline build` holds memory bounded by its chunks and batches, not by the corpus: a ten
times larger corpus peaks at the same Arrow and Python allocations. Allocations are counted
(Arrow's pool statistics, tracemalloc), not sampled, so a busy machine cannot sway them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.sample_corpus import generate_documents

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

# A fresh interpreter per build, warmed up by a build of one document so that tracemalloc counts
# what the build holds, not the modules it imports on first use. JSON blocks of BLOCK_BYTES: the
# smaller corpus already keeps every in-flight slot of the build full at times, so the peaks
# compare what the corpus adds, not how often the threads happened to fill the pipeline.
BLOCK_BYTES = 128 << 10
_BUILD = textwrap.dedent("""
    import json, sys, tracemalloc
    import pyarrow as pa
    from pipeline import records
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig
    a = json.loads(sys.argv[1])
    records._JSON_BLOCK_BYTES = a["block_bytes"]
    def build(corpus, out):
        return build_dataset(BuildConfig(inputs=[corpus], out=out, tokenizer=a["tokenizer"],
                                         num_proc=2), progress=False)
    build(a["warm_up"], a["out"] + "-warm-up")
    tracemalloc.start()
    r = build(a["corpus"], a["out"])
    arrow = max(pa.default_memory_pool().max_memory(), pa.system_memory_pool().max_memory())
    print(json.dumps({"tokens": r.num_tokens, "arrow": arrow,
                      "python": tracemalloc.get_traced_memory()[1]}))
""")


def _corpus(path: Path, size_bytes: int) -> Path:
    """JSON Lines of about `size_bytes`: the sample corpus's documents, repeated."""
    lines = [json.dumps({"text": d}) + "\n" for d in generate_documents(400, seed=5)]
    written = 0
    with path.open("w") as fh:
        while written < size_bytes:
            for line in lines:
                fh.write(line)
                written += len(line)
    return path


def _peaks(tmp_path: Path, size_bytes: int, tokenizer: str) -> dict:
    corpus = _corpus(tmp_path / f"corpus-{size_bytes}.jsonl", size_bytes)
    warm_up = tmp_path / "warm-up.jsonl"
    warm_up.write_text(json.dumps({"text": "one document"}) + "\n")
    args = {
        "corpus": str(corpus),
        "warm_up": str(warm_up),
        "out": str(tmp_path / f"out-{size_bytes}"),
        "tokenizer": tokenizer,
        "block_bytes": BLOCK_BYTES,
    }
    child = subprocess.run(
        [sys.executable, "-c", _BUILD, json.dumps(args)],
        capture_output=True,
        text=True,
        env=ENV,
        check=True,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def _bpe(tmp_path: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["</s>"], show_progress=False)
    tok.train_from_iterator(generate_documents(400, seed=3), trainer)
    tok.save(str(tmp_path / "tok.json"))
    return str(tmp_path / "tok.json")


def _check_flat(tmp_path: Path, tokenizer: str, small_bytes: int) -> None:
    small = _peaks(tmp_path, small_bytes, tokenizer)
    large = _peaks(tmp_path, 10 * small_bytes, tokenizer)
    assert large["tokens"] > 9 * small["tokens"]
    for kind in ("arrow", "python"):
        # A tenth of headroom plus 1 MiB for the counts that differ (shards, log lines).
        limit = 1.1 * small[kind] + (1 << 20)
        assert large[kind] <= limit, (
            f"peak {kind} allocations grow with the corpus: {small[kind] >> 20} MiB for "
            f"{small_bytes >> 20} MB, {large[kind] >> 20} MiB for ten times as much"
        )


def test_peak_allocations_do_not_grow_with_the_corpus(tmp_path):
    """Byte tokens: 3 MB and 30 MB of JSON Lines (more than a JSON block and a shard's record
    batch in the small corpus already, so only what the corpus adds can differ)."""
    _check_flat(tmp_path, "byte", 3 << 20)


@pytest.mark.slow
def test_peak_allocations_do_not_grow_with_the_corpus_through_a_bpe_tokenizer(tmp_path):
    """The same through a byte-level BPE tokenizer.json: the chunks' texts and id lists are
    Python objects while they are encoded, so tracemalloc counts what is in flight."""
    pytest.importorskip("tokenizers")
    _check_flat(tmp_path, _bpe(tmp_path), 2 << 20)
