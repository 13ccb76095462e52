"""`bench sft`: fine-tuning a local Hugging Face model on prompt/response records, through our
data path and through `datasets` + a torch DataLoader, in one run.

Both sides start from the same generated records (pipeline/sample_corpus.py) and the same tiny
Llama folder with its tokenizer (trainer_low_mem/sample_model.py), tokenise prompt and response
separately (BOS before the prompt, EOS after the response, labels -100 on the prompt) and run the
same AdamW steps on CPU:

- ours: `pipeline build --sft` -> Loader (whole samples packed into rows of seq_len) ->
  Prefetcher -> the model wrapped by `load_model_folder` (no attention across packed samples);
- HF: `load_dataset("json")` -> `map` -> DataLoader with `DataCollatorForSeq2Seq` (each batch
  padded to its longest sample) -> `AutoModelForCausalLM(..., labels=...)`.

Each side runs in a fresh process pinned to the same cores (bench/build_speed.py `run_pinned`),
so peak memory is PSS summed over its process tree, DataLoader workers included. Both sides must
label the same number of tokens over a full pass of the records, or the comparison is void.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lowmem_core.format import IGNORE_INDEX  # -100, also what transformers' losses skip

if TYPE_CHECKING:
    from bench.config import SftSpeedConfig

SIDES = ("pipeline Loader", "datasets DataLoader")
_CHILD = "import sys\nfrom bench.sft_speed import run_side\nrun_side(sys.argv[1])"


@dataclass(frozen=True)
class SideResult:
    side: str
    prepare_s: float  # records -> training-ready dataset (pipeline build, or load_dataset + map)
    timed_s: float  # the timed steps, data waits included
    steps: int  # timed steps
    label_tokens: int  # positions with a label (response + EOS) in the timed steps
    positions: int  # token positions of the timed batches, padding included
    pad_positions: int  # positions holding the pad token in the timed batches
    data_wait_s: float  # time spent waiting for the next batch in the timed steps
    full_pass_label_tokens: int  # labelled positions over one full pass of the records
    split_samples: int | None  # ours: samples longer than a row, split over rows (HF: None)
    process_seconds: float  # the whole process, interpreter start and imports included
    cpu_seconds: float  # user + system CPU time of the process tree
    peak_pss_bytes: int  # largest PSS sum over the process tree
    peak_rss_bytes: int  # largest RSS sum over the process tree (counts shared pages twice)

    @property
    def label_tokens_per_s(self) -> float:
        return self.label_tokens / max(self.timed_s, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.positions / max(self.timed_s, 1e-9)

    @property
    def padding_frac(self) -> float:
        return self.pad_positions / max(self.positions, 1)

    @property
    def data_wait_frac(self) -> float:
        return self.data_wait_s / max(self.timed_s, 1e-9)


# ----------------------------------------------------------------------------- in the child


def _passes(iterable: Iterable) -> Iterator:
    """Batches of pass after pass (an epoch each)."""
    while True:
        yield from iterable


def _train(batches: Iterator, step: Callable, a: dict, pad_id: int) -> dict:
    """Warm-up then timed steps; counts of the timed batches."""
    label = positions = pad = 0
    wait_s = 0.0
    started = time.perf_counter()
    for i in range(a["warmup_steps"] + a["steps"]):
        if i == a["warmup_steps"]:
            label = positions = pad = 0
            wait_s, started = 0.0, time.perf_counter()
        t = time.perf_counter()
        batch = next(batches)
        wait_s += time.perf_counter() - t
        ids = batch["input_ids"]  # (B, L) int64
        label += int((batch["labels"] != IGNORE_INDEX).sum())
        positions += ids.numel()
        pad += int((ids == pad_id).sum())
        step(batch)
    return {
        "timed_s": time.perf_counter() - started,
        "label_tokens": label,
        "positions": positions,
        "pad_positions": pad,
        "data_wait_s": wait_s,
    }


def _adamw_step(optimizer, loss) -> None:
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _ours(a: dict) -> dict:
    import torch

    from pipeline import Loader, Prefetcher, build_dataset, open_dataset
    from pipeline.config import BuildConfig
    from trainer_low_mem.hf_model import load_model_folder

    started = time.perf_counter()
    build = BuildConfig(
        inputs=[Path(a["train"])],
        out=Path(a["out"]),
        tokenizer=a["model"],
        sft=True,
        num_proc=a["workers"],
    )
    build_dataset(build, progress=False)
    prepare_s = time.perf_counter() - started
    ds = open_dataset(a["out"])
    shape = {"batch_size": a["batch_size"], "seq_len": a["seq_len"], "seed": a["seed"]}
    counting = Loader(ds, **shape)
    full_pass = sum(batch.num_tokens for batch in counting)
    torch.manual_seed(a["seed"])
    model = load_model_folder(a["model"]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch) -> None:
        out = model(batch["input_ids"], batch["position_ids"], batch["labels"])
        _adamw_step(optimizer, out.loss)

    prefetcher = Prefetcher(Loader(ds, **shape), depth=2, num_readers=a["workers"])
    batches = _passes(prefetcher)
    timed = _train(batches, step, a, ds.pad_id)
    batches.close()
    prefetcher.close()
    return {
        **timed,
        "prepare_s": prepare_s,
        "full_pass_label_tokens": full_pass,
        "split_samples": counting.split_samples,
    }


def _hf(a: dict) -> dict:
    import datasets
    import pyarrow.compute as pc
    import torch
    import transformers

    datasets.disable_progress_bars()
    started = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(a["model"], local_files_only=True)
    eos, max_len = tok.eos_token_id, a["seq_len"]

    def encode(batch: dict) -> dict:
        prompts = tok(batch["prompt"])["input_ids"]  # BOS + prompt, as the build's prefix
        responses = tok(batch["response"], add_special_tokens=False)["input_ids"]
        ids = [(p + r + [eos])[:max_len] for p, r in zip(prompts, responses, strict=True)]
        labels = [
            ([IGNORE_INDEX] * len(p) + r + [eos])[:max_len]
            for p, r in zip(prompts, responses, strict=True)
        ]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels}

    ds = datasets.load_dataset("json", data_files=a["train"], split="train", cache_dir=a["out"])
    workers = a["workers"] if a["workers"] > 1 else None
    ds = ds.map(encode, batched=True, num_proc=workers, remove_columns=ds.column_names)
    prepare_s = time.perf_counter() - started
    labels = pc.list_flatten(ds.data.column("labels").combine_chunks())
    full_pass = int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py())
    torch.manual_seed(a["seed"])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a["model"], local_files_only=True, dtype=torch.float32
    )
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch) -> None:
        _adamw_step(optimizer, model(**batch).loss)

    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=a["batch_size"],
        shuffle=True,
        num_workers=a["workers"],
        persistent_workers=True,
        generator=torch.Generator().manual_seed(a["seed"]),
        collate_fn=transformers.DataCollatorForSeq2Seq(
            tok, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
        ),
    )
    timed = _train(_passes(loader), step, a, tok.pad_token_id)
    return {
        **timed,
        "prepare_s": prepare_s,
        "full_pass_label_tokens": full_pass,
        "split_samples": None,
    }


def run_side(args_json: str) -> None:
    """The child's entry: run one side as `args_json` says; print its counts as one JSON line."""
    import torch

    a = json.loads(args_json)
    torch.set_num_threads(a["torch_threads"])
    outcome = _ours(a) if a["side"] == SIDES[0] else _hf(a)
    print(json.dumps(outcome), flush=True)


# ----------------------------------------------------------------------------- in the parent


def _inputs(cfg: SftSpeedConfig) -> Path:
    """A folder with model/ (tokenizer, chat template, seeded weights) and train.jsonl (cached)."""
    from pipeline.sample_corpus import write_sample_sft
    from trainer_low_mem.sample_model import write_sample_model

    folder = Path(cfg.cache_dir) / f"sft-{cfg.num_records}r-h{cfg.model_hidden}-s{cfg.seed}"
    if (folder / "train.jsonl").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_sample_model(tmp / "model", hidden_size=cfg.model_hidden, seed=cfg.seed)
    write_sample_sft(tmp, num_train=cfg.num_records, num_eval=1, seed=1234 + cfg.seed)
    tmp.replace(folder)
    return folder


def _run_side(side: str, inputs: Path, cfg: SftSpeedConfig, work: Path) -> SideResult:
    from bench.build_speed import run_pinned

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = {
        "side": side,
        "train": str(inputs / "train.jsonl"),
        "model": str(inputs / "model"),
        "out": str(work / "data"),
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "steps": cfg.steps,
        "warmup_steps": cfg.warmup_steps,
        "workers": cfg.workers,
        "torch_threads": cfg.torch_threads,
        "seed": cfg.seed,
    }
    cores = sorted(os.sched_getaffinity(0))
    run = run_pinned(["-c", _CHILD, json.dumps(args)], cores, f"bench sft: the {side} run")
    shutil.rmtree(work, ignore_errors=True)
    o = run.outcome
    return SideResult(
        side=side,
        prepare_s=o["prepare_s"],
        timed_s=o["timed_s"],
        steps=cfg.steps,
        label_tokens=o["label_tokens"],
        positions=o["positions"],
        pad_positions=o["pad_positions"],
        data_wait_s=o["data_wait_s"],
        full_pass_label_tokens=o["full_pass_label_tokens"],
        split_samples=o["split_samples"],
        process_seconds=run.process_seconds,
        cpu_seconds=run.cpu_seconds,
        peak_pss_bytes=run.peak_pss_bytes,
        peak_rss_bytes=run.peak_rss_bytes,
    )


def _row(r: SideResult) -> dict:
    derived = ("label_tokens_per_s", "tokens_per_s", "padding_frac", "data_wait_frac")
    return {**asdict(r), **{name: getattr(r, name) for name in derived}}


def run_sft_bench(cfg: SftSpeedConfig, progress=print) -> dict:
    """Run both sides on the same records and model; return the JSON-ready report."""
    from bench.machine import machine_facts
    from lowmem_core.errors import ConfigError

    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    progress(f"bench sft: {cfg.num_records} records and a hidden-{cfg.model_hidden} model ...")
    inputs = _inputs(cfg)
    results = []
    for side in SIDES:
        progress(f"bench sft: {side}, {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} ...")
        results.append(_run_side(side, inputs, cfg, cache / "sft-work"))
    ours, hf = results
    if ours.full_pass_label_tokens != hf.full_pass_label_tokens:
        raise ConfigError(
            f"bench sft: over a full pass ours labels {ours.full_pass_label_tokens} tokens and "
            f"HF {hf.full_pass_label_tokens} ({ours.split_samples} samples are longer than "
            f"--seq-len {cfg.seq_len}, which HF truncates), so the comparison is void; raise "
            "--seq-len"
        )
    return {
        "machine": machine_facts(),
        "config": {
            **asdict(cfg),
            "cache_dir": str(cfg.cache_dir),
            "json_path": str(cfg.json_path) if cfg.json_path else None,
        },
        "results": [_row(r) for r in results],
        "ours_over_hf": {
            "label_tokens_per_s": ours.label_tokens_per_s / hf.label_tokens_per_s,
            "tokens_per_s": ours.tokens_per_s / hf.tokens_per_s,
            "peak_pss_bytes": ours.peak_pss_bytes / hf.peak_pss_bytes,
            "prepare_s": ours.prepare_s / hf.prepare_s,
        },
    }


def table(report: dict) -> str:
    """A Markdown table: one row per side, then the ratios ours / HF."""
    rows = [
        "| side | prepare s | label tokens/s | tokens/s (with padding) | padding | data wait "
        "| peak PSS MB (tree) | peak RSS MB (tree) | process s |",
        "|---" * 9 + "|",
    ]
    for r in report["results"]:
        rows.append(
            f"| {r['side']} | {r['prepare_s']:.2f} | {r['label_tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s']:,.0f} | {r['padding_frac']:.1%} | {r['data_wait_frac']:.1%} | "
            f"{r['peak_pss_bytes'] / 2**20:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} | "
            f"{r['process_seconds']:.1f} |"
        )
    q = report["ours_over_hf"]
    rows.append(
        f"| ours / HF | {q['prepare_s']:.2f}x | {q['label_tokens_per_s']:.2f}x | "
        f"{q['tokens_per_s']:.2f}x | | | {q['peak_pss_bytes']:.2f}x | | |"
    )
    return "\n".join(rows)


def run_and_report(cfg: SftSpeedConfig) -> int:
    from bench.machine import describe

    report = run_sft_bench(cfg, progress=lambda line: print(line, file=sys.stderr))
    ours = report["results"][0]
    print(describe(report["machine"]))
    print(
        f"{cfg.num_records} records, {cfg.steps} timed steps of {cfg.batch_size} rows "
        f"(seq_len {cfg.seq_len}), {cfg.workers} workers, {cfg.torch_threads} torch thread(s); "
        "both sides label "
        f"{ours['full_pass_label_tokens']} tokens over a full pass"
    )
    print(table(report))
    if cfg.json_path is not None:
        cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_path.write_text(json.dumps(report, indent=1) + "\n")
    return 0
