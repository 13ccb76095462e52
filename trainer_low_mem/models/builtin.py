"""The built-in decoder (`DecoderLM`, trainer_low_mem/model.py) as a model kind: a preset sized
to the dataset's vocabulary, exported as a `LlamaForCausalLM` (float32 unless asked)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.batch_spec import TokenRows
from trainer_low_mem import export
from trainer_low_mem.model import DecoderLM, ModelPreset, build_model, resolve_preset
from trainer_low_mem.models.kind import AdapterHost, DataFacts, document_masking_on

# The built-in model's linear layers (attention qkv and output, the SwiGLU MLP), not the head.
ADAPTER_TARGETS = ("qkv", "proj", "gate", "up")


class PresetKind:
    """A built-in preset (`--model_preset NAME`)."""

    source_dtype = "float32"  # the built-in model is built and trained in float32

    def __init__(self, name: str, grad_checkpointing: bool) -> None:
        self.name = name
        self.preset = resolve_preset(name)  # an unknown name is refused here, before any work
        self.grad_checkpointing = grad_checkpointing
        self.export_dtype = self.source_dtype

    def with_export_dtype(self, dtype: str) -> PresetKind:
        """This kind, exporting in `dtype` ("auto": float32)."""
        kind = copy.copy(self)
        kind.export_dtype = self.source_dtype if dtype == "auto" else dtype
        return kind

    @property
    def what(self) -> str:
        return f"preset {self.name!r}"

    @property
    def max_seq_len(self) -> int:
        return self.preset.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.preset.vocab_size

    def weight_files(self) -> tuple[Path, ...]:
        return ()  # initialised from the seed

    def shape(self, vocab_size: int) -> ModelPreset:
        return self.preset.with_vocab(vocab_size)

    def check_data(self, data: DataFacts) -> None:
        """A preset takes its vocabulary from the dataset, so every dataset fits."""

    def batch_spec(self, dataset, seq_len, packing, saved_loader_state) -> TokenRows:
        return TokenRows.for_dataset(dataset, seq_len, packing, saved_loader_state)

    def identity(self, vocab_size: int) -> dict[str, Any]:
        return {"preset": self.name, **self.shape(vocab_size).__dict__, "lora": None}

    def build(self, vocab_size: int, *, document_masking: bool, weights: bool) -> DecoderLM:
        return build_model(
            self.shape(vocab_size),
            grad_checkpointing=self.grad_checkpointing,
            document_masking=document_masking,
        )

    def describe(self, module: nn.Module) -> str:
        return f"built-in preset {self.name} (vocabulary {module.preset.vocab_size})"

    def adapter_host(self, module: nn.Module) -> AdapterHost:
        return AdapterHost(module, task_type=None, default_targets=ADAPTER_TARGETS)

    def init_target(self, module, tensors, from_export):
        if from_export:
            return module, export.llama_state_dict_to_decoder(tensors, module)
        return module, tensors

    def export_files(self, module, folder: Path, data: DataFacts, adapter_only: bool) -> None:
        export.write_llama_weights(module, folder, data.special_ids, self.export_dtype)
        if data.tokenizer_dir is not None:
            export.copy_tokenizer(data.tokenizer_dir, folder)
        else:
            export.byte_tokenizer_folder(folder)

    def eval_mode(self, module: nn.Module):
        return document_masking_on(module)
