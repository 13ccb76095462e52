"""The interface every model family implements: `ModelKind`, and what it is told of the data.

A kind is resolved once from the job's ModelConfig (trainer_low_mem/models/__init__.py) and
answers everything that differs between families, so the job builder, the trainer, the planner's
inputs and the export ask it instead of testing a module's type or attribute names. It reads
config.json (or the preset) only; weights are read when `build(weights=True)` is called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from pipeline.batch_spec import BatchSpec
from trainer_low_mem.export import dataset_tokenizer_folder
from trainer_low_mem.planner.model_memory import ModelShape


@dataclass(frozen=True)
class DataFacts:
    """What a model kind and the planner need to know of the training dataset."""

    path: Path
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    is_sft: bool  # prompt/response samples: loss on the response, attention within samples
    token_bytes: int
    index_bytes: int | None  # the node-shared epoch index, when the dataset has one
    tokenizer_dir: Path | None  # the tokenizer the dataset was built with, when it still exists
    tokenizer_id: str | None = None  # which tokenizer made the ids (index.json's); None: unknown

    @classmethod
    def of(cls, path: Path, dataset) -> DataFacts:
        return cls(
            tokenizer_dir=dataset_tokenizer_folder(path),
            path=Path(path),
            vocab_size=dataset.vocab_size,
            bos_id=dataset.bos_id,
            eos_id=dataset.eos_id,
            pad_id=dataset.pad_id,
            is_sft=dataset.prompt_lengths is not None,
            token_bytes=dataset.token_bytes,
            index_bytes=dataset.shared_index_bytes,
            tokenizer_id=dataset.tokenizer_id,
        )

    @property
    def special_ids(self) -> dict[str, int | None]:
        return {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}


@dataclass(frozen=True)
class AdapterHost:
    """Where LoRA adapters go in a built model: the module peft wraps, the peft task (None:
    adapters injected in place, no peft model), and the default target layers (None: every
    linear layer but the output head)."""

    module: nn.Module
    task_type: str | None
    default_targets: tuple[str, ...] | None


class ModelKind(Protocol):
    """One model family (built-in preset, Hugging Face causal LM, Hugging Face encoder-decoder),
    or a wrapper around one (LoRA)."""

    @property
    def what(self) -> str:
        """How the user named the model, for messages: "--model DIR" or "preset 'tiny'"."""
        ...

    @property
    def max_seq_len(self) -> int:
        """The longest row the model takes (from config.json or the preset)."""
        ...

    @property
    def vocab_size(self) -> int:
        """The model's own vocabulary (a preset's default; a folder's embedding rows)."""
        ...

    def weight_files(self) -> tuple[Path, ...]:
        """The files `build(weights=True)` reads weights from (none for a preset or a build from
        the config alone)."""
        ...

    def shape(self, vocab_size: int) -> ModelShape:
        """Dimensions and parameter counts for the planner's analytic count, LoRA included
        where the kind can count it; reads no weights."""
        ...

    def check_data(self, data: DataFacts) -> None:
        """Refuse, in one line, a dataset this model cannot train on (ids beyond its embedding,
        another EOS, plain text for a model that needs pairs)."""
        ...

    def batch_spec(
        self, dataset, seq_len: int, packing: bool, saved_loader_state: dict[str, Any] | None
    ) -> BatchSpec:
        """The batches the model takes from `dataset`; a resumed run passes its saved loader
        state so the layout it was saved with is kept."""
        ...

    def identity(self, vocab_size: int) -> dict[str, Any]:
        """What resume compares (a state is never loaded into another model) and what keys the
        planner's trace cache; JSON-ready."""
        ...

    def build(self, vocab_size: int, *, document_masking: bool, weights: bool) -> nn.Module:
        """The model with the trainer's forward contract (trainer_low_mem/model.py). `weights`
        loads the folder's weights (unless --from_scratch); False builds from the config alone,
        which under `torch.device("meta")` allocates nothing (the planner's trace)."""
        ...

    def describe(self, module: nn.Module) -> str:
        """One line for the start-up log: which model, from which weights, how its loss runs."""
        ...

    def adapter_host(self, module: nn.Module) -> AdapterHost:
        """Where LoRA adapters go in `module` (see AdapterHost)."""
        ...

    def init_target(
        self, module: nn.Module, tensors: dict, from_export: bool
    ) -> tuple[nn.Module, dict]:
        """The submodule `--init_from` tensors load into, and the tensors under its names:
        an export names tensors as transformers does, a training state as `module` does."""
        ...

    @property
    def export_dtype(self) -> str:
        """The dtype the export writes weights in: "float32", "bfloat16" or "float16"."""
        ...

    def with_export_dtype(self, dtype: str) -> ModelKind:
        """This kind exporting in `dtype` (--export_dtype; "auto": the source's)."""
        ...

    def export_files(
        self, module: nn.Module, folder: Path, data: DataFacts, adapter_only: bool
    ) -> None:
        """Write `module` (weights, config and tokenizer) into `folder` as transformers loads
        it."""
        ...

    def eval_mode(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """Attention kept within documents while evaluating, whatever the training setting."""
        ...


@contextlib.contextmanager
def document_masking_on(module: nn.Module) -> Iterator[None]:
    """Turn a decoder's `document_masking` on for the block, then restore it."""
    had = module.document_masking
    module.document_masking = True
    try:
        yield
    finally:
        module.document_masking = had
