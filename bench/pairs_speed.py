"""Encoder-decoder batches: our packed pairs against `DataCollatorForSeq2Seq`, in one run.

Both sides train the same tiny T5 (trainer_low_mem.seq2seq.write_sample_t5) on the same pairs,
one full pass each, with the same AdamW, on CPU:

- packed: `pipeline build --sft` -> `PairLoader` (pairs packed into encoder and decoder rows of
  at most `max_len` tokens, sized by `pair_row_lens`; block-diagonal masks) -> `Seq2SeqLM`, both
  as the trainer makes them (the model's kind and its `PairRows`);
- padded: the dataset's own pairs (truncated as the loader truncates, so both label the same
  tokens) -> a DataLoader with `DataCollatorForSeq2Seq` (each batch padded to its longest pair)
  -> `AutoModelForSeq2SeqLM(input_ids, attention_mask, labels)`.

The default width, 256 (4 heads of 64, as T5 checkpoints are shaped), keeps the linear layers a
real share of the work. At width 32 attention is nearly all of it, and a packed row's attention
across its pairs (masked, but computed: L^2 per row against the sum of l^2 per pair) costs about
what its saved padding does.

Both take the same pairs per optimizer step on average: the padded side `batch_pairs`, the packed
side as many rows as hold that many pairs over the epoch (unless --rows says otherwise), so both
make about the same number of optimizer steps. Two sets of pairs (`--task`): "qa", short prompts
of about the same length and responses of 15-300 tokens, and "summarise", whole articles of
varied length as prompts and one sentence as the response (pipeline.sample_corpus).

Reported per side: useful-token share (non-padding positions) of the encoder and decoder
batches, label tokens per second over the pass (data time included), steps. Run:
`python -m bench.pairs_speed --out DIR [--task qa|summarise|both --pairs N --max_len L
--rows R --batch_pairs P --d_model D --repeats K]`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lowmem_core.errors import run_cli
from pipeline import open_dataset
from pipeline.build import build_dataset
from pipeline.config import BuildConfig
from pipeline.pair_layout import pair_row_lens
from pipeline.pairs import PairLoader
from pipeline.sample_corpus import write_sample_sft
from trainer_low_mem.config import ModelConfig
from trainer_low_mem.models import resolve_model_kind
from trainer_low_mem.seq2seq import write_sample_t5

DEFAULT_MAX_LEN = {"qa": 128, "summarise": 512}


@dataclass(frozen=True)
class PairSide:
    side: str
    batch: int  # rows (packed) or pairs (padded) per step
    steps: int
    label_tokens: int  # labelled decoder positions of the pass (response tokens + EOS)
    enc_useful_frac: float  # encoder positions holding a token / all encoder positions
    dec_useful_frac: float  # decoder positions holding a token / all decoder positions
    seconds: float  # the whole pass: batches made and trained on

    @property
    def label_tokens_per_s(self) -> float:
        return self.label_tokens / max(self.seconds, 1e-9)


def prepare(out: Path, num_pairs: int, d_model: int = 32, task: str = "qa") -> tuple[Path, Path]:
    """(T5 folder of width d_model, sft dataset of `task`) under `out`, made once (the tokenizer
    does not depend on the width, so one dataset serves every width)."""
    model, data = out / f"t5-d{d_model}", out / f"pairs-{task}-{num_pairs}"
    if not (model / "config.json").is_file():
        write_sample_t5(model, d_model=d_model)
    if not (data / "index.json").is_file():
        records = write_sample_sft(out / task, num_train=num_pairs, num_eval=1, task=task)["train"]
        cfg = BuildConfig(inputs=[records], out=data, tokenizer=str(model), sft=True)
        build_dataset(cfg, progress=False)
    return model, data


def rows_for(data: Path, max_len: int, batch_pairs: int) -> int:
    """Packed rows per step that hold `batch_pairs` pairs on average over the epoch."""
    ds = open_dataset(data)
    index = PairLoader(ds, 1, *pair_row_lens(ds, max_len), start_id=0).index
    return max(1, round(batch_pairs * index.total_rows / len(ds)))


def packed_side(model_dir: Path, data: Path, max_len: int, rows: int, seed: int = 0) -> PairSide:
    ds = open_dataset(data)
    kind = resolve_model_kind(ModelConfig(model=model_dir))  # as the trainer builds and feeds it
    torch.manual_seed(seed)
    model = kind.build(ds.vocab_size, document_masking=True, weights=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spec = kind.batch_spec(ds, max_len, packing=True, saved_loader_state=None)
    loader = spec.loader(ds, rows, rank=0, world_size=1, seed=0)
    labels = enc = dec = enc_all = dec_all = steps = 0
    start = time.perf_counter()
    for batch in loader:
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        labels += batch.num_tokens
        enc += int((batch["position_ids"] >= 0).sum())
        dec += int((batch["decoder_position_ids"] >= 0).sum())
        enc_all += batch["input_ids"].numel()
        dec_all += batch["decoder_input_ids"].numel()
        steps += 1
    seconds = time.perf_counter() - start
    return PairSide("packed PairLoader", rows, steps, labels, enc / enc_all, dec / dec_all, seconds)


def padded_side(model_dir: Path, data: Path, max_len: int, batch_pairs: int, seed: int = 0):
    import transformers

    ds = open_dataset(data)
    enc_len, dec_len = pair_row_lens(ds, max_len)
    features = []
    for i in range(len(ds)):
        doc, p = ds[i].astype("int64").tolist(), int(ds.prompt_lengths[i])
        src = doc[:p][:enc_len] or [ds.eos_id]
        features.append({"input_ids": src, "labels": [*doc[p:][: dec_len - 1], ds.eos_id]})
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).tolist()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, model=model, padding="longest")
    batches = torch.utils.data.DataLoader(
        [features[i] for i in order], batch_size=batch_pairs, collate_fn=collator
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    labels = enc = dec = enc_all = dec_all = steps = 0
    start = time.perf_counter()
    for batch in batches:
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n = int((batch["labels"] != -100).sum())
        labels, dec = labels + n, dec + n
        enc += int(batch["attention_mask"].sum())
        enc_all += batch["input_ids"].numel()
        dec_all += batch["labels"].numel()
        steps += 1
    seconds = time.perf_counter() - start
    return PairSide(
        "DataCollatorForSeq2Seq",
        batch_pairs,
        steps,
        labels,
        enc / enc_all,
        dec / dec_all,
        seconds,
    )


def compare(
    out: Path,
    num_pairs: int,
    max_len: int,
    rows: int | None,
    batch_pairs: int,
    repeats: int = 3,
    d_model: int = 32,
    task: str = "qa",
) -> list[dict]:
    """Both sides over the same pairs, alternating `repeats` times (the fastest pass of each
    counts: the machine may be shared); they must label the same tokens or the run is void.
    rows None: as many as hold `batch_pairs` pairs (rows_for)."""
    model, data = prepare(Path(out), num_pairs, d_model, task)
    rows = rows or rows_for(data, max_len, batch_pairs)
    best: dict[str, PairSide] = {}
    for _ in range(repeats):
        for side in (
            packed_side(model, data, max_len, rows),
            padded_side(model, data, max_len, batch_pairs),
        ):
            if side.side not in best or side.seconds < best[side.side].seconds:
                best[side.side] = side
    sides = list(best.values())
    if sides[0].label_tokens != sides[1].label_tokens:
        raise RuntimeError(f"the sides labelled different tokens: {sides}")
    return [{"task": task, **asdict(s), "label_tokens_per_s": s.label_tokens_per_s} for s in sides]


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pairs_speed")
    parser.add_argument("--out", type=Path, required=True, help="folder for the model and data")
    parser.add_argument("--pairs", type=int, default=600, help="prompt/response pairs")
    parser.add_argument(
        "--max_len",
        type=int,
        default=None,
        help="longest row in tokens (default: qa 128, summarise 512, about as long as their pairs)",
    )
    parser.add_argument(
        "--task", choices=["qa", "summarise", "both"], default="both", help="the pairs"
    )
    parser.add_argument(
        "--rows", type=int, default=None, help="packed rows per batch (default: --batch_pairs)"
    )
    parser.add_argument("--batch_pairs", type=int, default=8, help="pairs per padded batch")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="passes per side (fastest kept)")
    parser.add_argument(
        "--d_model", type=int, default=256, help="T5 width (4 heads, d_ff = 2 x d_model)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [
        r
        for task in (["qa", "summarise"] if args.task == "both" else [args.task])
        for r in compare(
            args.out,
            args.pairs,
            args.max_len or DEFAULT_MAX_LEN[task],
            args.rows,
            args.batch_pairs,
            repeats=args.repeats,
            d_model=args.d_model,
            task=task,
        )
    ]
    for r in results:
        print(
            f"{r['task']:<9} {r['side']:<24} batch {r['batch']:>2}  steps {r['steps']:>4}  "
            f"useful: encoder "
            f"{100 * r['enc_useful_frac']:5.1f}%  decoder {100 * r['dec_useful_frac']:5.1f}%"
            f"  label tokens {r['label_tokens']:,}"
            f"  {r['label_tokens_per_s']:,.0f} label tokens/s"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    raise SystemExit(run_cli(_main))
