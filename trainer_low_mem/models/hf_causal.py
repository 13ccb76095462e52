"""A Hugging Face causal LM folder (Llama, Qwen, GPT-2, ...) as a model kind: rows of tokens,
`HFCausalLM` (trainer_low_mem/hf_model.py) as its module, its linear layers optionally quantised
by bitsandbytes (`Quantisation`: QLoRA's 4-bit NF4, or 8-bit) under LoRA adapters."""

from __future__ import annotations

from typing import Any

from lowmem_core.errors import ConfigError
from pipeline.batch_spec import TokenRows
from trainer_low_mem import export
from trainer_low_mem.hf_model import (
    HFCausalLM,
    Quantisation,
    check_lora_targets,
    load_model_folder,
)
from trainer_low_mem.models.hf_folder import HFFolderKind
from trainer_low_mem.models.kind import AdapterHost, document_masking_on

_DTYPE_NAMES = {dtype: name for name, dtype in export.EXPORT_DTYPES.items()}


class HFCausalKind(HFFolderKind):
    peft_task_type = "CAUSAL_LM"

    def __init__(
        self,
        folder,
        config,
        *,
        quantisation: Quantisation | None = None,
        lora_targets: tuple[str, ...] | None = None,
        **settings,
    ) -> None:
        super().__init__(folder, config, **settings)
        self.quantisation = quantisation
        self.lora_targets = lora_targets  # the layers --lora_target_modules names, if any

    def batch_spec(self, dataset, seq_len, packing, saved_loader_state) -> TokenRows:
        return TokenRows(seq_len, packing)

    def identity(self, vocab_size: int) -> dict[str, Any]:
        identity = super().identity(vocab_size)
        if self.quantisation is not None:  # absent otherwise: states saved before still match
            identity["quantisation"] = self.quantisation.settings
        return identity

    @property
    def export_dtype(self) -> str:
        """--export_dtype; by default the source's, or a quantised model's compute dtype (the
        dtype it trained in; its source weights were never used as they are)."""
        if self._export_dtype is None and self.quantisation is not None:
            return _DTYPE_NAMES[self.quantisation.compute_dtype]
        return super().export_dtype

    def load(self, *, weights: bool, document_masking: bool, quantised: bool) -> HFCausalLM:
        if quantised and self.quantisation is not None and not weights:
            raise ConfigError(
                "4-bit (QLoRA) weights are quantised from real weights, which a build without "
                "them does not have; the plan counts them analytically"
            )
        return load_model_folder(
            self.folder,
            from_scratch=self.from_scratch or not weights,
            grad_checkpointing=self.grad_checkpointing,
            document_masking=document_masking,
            quantisation=self.quantisation if quantised else None,
        )

    def adapter_host(self, module: HFCausalLM) -> AdapterHost:
        check_lora_targets(module.hf_model, self.lora_targets, self.what)
        return super().adapter_host(module)

    def describe(self, module: HFCausalLM) -> str:
        stored = ""
        if self.quantisation is not None:
            q = self.quantisation
            compute = _DTYPE_NAMES[q.compute_dtype]
            stored = f", {'4-bit NF4' if q.bits == 4 else '8-bit'} weights computed in {compute}"
        return (
            f"{self.folder} ({self.config.model_type}, {self._source()}{stored}; "
            f"loss: {module.loss_path_reason})"
        )

    def eval_mode(self, module: HFCausalLM):
        return document_masking_on(module)
