"""Configuration of the `python -m pipeline` subcommands, one dataclass each.

Defaults and help text live here and nowhere else; the CLI flags are generated from these
dataclasses by tyro (pipeline/__main__.py), and validation happens in `__post_init__`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from typing import Annotated

import tyro

from pipeline.errors import ConfigError


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
