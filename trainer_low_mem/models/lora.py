"""LoRA adapters through `peft` (the `lora` extra) as a wrapper around any model kind.

`LoraKind(base, settings)` builds the base model and adds adapters where the base says
(`AdapterHost`): a Hugging Face model is wrapped with `peft.get_peft_model`, which replaces its
linear layers in place, so the trainer keeps calling the same module; the built-in decoder gets
the same layers with `peft.inject_adapter_in_model`. Only the adapters train: frozen weights get
no gradient and no optimizer state, which is what makes LoRA fit a 12 GB card. The peft model is
kept by the kind, per built module, for the adapter-only export; the merged export folds each
adapter into its weight (trainer_low_mem/export.py).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from torch import nn

from lowmem_core.errors import ConfigError
from lowmem_core.hub_kernels import require_extra_offline
from trainer_low_mem import export
from trainer_low_mem.config import LoraSettings
from trainer_low_mem.models.kind import DataFacts, ModelKind

ADAPTER_MARK = "lora_"  # in the name of every LoRA adapter tensor (peft's naming)


def is_adapter(name: str) -> bool:
    """Whether a parameter or tensor name belongs to a LoRA adapter (peft's naming)."""
    return ADAPTER_MARK in name


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


class LoraKind:
    """`base` with LoRA adapters of `settings`; every other question goes to `base`."""

    def __init__(self, base: ModelKind, settings: LoraSettings) -> None:
        self.base, self.settings = base, settings
        self._peft_models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getattr__(self, name: str) -> Any:
        # What LoRA does not change (max_seq_len, check_data, batch_spec, eval_mode, ...).
        return getattr(self.base, name)

    def identity(self, vocab_size: int) -> dict[str, Any]:
        return {**self.base.identity(vocab_size), "lora": self.settings.identity()}

    def with_export_dtype(self, dtype: str) -> LoraKind:
        """This kind, its merged export in `dtype` ("auto": the base's source dtype); an
        adapter-only export keeps the adapters as they trained."""
        return LoraKind(self.base.with_export_dtype(dtype), self.settings)

    def build(self, vocab_size: int, *, document_masking: bool, weights: bool) -> nn.Module:
        module = self.base.build(vocab_size, document_masking=document_masking, weights=weights)
        self.add_adapters(module)
        return module

    def shape(self, vocab_size: int):
        """The base's shape, with the adapters added where it is a built module (a preset's
        shape is its dimensions alone, counted as if every weight trained)."""
        shape = self.base.shape(vocab_size)
        if isinstance(shape, nn.Module):
            self.add_adapters(shape)
        return shape

    def add_adapters(self, module: nn.Module) -> None:
        """Add the adapters to a built base `module` and freeze everything else."""
        peft = require_extra_offline("peft", "lora", "--lora_rank")
        host = self.base.adapter_host(module)
        s = self.settings
        targets = s.target_modules if s.target_modules is not None else host.default_targets
        config = peft.LoraConfig(
            r=s.rank,
            lora_alpha=s.alpha,
            lora_dropout=s.dropout,
            target_modules=list(targets) if targets is not None else "all-linear",
            bias="none",
            task_type=host.task_type,
        )
        try:
            if host.task_type is None:
                peft.inject_adapter_in_model(config, host.module)
            else:
                self._peft_models[module] = peft.get_peft_model(host.module, config)
        except ValueError as exc:
            raise ConfigError(
                f"--lora_target_modules {None if targets is None else list(targets)} do not "
                f"match the model's layers ({str(exc).splitlines()[0]}); name linear layers of "
                "the model"
            ) from None
        for name, param in module.named_parameters():
            param.requires_grad = is_adapter(name)

    def describe(self, module: nn.Module) -> str:
        return f"{self.base.describe(module)}, LoRA rank {self.settings.rank}"

    def export_files(self, module, folder: Path, data: DataFacts, adapter_only: bool) -> None:
        if not adapter_only:
            self.base.export_files(module, folder, data, adapter_only=False)
            return
        peft_model = self._peft_models.get(module)
        if peft_model is None:
            raise ConfigError(
                f"--export_adapter_only writes peft's format, which needs a Hugging Face --model "
                f"({self.base.what} is not one); drop it to export merged weights"
            )
        peft_model.save_pretrained(folder)
        # Only a causal folder kind quantises; the adapters need the same quantised base.
        quantisation = getattr(self.base, "quantisation", None)
        if quantisation is not None:
            export.note_adapter_base(
                folder,
                self.base.folder,
                quantisation.settings,
                str(quantisation.compute_dtype).removeprefix("torch."),
            )
