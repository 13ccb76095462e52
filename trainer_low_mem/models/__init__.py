"""Model families behind one interface: `resolve_model_kind(ModelConfig) -> ModelKind`.

    kind.py        the `ModelKind` protocol, `DataFacts`, `AdapterHost`
    builtin.py     `PresetKind`: the built-in decoder presets
    hf_folder.py   what the Hugging Face folder kinds share
    hf_causal.py   `HFCausalKind`: decoder-only folders (Llama, Qwen, GPT-2, ...)
    hf_seq2seq.py  `Seq2SeqKind`: encoder-decoder folders (T5, BART-style)
    lora.py        `LoraKind`: LoRA adapters around any of them

The family is decided here, once, from the model config (a folder's config.json says whether it
is an encoder-decoder); everything else asks the kind.
"""

from __future__ import annotations

import torch

from lowmem_core.errors import ConfigError
from trainer_low_mem.config import ModelConfig
from trainer_low_mem.hf_model import (
    COMPUTE_DTYPES,
    Quantisation,
    check_model_folder,
    has_weights,
    read_folder_config,
)
from trainer_low_mem.models.builtin import PresetKind
from trainer_low_mem.models.hf_causal import HFCausalKind
from trainer_low_mem.models.hf_seq2seq import Seq2SeqKind
from trainer_low_mem.models.kind import AdapterHost, DataFacts, ModelKind
from trainer_low_mem.models.lora import LoraKind, is_adapter, trainable_parameter_count

__all__ = [
    "AdapterHost",
    "DataFacts",
    "ModelKind",
    "is_adapter",
    "resolve_model_kind",
    "trainable_parameter_count",
]


def resolve_model_kind(cfg: ModelConfig, mixed_precision: str = "no") -> ModelKind:
    """The kind of model `cfg` describes, LoRA included; reads config.json, never weights.
    `mixed_precision` (--mixed_precision) is what quantised weights compute in."""
    kind = _family(cfg, mixed_precision)
    return kind if cfg.lora is None else LoraKind(kind, cfg.lora)


def _family(cfg: ModelConfig, mixed_precision: str) -> ModelKind:
    if cfg.model is None:
        return PresetKind(cfg.model_preset, cfg.grad_checkpointing)
    folder = check_model_folder(cfg.model)
    config = read_folder_config(folder)
    # A folder without weights trains only when asked: --from_scratch, or --init_from's weights.
    from_scratch = cfg.from_scratch or (cfg.init_from is not None and not has_weights(folder))
    quantisation = Quantisation.of(cfg.quantisation, mixed_precision)
    settings = {
        "from_scratch": from_scratch,
        "grad_checkpointing": cfg.grad_checkpointing,
        "lora_targets": None if cfg.lora is None else cfg.lora.target_modules,
        "base_dtype": base_dtype(cfg, mixed_precision),
    }
    if not config.is_encoder_decoder:
        return HFCausalKind(folder, config, quantisation=quantisation, **settings)
    if quantisation is not None:
        raise ConfigError(
            f"{quantisation.flag} is for decoder-only models; --model {folder} is an "
            f"encoder-decoder: drop {quantisation.flag} (LoRA alone works)"
        )
    return Seq2SeqKind(folder, config, **settings)


def base_dtype(cfg: ModelConfig, mixed_precision: str) -> torch.dtype:
    """What a Hugging Face folder's unquantised weights are loaded and kept in, for `train` and
    the planner's trace alike: a LoRA run's frozen base in the compute dtype of
    --mixed_precision (safetensors weights are mostly bf16 already, so no fp32 copy exists;
    the fp32 adapters are peft's, see LoraKind), fp32 otherwise: full fine-tuning keeps fp32
    master weights, and --mixed_precision no (a CPU without bf16) computes in fp32. A quantised
    run keeps its other layers in the compute dtype on its own (Quantisation)."""
    if cfg.lora is None or cfg.quantisation is not None:
        return torch.float32
    return COMPUTE_DTYPES[mixed_precision]
