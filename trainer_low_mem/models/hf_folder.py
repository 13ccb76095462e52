"""What every Hugging Face folder kind shares: its config.json read once, the dataset check,
where LoRA goes, `--init_from` names and the export in the folder's own format, dtype and
`use_cache`."""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem_core.errors import ConfigError
from trainer_low_mem import export
from trainer_low_mem.hf_model import folder_weights, has_weights
from trainer_low_mem.models.kind import AdapterHost, DataFacts


class HFFolderKind(ABC):
    """Base of the causal and encoder-decoder kinds; subclasses build the module and say which
    batches it takes."""

    peft_task_type: str  # what peft is told the model is

    def __init__(
        self,
        folder: Path,
        config,
        *,
        from_scratch: bool,
        grad_checkpointing: bool,
        base_dtype: torch.dtype = torch.float32,
    ):
        self.folder = folder
        self.config = config  # transformers' PretrainedConfig, read once by resolve_model_kind
        self.from_scratch = from_scratch
        self.grad_checkpointing = grad_checkpointing
        # What the unquantised weights are loaded and kept in: fp32, or a LoRA run's frozen
        # base in its compute dtype (resolve_model_kind decides).
        self.base_dtype = base_dtype
        self._export_dtype: str | None = None  # None: the source's (`source_dtype`)

    @property
    def what(self) -> str:
        return f"--model {self.folder}"

    @property
    def max_seq_len(self) -> int:
        # A config without a position limit (T5's relative positions, ALiBi) takes any length.
        c = self.config
        limit = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
        return int(limit or 2**31 - 1)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def weight_files(self) -> tuple[Path, ...]:
        return folder_weights(self.folder).files if self.loads_weights else ()

    def shape(self, vocab_size: int) -> nn.Module:
        """The module itself, built on the meta device from its config (unquantised: the
        analytic count reads dimensions and parameter counts only)."""
        with torch.device("meta"):
            return self.load(weights=False, document_masking=False, quantised=False)

    def build(self, vocab_size: int, *, document_masking: bool, weights: bool) -> nn.Module:
        """The folder's model; its vocabulary is its own (check_data refuses larger ones)."""
        return self.load(weights=weights, document_masking=document_masking, quantised=True)

    @abstractmethod
    def load(self, *, weights: bool, document_masking: bool, quantised: bool) -> nn.Module:
        """The wrapped module: from the folder's weights (`weights`, unless --from_scratch) or
        its config; `quantised` applies the kind's quantisation settings."""

    @property
    def loads_weights(self) -> bool:
        return not self.from_scratch and has_weights(self.folder)

    def check_data(self, data: DataFacts) -> None:
        rows = self.vocab_size
        if data.vocab_size > rows:
            raise ConfigError(
                f"dataset {data.path} has a vocabulary of {data.vocab_size} ids but the model's "
                f"embedding has {rows} rows; rebuild the dataset with the model's tokenizer "
                f"(`python -m pipeline build ... --tokenizer MODEL_DIR`)"
            )
        model_eos = self.config.eos_token_id
        eos_ids = model_eos if isinstance(model_eos, list) else [model_eos]
        if model_eos is not None and data.eos_id not in eos_ids:
            raise ConfigError(
                f"dataset {data.path} ends documents with token {data.eos_id} but the model's EOS "
                f"is {model_eos}; rebuild the dataset with the model's tokenizer "
                "(`--tokenizer MODEL_DIR`) or pass --eos-token to the build"
            )

    def identity(self, vocab_size: int) -> dict[str, Any]:
        identity = {"folder_config": self._folder_config(), "lora": None}
        if self.base_dtype != torch.float32:
            # Absent for fp32, so states saved before still match. A resume with another base
            # dtype is refused: its frozen weights, hence its losses, would differ.
            identity["base_dtype"] = str(self.base_dtype).removeprefix("torch.")
        return identity

    def _folder_config(self) -> dict[str, Any] | None:
        """config.json as the folder holds it (None when it cannot be read now)."""
        try:
            return json.loads((self.folder / "config.json").read_text())
        except (OSError, ValueError):
            return None

    @property
    def source_dtype(self) -> str:
        """The dtype the folder's model is stored in: config.json's `dtype` (`torch_dtype`
        before transformers 4.56), else that of most of its safetensors weights, else
        float32. The trainer loads it in `base_dtype` whatever it is."""
        stated = self._folder_config() or {}
        for key in ("dtype", "torch_dtype"):
            if stated.get(key) in export.EXPORT_DTYPES:
                return stated[key]
        return export.weights_dtype(self.folder) or "float32"

    @property
    def export_dtype(self) -> str:
        return self._export_dtype or self.source_dtype

    def with_export_dtype(self, dtype: str) -> HFFolderKind:
        """This kind, exporting in `dtype` ("auto": the source's)."""
        kind = copy.copy(self)
        kind._export_dtype = None if dtype == "auto" else dtype
        return kind

    def _source(self) -> str:
        return "its weights" if self.loads_weights else "random init from its config"

    def adapter_host(self, module: nn.Module) -> AdapterHost:
        return AdapterHost(module.hf_model, self.peft_task_type, default_targets=None)

    def init_target(self, module, tensors, from_export):
        return (module.hf_model if from_export else module), tensors

    def export_files(self, module, folder: Path, data: DataFacts, adapter_only: bool) -> None:
        # The trainer turns the cache off for training; the export gets the source's setting.
        use_cache = getattr(self.config, "use_cache", None)
        export.write_hf_weights(module.hf_model, folder, self.export_dtype, use_cache)
        tokenizer = self.folder if export.has_tokenizer_files(self.folder) else data.tokenizer_dir
        if tokenizer is not None:
            export.copy_tokenizer(tokenizer, folder)
