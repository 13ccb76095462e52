"""Configuration of the `python -m pipeline` subcommands, one dataclass each.

Defaults and help text live here and nowhere else; the CLI flags are generated from these
dataclasses by tyro (pipeline/__main__.py), and validation happens in `__post_init__`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from typing import Annotated

import tyro

from lowmem_core.errors import ConfigError


@dataclass
class BuildConfig:
    """Tokenise text/JSONL/Parquet/`datasets` inputs into a memory-mappable Arrow token dataset."""

    inputs: Annotated[list[Path], tyro.conf.Positional] = field(default_factory=list)
    """Input files or folders: .txt, .jsonl, .parquet, or a `datasets` save_to_disk folder."""
    out: Path = Path("data/tokens")
    """Output dataset folder (written atomically: a temp folder renamed when complete)."""
    tokenizer: str = "byte"
    """`byte` for the built-in byte tokenizer, or a path to a `tokenizers` tokenizer.json."""
    text_field: str = "text"
    """Field holding the text in JSONL/Parquet/`datasets` inputs (a list-of-ints field is taken as token ids)."""
    one_doc_per_line: bool = False
    """For .txt inputs: one document per line instead of per blank-line-separated block."""
    num_proc: int = 1
    """Tokeniser threads (the `tokenizers` and Arrow encoders release the GIL)."""
    max_shard_tokens: int = 1 << 30
    """Tokens per Arrow shard file; a new shard starts past this many."""
    overwrite: bool = False
    """Replace an existing dataset at --out (the old one is removed only after the new one is complete)."""

    def __post_init__(self) -> None:
        if self.num_proc < 1:
            raise ConfigError(f"--num-proc must be >= 1, got {self.num_proc}")
        if self.max_shard_tokens < 1:
            raise ConfigError(f"--max-shard-tokens must be >= 1, got {self.max_shard_tokens}")


@dataclass
class DemoConfig:
    """The quick-start demo: generate the sample corpus, build it, stream it, report throughput."""

    workdir: Path = Path(".demo")
    """Folder for the generated corpus, the built dataset and the reports."""
    seq_len: int = 512
    """Tokens per row."""
    batch_size: int = 16
    """Rows per batch."""


@dataclass
class PlanConfig:
    """Size a run: micro-batch, accumulation, readers, prefetch and memory, each with its reason."""

    model_preset: str = "small"
    """Model preset of trainer_low_mem/model.py (tiny, small, medium, large)."""
    seq_len: int = 512
    """Tokens per row."""
    global_batch: int = 384
    """Sequences per optimizer step over all ranks; kept fixed (micro x accumulation x world size)."""
    world_size: int = 1
    """Training processes (one per GPU) over all nodes."""
    ranks_per_node: int | None = None
    """Processes sharing this host's RAM (default: min(world size, visible GPUs), or world size without GPUs)."""
    gpu_budget_gb: float | None = None
    """Memory each rank may use on its GPU, in GiB (default: least free memory over the visible GPUs)."""
    host_ram_limit_gb: float | None = None
    """Host RAM the run may use, in GiB (capped by the cgroup limit and the machine's RAM; a safety margin is kept)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain DDP), 1 (optimizer states partitioned) or 2 (plus gradients)."""
    offload_optimizer: bool = False
    """ZeRO CPU offload: fp32 master weights and Adam states live in host RAM (needs --zero-stage 1 or 2)."""
    precision: str = "bf16"
    """Training precision of weights and activations on the device: bf16, fp16 or fp32."""
    grad_checkpointing: bool = False
    """Recompute each layer in backward instead of keeping its activations."""
    micro_batch_per_gpu: int | None = None
    """Force the micro-batch (must divide global batch / world size); default: the largest that fits."""
    vocab_size: int | None = None
    """Replace the preset's vocabulary size (e.g. 259 for the byte tokenizer)."""
    num_cores: int | None = None
    """CPU cores of the host (default: this process's affinity, capped by the cgroup cpu.max)."""
    dataset: Path | None = None
    """A built dataset folder: its size decides between memory-mapped and ultra-low-mem reading."""
    json: bool = False
    """Print the plan as JSON instead of a table."""

    def __post_init__(self) -> None:
        for name in ("seq_len", "global_batch", "world_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("gpu_budget_gb", "host_ram_limit_gb"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"--precision must be bf16, fp16 or fp32, got {self.precision!r}")
