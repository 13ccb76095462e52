"""Configuration of the `python -m pipeline` subcommands, one dataclass each.

Defaults and help text live here and nowhere else; the CLI flags are generated from these
dataclasses by tyro (pipeline/__main__.py), and validation happens in `__post_init__`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from lowmem_core.errors import ConfigError


@dataclass
class BuildConfig:
    """Tokenise text/JSONL/Parquet/`datasets` inputs into a memory-mappable Arrow token dataset."""

    inputs: Annotated[list[Path], tyro.conf.Positional] = field(default_factory=list)
    """Input files, globs (quoted: 'data/*.jsonl.gz') or folders: .txt, .jsonl, .json (JSON Lines
    or an array of records), .parquet, a folder of .parquet shards, or a `datasets` save_to_disk
    folder. Text and JSON may be compressed: .gz, .bz2, .zst."""
    out: Path = Path("data/tokens")
    """Output dataset folder (written atomically: a temp folder renamed when complete)."""
    tokenizer: str = "byte"
    """`byte` for the built-in byte tokenizer, a `tokenizers` tokenizer.json, or a Hugging Face
    model/tokenizer folder holding one (BOS/EOS/PAD from its tokenizer_config.json)."""
    eos_token: str | None = None
    """End-of-text token put between documents (default: the tokenizer's own eos_token)."""
    text_field: str = "text"
    """Field holding the text in JSON/Parquet/`datasets` inputs (a list-of-ints field is taken as
    token ids)."""
    sft: bool = False
    """Prompt/response records: each record becomes one document (prompt tokens, then response
    tokens) plus its prompt length, so training puts loss on the response only."""
    prompt_field: str = "prompt"
    """With --sft: the field holding the prompt text (may be empty)."""
    response_field: str = "response"
    """With --sft: the field holding the response text."""
    messages_field: str = "messages"
    """With --sft: the field holding a chat ([{role, content}, ...], the last one the
    assistant's), rendered with the --tokenizer folder's chat template instead of the two above."""
    train_on_turns: Literal["all", "last"] = "all"
    """With --sft, for records with messages: put loss on every assistant turn (its text and the
    end-of-turn token the template writes after it), or on the last one only. System, user and
    tool messages are never trained."""
    chat_template_kwargs: str | None = None
    """With --sft: a JSON object of keyword arguments for the chat template, such as
    '{"enable_thinking": false}'; each must be a variable the template reads. Recorded in
    index.json."""
    max_sample_tokens: int | None = None
    """With --sft: samples longer than this (tokens + the EOS the loader adds; usually the
    trainer's --max_seq_len) are handled by --long-samples; default: no limit."""
    long_samples: Literal["keep", "truncate", "drop"] = "keep"
    """With --max-sample-tokens: keep a longer sample whole (packing continues it across rows),
    truncate its response to fit, or drop it; each is counted in the build's report."""
    split: Literal["blank_lines", "lines"] = "blank_lines"
    """.txt documents: blocks separated by blank lines, or one document per line."""
    one_doc_per_line: bool = False
    """Same as --split lines."""
    strip: bool = False
    """Trim Unicode whitespace at both ends of each document (default: keep text exactly as
    written)."""
    num_proc: int | None = None
    """Threads tokenising chunks of the inputs in parallel, one core each (the tokenizers release
    the GIL); default: the cores this process may use."""
    fast_bpe: bool = True
    """With a byte-level BPE tokenizer.json: encode with tiktoken, about 4x faster, every
    document whose ids it provably gives as the tokenizer would (pipeline/fast_bpe.py says when;
    checked as the build starts). --no-fast-bpe encodes every document with `tokenizers`."""
    max_shard_tokens: int = 1 << 30
    """Tokens per Arrow shard file; a new shard starts past this many."""
    overwrite: bool = False
    """Replace --out if it is a dataset built by this command (removed only after the new one is
    complete)."""

    def __post_init__(self) -> None:
        if self.num_proc is None:
            self.num_proc = len(os.sched_getaffinity(0))
        if self.num_proc < 1:
            raise ConfigError(f"--num-proc must be >= 1, got {self.num_proc}")
        if self.max_shard_tokens < 1:
            raise ConfigError(f"--max-shard-tokens must be >= 1, got {self.max_shard_tokens}")
        if self.one_doc_per_line:
            self.split = "lines"
        if self.eos_token == "":
            raise ConfigError("--eos-token must name a token, got an empty string")
        if self.sft and (self.strip or self.text_field != "text"):
            flag = "--strip" if self.strip else "--text-field"
            raise ConfigError(
                f"{flag} applies to text builds; with --sft records are kept as written and "
                f"named with --prompt-field/--response-field/--messages-field: drop {flag}"
            )
        if self.max_sample_tokens is not None and (not self.sft or self.max_sample_tokens < 2):
            raise ConfigError(
                f"--max-sample-tokens {self.max_sample_tokens}: needs --sft and at least 2 tokens "
                "(one response token and the EOS); add --sft or raise it"
            )
        if self.long_samples != "keep" and self.max_sample_tokens is None:
            raise ConfigError(
                f"--long-samples {self.long_samples} needs --max-sample-tokens N (the longest "
                "sample to keep whole, usually the trainer's --max_seq_len)"
            )
        if not self.sft and (self.train_on_turns != "all" or self.chat_template_kwargs):
            raise ConfigError(
                "--train-on-turns and --chat-template-kwargs apply to chat records; add --sft"
            )
        self.template_kwargs()  # a bad JSON object fails here, before any work
        fields = (self.prompt_field, self.response_field, self.messages_field)
        if not self.sft and fields != ("prompt", "response", "messages"):
            raise ConfigError(
                "--prompt-field/--response-field/--messages-field apply to prompt/response "
                "builds; add --sft, or name the text field with --text-field"
            )

    def template_kwargs(self) -> dict:
        """--chat-template-kwargs as a dict ({} when not given)."""
        if self.chat_template_kwargs is None:
            return {}
        try:
            kwargs = json.loads(self.chat_template_kwargs)
        except json.JSONDecodeError as exc:
            kwargs = exc
        if not isinstance(kwargs, dict):
            raise ConfigError(
                f"--chat-template-kwargs {self.chat_template_kwargs!r} is not a JSON object; "
                """write one such as '{"enable_thinking": false}'"""
            )
        return kwargs


@dataclass
class TokenizeDistributedConfig:
    """Tokenise inputs on a Ray cluster into Parquet token shards, one per input file; then
    `python -m pipeline build OUT --text-field input_ids --tokenizer SAME` makes the dataset."""

    inputs: Annotated[list[Path], tyro.conf.Positional] = field(default_factory=list)
    """Input files, globs or folders, as for `build` (.jsonl, .json, .parquet, .txt, optionally
    .gz/.bz2/.zst); every Ray node must see them at the same paths (a shared filesystem)."""
    out: Path = Path("data/token-shards")
    """Folder for the Parquet shards (must be new or empty; every node must be able to write
    it). Filled atomically: a temp folder beside it is renamed when every shard is written."""
    tokenizer: str = "byte"
    """`byte`, a `tokenizers` tokenizer.json, or a Hugging Face model/tokenizer folder (as for
    `build`); loaded here and sent to the workers."""
    eos_token: str | None = None
    """End-of-text token (default: the tokenizer's own eos_token); pass the same to `build`."""
    text_field: str = "text"
    """Field holding the text in JSON/Parquet/`datasets` inputs."""
    split: Literal["blank_lines", "lines"] = "blank_lines"
    """.txt documents: blocks separated by blank lines, or one document per line."""
    strip: bool = False
    """Trim Unicode whitespace at both ends of each document."""
    fast_bpe: bool = True
    """As for `build`: tiktoken for the documents where its ids provably equal the tokenizer's."""
    address: str | None = None
    """Ray cluster to run on: `auto` (the cluster this machine belongs to), `ray://HOST:10001`
    (Ray Client); default: a Ray started on this machine for this command."""
    num_workers: int | None = None
    """Ray actors tokenising at once, one input file and one CPU each (default: the cluster's
    CPUs, at most one per input file)."""

    def __post_init__(self) -> None:
        if self.num_workers is not None and self.num_workers < 1:
            raise ConfigError(f"--num-workers must be >= 1, got {self.num_workers}")
        if self.eos_token == "":
            raise ConfigError("--eos-token must name a token, got an empty string")
        if self.address == "":
            raise ConfigError("--address must name a cluster (`auto`, ray://HOST:PORT)")


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
class ShowConfig:
    """Print stored samples decoded with the dataset's tokenizer, their labelled spans marked."""

    dataset: Annotated[Path, tyro.conf.Positional] = Path("data/tokens")
    """Dataset folder built by `python -m pipeline build` (or a `datasets` save_to_disk folder)."""
    sample: int = 0
    """Number of the first document (sample) to print, from 0."""
    count: int = 1
    """How many documents to print, from --sample on."""
    tokenizer: str | None = None
    """Decode with this tokenizer (`byte`, a tokenizer.json or a model folder) instead of the one
    index.json records, for a dataset whose tokenizer has moved."""

    def __post_init__(self) -> None:
        if self.sample < 0:
            raise ConfigError(f"--sample must be >= 0 (the first sample is 0), got {self.sample}")
        if self.count < 1:
            raise ConfigError(f"--count must be >= 1, got {self.count}")
