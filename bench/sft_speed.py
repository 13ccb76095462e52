"""`bench sft`: supervised fine-tuning of one Hugging Face model folder on the same prompt/response
records through our trainer and through TRL's SFTTrainer, interleaved, in one run.

Inputs (made once into --cache-dir): a Qwen3-architecture model (vocabulary 151,936, hidden 256,
4 layers: about 42M parameters of which 39M are the tied embedding, so the output head dominates
a step, as in a real small model's fine-tune) with the real Qwen3 tokenizer from
../shared/tokenizers/qwen3 (else the sample model's 512-token BPE, and a vocabulary that size),
and prompt/response records from the sample corpus (pipeline/sample_corpus.py). Each
configuration, {LoRA, full} x rows of {512, 2048}, takes the first records whose tokens fill
about --steps optimizer steps of packed rows.

The sides, each in a fresh process pinned to the same cores (bench/build_speed.py
`run_pinned`), train exactly one pass over those records with the same micro-batch (rows of
seq_len), accumulation, AdamW settings, constant learning rate after a linear warm-up, seed and
fp32 weights:

- ours: `pipeline build --sft` then `train_low_mem.py train`'s own path (`trainer_low_mem.loop.
  train` on the parsed flags, in the child), whatever the trainer does today;
- TRL: SFTTrainer with packing bfd, padding-free and completion-only loss (bench/trl_side.py,
  which says what TRL does on CPU SDPA and which metrics it cannot turn off).

One pass on both sides means both have trained exactly the same label tokens (the response
tokens and one EOS per record; the run stops as void otherwise), and the eval loss of their
final weights on the same held-out records (one scorer, bench `_eval`, in its own process) is
compared after that same number of label tokens. Per run: label tokens/s and process CPU
seconds per label token over the optimizer steps after --warmup-steps, the child's own peak RSS
(getrusage) and the PSS peak over its process tree, and torch's peak over step 1 (MemTracker:
tensors of the step and the optimizer's, plus the frozen weights and buffers it cannot hook).
Repeats run ours, TRL, ours, TRL ...; ratios are medians over the repeats' pairs.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from lowmem_core.format import IGNORE_INDEX  # -100, also what transformers' losses skip

if TYPE_CHECKING:
    from bench.config import SftSpeedConfig

SIDES = ("ours", "trl")
TARGET_SPEEDUP = 2.0  # label tokens/s, ours / TRL, in every configuration
TARGET_RSS_RATIO = 0.6  # peak RSS, ours / TRL, at rows of RSS_TARGET_SEQ_LEN and longer
RSS_TARGET_SEQ_LEN = 2048
EVAL_LOSS_TOLERANCE = 0.01  # |ours - TRL| / TRL: equal eval loss within 1%
PACKED_FILL = 0.9  # share of a pass's row tokens the chosen records fill (both packers fit it)
_QWEN3_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "qwen3"
_CHILD = "import sys\nfrom bench.sft_speed import run_child\nrun_child(sys.argv[1])"


# ----------------------------------------------------------------------------- in the children


class StepClock:
    """Wall and process CPU time at the end of every optimizer step, the label tokens of each
    step, and MemTracker's peak over step 1; both sides' children report through it."""

    def __init__(self) -> None:
        self.ends_s: list[float] = []
        self.ends_cpu_s: list[float] = []
        self.step_label_tokens: list[int] = []
        self.torch_peak_bytes: int | None = None
        self._pending_labels = 0
        self._tracker = None
        self._frozen: list = []  # (module, name, Parameter) made buffers during step 1
        self._untracked_bytes = 0

    def begin_step(self, step: int, model, optimizer) -> None:
        """Start MemTracker before step 1 (the step that allocates the optimizer states)."""
        if step != 1 or self._tracker is not None:
            return
        from torch.distributed._tools.mem_tracker import MemTracker

        # MemTracker hooks every parameter a forward meets and cannot hook a frozen one (LoRA's
        # base weights): those are buffers (same storage) for this step and counted as they are.
        self._frozen = []
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if not param.requires_grad:
                    delattr(module, name)
                    module.register_buffer(name, param.detach(), persistent=False)
                    self._frozen.append((module, name, param))
        self._untracked_bytes = sum(param.nbytes for _, _, param in self._frozen)
        self._untracked_bytes += sum(b.nbytes for b in model.buffers())
        tracker = MemTracker()
        tracker.track_external(getattr(optimizer, "optimizer", optimizer))  # accelerate's wrap
        tracker.__enter__()
        self._tracker = tracker

    def add_label_tokens(self, count: int) -> None:
        self._pending_labels += count

    def end_step(self, label_tokens: int | None = None) -> None:
        """An optimizer step ended; `label_tokens` is its count (else the added ones)."""
        if self._tracker is not None and self.torch_peak_bytes is None:
            self._tracker.__exit__(None, None, None)
            peaks = self._tracker.get_tracker_snapshot("peak").values()
            self.torch_peak_bytes = sum(s["Total"] for s in peaks) + self._untracked_bytes
            for module, name, param in self._frozen:  # the same Parameter objects back
                delattr(module, name)
                module.register_parameter(name, param)
        self.ends_s.append(time.perf_counter())
        self.ends_cpu_s.append(time.process_time())
        self.step_label_tokens.append(
            self._pending_labels if label_tokens is None else label_tokens
        )
        self._pending_labels = 0

    def summary(self, warmup_steps: int) -> dict:
        """The timed steps are those after the first `warmup_steps`."""
        from lowmem_core.errors import ConfigError

        steps = len(self.ends_s)
        if steps <= warmup_steps:
            raise ConfigError(
                f"one pass took {steps} optimizer step(s), not more than --warmup-steps "
                f"{warmup_steps}; raise --steps"
            )
        w = warmup_steps - 1  # the end of the last warm-up step starts the timed span
        first = 0.0 if w < 0 else self.ends_s[w]
        first_cpu = 0.0 if w < 0 else self.ends_cpu_s[w]
        return {
            "steps": steps,
            "timed_steps": steps - warmup_steps,
            "timed_s": self.ends_s[-1] - first,
            "timed_cpu_s": self.ends_cpu_s[-1] - first_cpu,
            "timed_label_tokens": sum(self.step_label_tokens[warmup_steps:]),
            "pass_label_tokens": sum(self.step_label_tokens),
            "torch_peak_bytes": self.torch_peak_bytes,
        }


def _schedule(a: dict) -> dict:
    """AdamW and learning-rate settings both sides get."""
    return {
        "lr": a["lr"],
        "lr_warmup_steps": a["lr_warmup_steps"],
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "max_grad_norm": 1.0,
    }


def _ours(a: dict, clock: StepClock) -> dict:
    """`pipeline build --sft`, then the trainer's `train` on the flags a user would type."""
    from pipeline import build_dataset
    from pipeline.config import BuildConfig
    from trainer_low_mem.cli import parse_job_config
    from trainer_low_mem.loop import train
    from trainer_low_mem.step import Stepper

    out = Path(a["out"])
    started = time.perf_counter()
    cfg = BuildConfig(inputs=[Path(a["train"])], out=out / "data", tokenizer=a["model"], sft=True)
    build_dataset(cfg, progress=False)
    prepare_s = time.perf_counter() - started
    s = a["schedule"]
    flags = [
        *("--data", str(out / "data"), "--model", a["model"], "--output_dir", str(out / "run")),
        *("--max_seq_len", str(a["seq_len"]), "--auto_plan", "False"),
        *("--batch_size_per_gpu", str(a["micro_batch"])),
        *("--gradient_accumulation_steps", str(a["grad_accum"]), "--epochs", "1"),
        *("--lr", str(s["lr"]), "--warmup_steps", str(s["lr_warmup_steps"])),
        *("--min_lr_ratio", "1.0", "--weight_decay", str(s["weight_decay"])),
        *("--adam_beta1", str(s["adam_beta1"]), "--adam_beta2", str(s["adam_beta2"])),
        *("--max_grad_norm", str(s["max_grad_norm"]), "--seed", str(a["seed"])),
        *("--save_every", "0", "--save_every_minutes", "0", "--no_progress_bar"),
        *("--log_every", "1000000"),
    ]
    if a["tuning"] == "lora":
        flags += ["--lora_rank", str(a["lora_rank"]), "--lora_alpha", str(a["lora_alpha"])]
    original = Stepper.run

    def clocked(self, micro_batches, step):
        clock.begin_step(step, self.model, self.optimizer)
        outcome = original(self, micro_batches, step)
        if not isinstance(outcome, str):  # a string is an agreed OOM: the step is retried
            clock.end_step(outcome[1])
        return outcome

    Stepper.run = clocked
    try:
        train(parse_job_config(flags))
    finally:
        Stepper.run = original
    if a.get("save"):
        Path(a["save"]).parent.mkdir(parents=True, exist_ok=True)
        (out / "run" / "final").rename(a["save"])  # merged LoRA, a folder transformers loads
    return {"prepare_s": prepare_s}


def encode_record(tok, record: dict) -> tuple[list[int], list[int]]:
    """(ids, labels) of a record as TRL tokenises prompt/completion: prompt, then prompt +
    response + EOS tokenised whole; labels where the two first differ onwards."""
    prompt = tok(record["prompt"])["input_ids"]
    ids = tok(record["prompt"] + record["response"] + tok.eos_token)["input_ids"]
    pairs = zip(prompt, ids, strict=False)  # the prompt alone may be the longer
    prefix = next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(prompt), len(ids)))
    return ids, [IGNORE_INDEX] * prefix + ids[prefix:]


def _eval(a: dict) -> dict:
    """Mean cross-entropy per label token of each saved model on the held-out records."""
    import torch
    import torch.nn.functional as F
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(a["tokenizer"], local_files_only=True)
    with open(a["eval"], encoding="utf-8") as fh:
        encoded = [encode_record(tok, json.loads(line)) for line in fh]
    losses = {}
    for name, folder in a["models"].items():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32
        ).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for ids, labels in encoded:
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()  # (T-1, V)
                target = torch.tensor(labels[1:])
                total += F.cross_entropy(logits, target, reduction="sum").item()
                count += int((target != IGNORE_INDEX).sum())
        losses[name] = total / count
    return {"eval_loss": losses, "eval_label_tokens": count}


def run_child(args_json: str) -> None:
    """A child's entry: one side's pass (or the eval) as `args_json` says; one JSON line out."""
    import torch

    a = json.loads(args_json)
    torch.set_num_threads(a["torch_threads"])
    if a["side"] == "eval":
        print(json.dumps(_eval(a)), flush=True)
        return
    clock = StepClock()
    if a["side"] == "ours":
        outcome = _ours(a, clock)
    else:
        from bench.trl_side import run_trl

        outcome = run_trl(a, clock)
    outcome.update(clock.summary(a["warmup_steps"]))
    outcome["peak_rss_self_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(outcome), flush=True)


# ----------------------------------------------------------------------------- in the parent


def _tokenizer_source(cfg: SftSpeedConfig) -> Path | None:
    """The tokenizer folder to use: --tokenizer, else ../shared's Qwen3 when present, else None
    (the sample model's BPE)."""
    if cfg.tokenizer is not None:
        return Path(cfg.tokenizer)
    return _QWEN3_TOKENIZER if (_QWEN3_TOKENIZER / "tokenizer.json").is_file() else None


def _write_model(out: Path, cfg: SftSpeedConfig, tokenizer: Path | None) -> None:
    """A Qwen3-architecture folder: the tokenizer's files and seeded fp32 weights."""
    import torch
    import transformers

    from trainer_low_mem.sample_model import write_sample_model

    if tokenizer is None:
        write_sample_model(out, seed=cfg.seed, with_weights=False)
        for name in ("config.json", "generation_config.json"):
            (out / name).unlink(missing_ok=True)  # the sample Llama's; a Qwen3 replaces it
    else:
        out.mkdir(parents=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer / name, out / name)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    vocab = 151_936 if len(tok) > 150_000 else len(tok)  # Qwen3 pads its 151,669 to this
    config = transformers.Qwen3Config(
        vocab_size=vocab,
        hidden_size=cfg.model_hidden,
        intermediate_size=cfg.model_hidden * 3,
        num_hidden_layers=cfg.model_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=cfg.model_hidden // 4,
        max_position_embeddings=max(4096, max(cfg.seq_lens)),
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    transformers.Qwen3ForCausalLM(config).save_pretrained(out)


def _inputs(cfg: SftSpeedConfig) -> Path:
    """A folder with model/, train.jsonl (the record pool) and eval.jsonl (cached)."""
    from pipeline.sample_corpus import write_sample_sft

    tokenizer = _tokenizer_source(cfg)
    kind = "qwen3" if tokenizer == _QWEN3_TOKENIZER else "sample" if tokenizer is None else "tok"
    name = f"sft-trl-{kind}-h{cfg.model_hidden}x{cfg.model_layers}-e{cfg.eval_records}-s{cfg.seed}"
    folder = Path(cfg.cache_dir) / name
    if (folder / "eval.jsonl").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _write_model(tmp / "model", cfg, tokenizer)
    write_sample_sft(tmp, num_train=3000, num_eval=cfg.eval_records, seed=1234 + cfg.seed)
    tmp.replace(folder)
    return folder


def micro_batch_rows(cfg: SftSpeedConfig, seq_len: int) -> int:
    return max(1, cfg.micro_batch_tokens // seq_len)


def _records(inputs: Path, cfg: SftSpeedConfig, seq_len: int) -> Path:
    """The first pool records whose tokens (+ EOS) fill PACKED_FILL of --steps steps' rows."""
    from tokenizers import Tokenizer

    budget = PACKED_FILL * cfg.steps * micro_batch_rows(cfg, seq_len) * cfg.grad_accum * seq_len
    tok = Tokenizer.from_file(str(inputs / "model" / "tokenizer.json"))
    lines = (inputs / "train.jsonl").read_text(encoding="utf-8").splitlines()
    taken, used = [], 0
    for line in lines:
        r = json.loads(line)
        used += len(tok.encode(r["prompt"] + r["response"]).ids) + 1
        if used > budget and taken:
            break
        taken.append(line)
    path = inputs / f"train-L{seq_len}-{len(taken)}.jsonl"
    path.write_text("\n".join(taken) + "\n", encoding="utf-8")
    return path


def _threads(cfg: SftSpeedConfig) -> int:
    return cfg.torch_threads or len(os.sched_getaffinity(0))


def _run_side(side: str, case: dict, cfg: SftSpeedConfig, work: Path, save: Path | None) -> dict:
    """One side's pass in a pinned child; its figures as a JSON-ready dict."""
    from bench.build_speed import run_pinned

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = {
        **case,
        "side": side,
        "out": str(work),
        "save": None if save is None else str(save),
        "warmup_steps": cfg.warmup_steps,
        "torch_threads": _threads(cfg),
        "seed": cfg.seed,
        "lora_rank": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lr": cfg.lr,
        "lr_warmup_steps": cfg.lr_warmup_steps,
    }
    args["schedule"] = _schedule(args)
    what = f"bench sft: the {side} run ({case['tuning']}, rows of {case['seq_len']})"
    try:
        run = run_pinned(["-c", _CHILD, json.dumps(args)], sorted(os.sched_getaffinity(0)), what)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    o = run.outcome
    return {
        "side": side,
        "tuning": case["tuning"],
        "seq_len": case["seq_len"],
        **o,
        "label_tokens_per_s": o["timed_label_tokens"] / max(o["timed_s"], 1e-9),
        "cpu_s_per_label_token": o["timed_cpu_s"] / max(o["timed_label_tokens"], 1),
        "process_seconds": run.process_seconds,
        "peak_pss_tree_bytes": run.peak_pss_bytes,
        "peak_rss_tree_bytes": run.peak_rss_bytes,
    }


def _evaluate(inputs: Path, models: dict[str, Path], cfg: SftSpeedConfig) -> dict:
    from bench.build_speed import run_pinned

    args = {
        "side": "eval",
        "tokenizer": str(inputs / "model"),
        "eval": str(inputs / "eval.jsonl"),
        "models": {name: str(path) for name, path in models.items()},
        "torch_threads": _threads(cfg),
    }
    cores = sorted(os.sched_getaffinity(0))
    return run_pinned(["-c", _CHILD, json.dumps(args)], cores, "bench sft: the eval").outcome


def _median_ratio(ours: list[dict], trl: list[dict], key: str) -> float:
    return statistics.median(o[key] / t[key] for o, t in zip(ours, trl, strict=True))


# The figures of each pass that the report gives per side and as ours / TRL.
COMPARED = (
    "label_tokens_per_s",
    "cpu_s_per_label_token",
    "peak_rss_self_bytes",
    "peak_pss_tree_bytes",
    "torch_peak_bytes",
)


def compare(runs: list[dict], eval_loss: dict) -> list[dict]:
    """Per configuration: medians of each side, median ratios of the repeats' pairs, eval
    losses, and which targets are met. `eval_loss`: {"tuning/seq_len": {side: loss}}."""
    from lowmem_core.errors import ConfigError

    out = []
    keys = dict.fromkeys((r["tuning"], r["seq_len"]) for r in runs)
    for tuning, seq_len in keys:
        mine = [r for r in runs if (r["tuning"], r["seq_len"]) == (tuning, seq_len)]
        ours = [r for r in mine if r["side"] == "ours"]
        trl = [r for r in mine if r["side"] == "trl"]
        loss = eval_loss.get(f"{tuning}/{seq_len}", {})
        row: dict = {"tuning": tuning, "seq_len": seq_len, "repeats": len(ours)}
        for side, rs in (("ours", ours), ("trl", trl)):
            if not rs:
                continue
            row[side] = {key: statistics.median(r[key] for r in rs) for key in (*COMPARED, "steps")}
            row[side]["pass_label_tokens"] = rs[0]["pass_label_tokens"]
            row[side]["eval_loss"] = loss.get(side)
        if trl:
            counts = {r["pass_label_tokens"] for r in mine}
            if len(counts) != 1:
                raise ConfigError(
                    f"bench sft ({tuning}, rows of {seq_len}): one pass trained "
                    f"{sorted(counts)} label tokens on the two sides, so the comparison is void; "
                    "check the records' tokenisation (prompt/response boundary)"
                )
            row["ours_over_trl"] = {key: _median_ratio(ours, trl, key) for key in COMPARED}
            row["targets"] = targets(row)
        out.append(row)
    return out


def targets(row: dict) -> dict:
    """Met (True), not met (False) or not applicable (None), for one configuration."""
    q = row["ours_over_trl"]
    ours_loss, trl_loss = row["ours"]["eval_loss"], row["trl"]["eval_loss"]
    loss_ok = None
    if ours_loss is not None and trl_loss is not None:
        loss_ok = abs(ours_loss - trl_loss) <= EVAL_LOSS_TOLERANCE * abs(trl_loss)
    return {
        "speed": q["label_tokens_per_s"] >= TARGET_SPEEDUP,
        "rss": q["peak_rss_self_bytes"] <= TARGET_RSS_RATIO
        if row["seq_len"] >= RSS_TARGET_SEQ_LEN
        else None,
        "eval_loss": loss_ok,
    }


def run_sft_bench(cfg: SftSpeedConfig, progress=print, on_configuration=None) -> dict:
    """Run every configuration, sides interleaved; return the JSON-ready report.
    `on_configuration(report)` gets the report so far after each configuration (a long run
    interrupted still leaves the configurations it finished)."""
    from bench.machine import machine_facts
    from bench.trl_side import trl_missing

    started = time.perf_counter()
    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    skipped = trl_missing()
    if skipped is not None:
        progress(f"bench sft: TRL side skipped: {skipped}")
    sides = SIDES[:1] if skipped else SIDES
    inputs = _inputs(cfg)
    runs, eval_loss, saved = [], {}, cache / "sft-saved"
    for tuning in cfg.tuning:
        for seq_len in cfg.seq_lens:
            records = _records(inputs, cfg, seq_len)
            case = {
                "tuning": tuning,
                "seq_len": seq_len,
                "micro_batch": micro_batch_rows(cfg, seq_len),
                "grad_accum": cfg.grad_accum,
                "train": str(records),
                "model": str(inputs / "model"),
            }
            shutil.rmtree(saved, ignore_errors=True)
            models = {}
            for repeat in range(cfg.repeats):
                for side in sides:
                    progress(
                        f"bench sft: {tuning}, rows of {seq_len}, repeat {repeat + 1}/"
                        f"{cfg.repeats}: {side} ..."
                    )
                    save = saved / side if repeat == 0 else None
                    run = _run_side(side, case, cfg, cache / "sft-work", save)
                    runs.append({**run, "repeat": repeat})
                    if save is not None:
                        models[side] = save
            progress(f"bench sft: {tuning}, rows of {seq_len}: eval loss of each side ...")
            try:
                scored = _evaluate(inputs, models, cfg)
            finally:
                shutil.rmtree(saved, ignore_errors=True)
            eval_loss[f"{tuning}/{seq_len}"] = scored["eval_loss"]
            report = {
                "machine": machine_facts(),
                "config": {
                    **asdict(cfg),
                    "cache_dir": str(cfg.cache_dir),
                    "json_path": str(cfg.json_path) if cfg.json_path else None,
                    "tokenizer": str(_tokenizer_source(cfg) or "sample model BPE"),
                },
                "trl_skipped": skipped,
                "wall_s": time.perf_counter() - started,
                "complete": len(eval_loss) == len(cfg.tuning) * len(cfg.seq_lens),
                "runs": runs,
                "comparisons": compare(runs, eval_loss),
            }
            if on_configuration is not None:
                on_configuration(report)
    return report


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else "met" if ok else "NOT met"


def table(report: dict) -> str:
    """A Markdown table: one row per configuration, ours | TRL and ours / TRL."""
    rows = [
        "| tuning | rows | label tokens/s ours \\| TRL | ours / TRL | CPU ms per label token "
        "ours \\| TRL | peak RSS MB ours \\| TRL | RSS ours / TRL | peak PSS MB (tree) ours "
        "\\| TRL | torch peak MB ours \\| TRL | eval loss ours \\| TRL | label tokens (pass) "
        "| steps ours \\| TRL | targets: speed, RSS, eval loss |",
        "|---" * 13 + "|",
    ]
    mb = 2**20
    for c in report["comparisons"]:
        o, t, q = c["ours"], c.get("trl"), c.get("ours_over_trl")

        def pair(key, scale=1.0, fmt=",.0f", o=o, t=t):
            mine = "n/a" if o[key] is None else format(o[key] / scale, fmt)
            if t is None:
                return mine
            return f"{mine} \\| {'n/a' if t[key] is None else format(t[key] / scale, fmt)}"

        loss = pair("eval_loss", fmt=".3f") if o["eval_loss"] is not None else "n/a"
        marks = "" if q is None else ", ".join(_mark(v) for v in c["targets"].values())
        rows.append(
            f"| {c['tuning']} | {c['seq_len']} | {pair('label_tokens_per_s')} | "
            f"{'' if q is None else format(q['label_tokens_per_s'], '.2f') + 'x'} | "
            f"{pair('cpu_s_per_label_token', 1e-3, '.2f')} | {pair('peak_rss_self_bytes', mb)} | "
            f"{'' if q is None else format(q['peak_rss_self_bytes'], '.2f') + 'x'} | "
            f"{pair('peak_pss_tree_bytes', mb)} | {pair('torch_peak_bytes', mb)} | {loss} | "
            f"{o['pass_label_tokens']:,} | {pair('steps', fmt='.0f')} | {marks} |"
        )
    return "\n".join(rows)


def run_and_report(cfg: SftSpeedConfig) -> int:
    from bench.machine import describe

    def write(report: dict) -> None:
        print(table(report), file=sys.stderr)
        if cfg.json_path is not None:
            cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
            cfg.json_path.write_text(json.dumps(report, indent=1) + "\n")

    report = run_sft_bench(cfg, lambda line: print(line, file=sys.stderr), write)
    print(describe(report["machine"]))
    print(
        f"tokenizer {report['config']['tokenizer']}; one pass per side over the same records, "
        f"{cfg.warmup_steps} warm-up step(s) untimed; {cfg.micro_batch_tokens} tokens per "
        f"micro-batch x {cfg.grad_accum} accumulation; {cfg.repeats} interleaved repeat(s), "
        f"medians; {_threads(cfg)} torch thread(s)"
    )
    if report["trl_skipped"]:
        print(f"TRL side skipped: {report['trl_skipped']}")
    print(table(report))
    print(
        f"targets: label tokens/s >= {TARGET_SPEEDUP:g}x TRL's everywhere; peak RSS <= "
        f"{TARGET_RSS_RATIO:g}x TRL's at rows of {RSS_TARGET_SEQ_LEN}+; eval loss within "
        f"{EVAL_LOSS_TOLERANCE:.0%} of TRL's; the whole run took {report['wall_s'] / 60:.0f} min"
    )
    return 0
