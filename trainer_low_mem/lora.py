"""LoRA adapters through `peft` (the `lora` extra): only the adapters train.

A Hugging Face model is wrapped with `peft.get_peft_model`, which replaces its linear layers in
place, so the trainer keeps calling the same `HFCausalLM`; the `PeftModel` is kept beside it for
`save_pretrained` (adapter-only export) and `merge_and_unload` (merged export). The built-in
`DecoderLM` gets the same LoRA layers with `peft.inject_adapter_in_model`. Frozen weights get no
gradient and no optimizer state, which is what makes LoRA fit a 12 GB card.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowmem_core.errors import ConfigError, require_extra

# The built-in model's linear layers (attention qkv and output, the SwiGLU MLP), not the head.
BUILTIN_TARGETS = ["qkv", "proj", "gate", "up"]


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: list[str] | None  # None: every linear layer but the output head


def _peft():
    return require_extra("peft", "lora", "--lora_rank")


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Add LoRA adapters to `model` in place and freeze everything else; returns `model`."""
    peft = _peft()
    hf_model = getattr(model, "hf_model", None)
    targets = settings.target_modules
    if hf_model is None and targets is None:
        targets = BUILTIN_TARGETS
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets if targets is not None else "all-linear",
        bias="none",
        # A wrapped Hugging Face model names its peft task (encoder-decoders: SEQ_2_SEQ_LM).
        task_type=getattr(model, "peft_task_type", "CAUSAL_LM") if hf_model is not None else None,
    )
    try:
        if hf_model is not None:
            # Stored outside the module tree so its parameters are not registered twice.
            object.__setattr__(model, "peft_model", peft.get_peft_model(hf_model, config))
        else:
            peft.inject_adapter_in_model(config, model)
    except ValueError as exc:
        raise ConfigError(
            f"--lora_target_modules {targets} do not match the model's layers "
            f"({str(exc).splitlines()[0]}); name linear layers of the model"
        ) from None
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    return model


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back; returns `model`."""
    peft = _peft()
    tuner_layer = peft.tuners.tuners_utils.BaseTunerLayer
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, tuner_layer):
                child.merge()
                setattr(parent, child_name, child.get_base_layer())
    return model
