"""`bench load`: the host RAM of 1..N processes loading one Hugging Face folder at once, the way
the trainer loads it, against the planner's load term (trainer_low_mem/planner/load_memory.py).

It writes a Qwen-style bf16 model with `save_pretrained` (safetensors), starts the processes,
lets them load together, and samples every process's smaps_rollup while they do: the peak of
each one's anonymous (private) memory above what it held before loading, and the node's peak
PSS (shared file pages divided among the processes mapping them). "trainer" is
`load_model_folder` (fp32, as the trainer keeps it for full fine-tuning); "trainer-lora-bf16" is
the trainer's own LoRA build under --mixed_precision bf16 (the frozen base in bf16, rank-16 fp32
adapters: `resolve_model_kind(...).build`), every weight then read once, as a first forward
would; "stored-dtype" is the lower bound of a frozen base kept in the folder's dtype:
`from_pretrained(dtype="auto")`, every weight read once.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lowmem_core.memory import format_bytes
from trainer_low_mem.planner.load_memory import load_private_bytes

GiB = 1 << 30
SAMPLE_INTERVAL_S = 0.05
LOADERS = ("trainer", "trainer-lora-bf16", "stored-dtype")
LORA_RANK = 16


@dataclass(frozen=True)
class ModelSize:
    """A Qwen3-style decoder, untied, its weights stored in bf16."""

    hidden: int = 2048
    layers: int = 20
    heads: int = 16
    kv_heads: int = 8
    intermediate: int = 6144
    vocab: int = 32000


@dataclass(frozen=True)
class LoadReading:
    """One run of `processes` loaders: peaks above each process's pre-load reading."""

    loader: str
    processes: int
    param_count: int
    stored_bytes: int  # the safetensors file
    peak_private_bytes: int  # the largest process's peak anonymous memory above its baseline
    peak_node_pss_bytes: int  # the processes' PSS summed, at its peak, above their baselines
    seconds: float
    mapped_count: int = 0  # parameters the loader keeps in the stored bf16 (a LoRA base)

    @property
    def planned_private_bytes(self) -> int:
        return load_private_bytes(self.param_count, self.mapped_count)

    @property
    def private_ratio(self) -> float:
        """Measured over planned private bytes per process."""
        return self.peak_private_bytes / self.planned_private_bytes

    def row(self) -> str:
        per_param = self.peak_private_bytes / self.param_count
        return (
            f"{self.loader:<18} {self.processes:>2} proc  private/proc "
            f"{format_bytes(self.peak_private_bytes):>9} ({per_param:.2f} B/param; planned "
            f"{format_bytes(self.planned_private_bytes)}, x{self.private_ratio:.2f})  node PSS "
            f"{format_bytes(self.peak_node_pss_bytes):>9}  {self.seconds:.1f} s"
        )


def write_model(folder: Path, size: ModelSize) -> int:
    """Save a randomly initialised bf16 model of `size` into `folder`; its parameter count."""
    import torch
    import transformers

    config = transformers.Qwen3Config(
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.hidden // size.heads,
        intermediate_size=size.intermediate,
        vocab_size=size.vocab,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes: Pss, Anonymous, Rss, ..."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0]) * 1024
    return fields


def lora_kind(folder: str):
    """The trainer's model kind of a rank-16 LoRA run under --mixed_precision bf16."""
    from trainer_low_mem.config import ModelConfig
    from trainer_low_mem.models import resolve_model_kind

    return resolve_model_kind(ModelConfig(model=Path(folder), lora_rank=LORA_RANK), "bf16")


def lora_counts(folder: Path) -> tuple[int, int]:
    """(all parameters, those kept in bf16) of the trainer's LoRA build of `folder`, built on
    the meta device (no memory)."""
    import torch

    kind = lora_kind(str(folder))
    with torch.device("meta"):
        module = kind.build(kind.vocab_size, document_masking=True, weights=False)
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.element_size() == 2)


def _load(folder: str, loader: str, ready, go, loaded, release) -> None:
    """One loading process: import, say ready, load on `go`, hold the model until `release`."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers

    from trainer_low_mem.hf_model import load_model_folder

    kind = lora_kind(folder) if loader == "trainer-lora-bf16" else None
    ready.set()
    go.wait()
    if loader == "trainer":
        model = load_model_folder(folder)
    else:
        if kind is not None:
            model = kind.build(kind.vocab_size, document_masking=True, weights=True)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
        with torch.no_grad():
            for param in model.parameters():
                param.sum()
    loaded.set()
    release.wait()
    del model


def _check_alive(procs, loader: str) -> None:
    if any(p.exitcode is not None for p in procs):
        raise RuntimeError(f"a {loader} loader exited before loading; run it alone to see why")


def measure(folder: Path, loader: str, processes: int, param_count: int) -> LoadReading:
    """Start `processes` loaders, release them together and sample them until all have loaded."""
    mapped = 0
    if loader == "trainer-lora-bf16":
        param_count, mapped = lora_counts(folder)
    ctx = mp.get_context("spawn")
    go, release = ctx.Event(), ctx.Event()
    readies = [ctx.Event() for _ in range(processes)]
    loadeds = [ctx.Event() for _ in range(processes)]
    procs = [
        ctx.Process(target=_load, args=(str(folder), loader, readies[i], go, loadeds[i], release))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        while not all(e.is_set() for e in readies):
            _check_alive(procs, loader)
            time.sleep(SAMPLE_INTERVAL_S)
        time.sleep(0.5)  # imports settle
        base = [rollup(p.pid) for p in procs]
        peak_private = [0] * processes
        peak_pss = 0
        start = time.perf_counter()
        go.set()
        while True:
            done = all(e.is_set() for e in loadeds)
            now = [rollup(p.pid) for p in procs]
            for i, (b, n) in enumerate(zip(base, now, strict=True)):
                peak_private[i] = max(peak_private[i], n["Anonymous"] - b["Anonymous"])
            peak_pss = max(
                peak_pss, sum(n["Pss"] - b["Pss"] for b, n in zip(base, now, strict=True))
            )
            if done:
                break
            _check_alive(procs, loader)
            time.sleep(SAMPLE_INTERVAL_S)
        seconds = time.perf_counter() - start
    finally:
        release.set()
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return LoadReading(
        loader=loader,
        processes=processes,
        param_count=param_count,
        stored_bytes=(folder / "model.safetensors").stat().st_size,
        peak_private_bytes=max(peak_private),
        peak_node_pss_bytes=peak_pss,
        seconds=seconds,
        mapped_count=mapped,
    )


def run_load_bench(
    size: ModelSize,
    process_counts: tuple[int, ...],
    loaders: tuple[str, ...] = LOADERS,
    workdir: Path | None = None,
) -> list[LoadReading]:
    """Write the model into a temporary folder, measure each loader at each process count,
    print one row per run and delete the folder."""
    folder = Path(tempfile.mkdtemp(prefix="lowmem-load-", dir=workdir))
    try:
        params = write_model(folder, size)
        stored = (folder / "model.safetensors").stat().st_size
        print(f"model: {params / 1e9:.3f}B parameters, {format_bytes(stored)} bf16 safetensors")
        readings = []
        for loader in loaders:
            for n in process_counts:
                reading = measure(folder, loader, n, params)
                print(reading.row(), flush=True)
                readings.append(reading)
        return readings
    finally:
        shutil.rmtree(folder, ignore_errors=True)
