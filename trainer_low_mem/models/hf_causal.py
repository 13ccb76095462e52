"""A Hugging Face causal LM folder (Llama, Qwen, GPT-2, ...) as a model kind: rows of tokens,
`HFCausalLM` (trainer_low_mem/hf_model.py) as its module."""

from __future__ import annotations

from lowmem_core.errors import ConfigError
from pipeline.batch_spec import TokenRows
from trainer_low_mem.hf_model import HFCausalLM, check_lora_targets, load_model_folder
from trainer_low_mem.models.hf_folder import HFFolderKind
from trainer_low_mem.models.kind import AdapterHost, document_masking_on


class HFCausalKind(HFFolderKind):
    peft_task_type = "CAUSAL_LM"

    def __init__(
        self,
        folder,
        config,
        *,
        load_in_4bit: bool = False,
        lora_targets: tuple[str, ...] | None = None,
        **settings,
    ) -> None:
        super().__init__(folder, config, **settings)
        self.load_in_4bit = load_in_4bit
        self.lora_targets = lora_targets  # the layers --lora_target_modules names, if any

    def batch_spec(self, dataset, seq_len, packing, saved_loader_state) -> TokenRows:
        return TokenRows(seq_len, packing)

    def load(self, *, weights: bool, document_masking: bool, quantised: bool) -> HFCausalLM:
        if quantised and self.load_in_4bit and not weights:
            raise ConfigError(
                "4-bit (QLoRA) weights are quantised from real weights, which a build without "
                "them does not have; the plan counts them analytically"
            )
        return load_model_folder(
            self.folder,
            from_scratch=self.from_scratch or not weights,
            grad_checkpointing=self.grad_checkpointing,
            document_masking=document_masking,
            load_in_4bit=quantised and self.load_in_4bit,
        )

    def adapter_host(self, module: HFCausalLM) -> AdapterHost:
        check_lora_targets(module.hf_model, self.lora_targets, self.what)
        return super().adapter_host(module)

    def describe(self, module: HFCausalLM) -> str:
        return (
            f"{self.folder} ({self.config.model_type}, {self._source()}; "
            f"loss: {module.loss_path_reason})"
        )

    def eval_mode(self, module: HFCausalLM):
        return document_masking_on(module)
