"""A Hugging Face causal LM folder (Llama, Qwen, GPT-2, ...) as a model kind: rows of tokens,
`HFCausalLM` (trainer_low_mem/hf_model.py) as its module, its linear layers optionally quantised
by bitsandbytes (`Quantisation`: QLoRA's 4-bit NF4, or 8-bit) under LoRA adapters."""

from __future__ import annotations

from typing import Any

import torch

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
from trainer_low_mem.models.quantised_meta import quantise_on_meta, quantised_weights_of

_DTYPE_NAMES = {dtype: name for name, dtype in export.EXPORT_DTYPES.items()}


def _stand_in_settings(quantisation: Quantisation) -> tuple[str, torch.dtype]:
    """(mode, compute dtype) of the planner's stand-ins."""
    return f"{quantisation.bits}bit", quantisation.compute_dtype


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
        return TokenRows.for_dataset(dataset, seq_len, packing, saved_loader_state)

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

    def shape(self, vocab_size: int) -> HFCausalLM:
        """The unquantised module on the meta device; quantised, its `quantised_weights` (the
        planner's `QuantisedWeights`) names the layers bitsandbytes stores quantised."""
        module = super().shape(vocab_size)
        if self.quantisation is not None:
            mode, dtype = _stand_in_settings(self.quantisation)
            module.quantised_weights = quantised_weights_of(module.hf_model, mode, dtype)
        return module

    def load(self, *, weights: bool, document_masking: bool, quantised: bool) -> HFCausalLM:
        if quantised and self.quantisation is not None and not weights:
            # Nothing to quantise on the meta device: stand-ins of the quantised layers' exact
            # sizes and kernels' transients, for the planner's trace.
            module = load_model_folder(
                self.folder,
                from_scratch=True,
                grad_checkpointing=self.grad_checkpointing,
                document_masking=document_masking,
            )
            mode, compute_dtype = _stand_in_settings(self.quantisation)
            # As the quantised load leaves them: the other layers in the compute dtype, and
            # checkpointed blocks fed an input that requires grad.
            module.hf_model.to(compute_dtype)
            if self.grad_checkpointing:
                module.hf_model.enable_input_require_grads()
            quantise_on_meta(module.hf_model, mode, compute_dtype)
            return module
        return load_model_folder(
            self.folder,
            from_scratch=self.from_scratch or not weights,
            grad_checkpointing=self.grad_checkpointing,
            document_masking=document_masking,
            quantisation=self.quantisation if quantised else None,
            dtype=self.base_dtype,
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
