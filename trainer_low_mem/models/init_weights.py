"""`--init_from DIR`: start from the weights of an export or a training state, any model kind.

An export (or any Hugging Face folder) names tensors as transformers does, a training state as
this trainer's modules do; the kind says where either kind of name loads (`init_target`).
Adapters are refused: a new run starts from merged weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lowmem_core.errors import ConfigError
from trainer_low_mem.models.kind import ModelKind
from trainer_low_mem.models.lora import is_adapter


def load_initial_weights(kind: ModelKind, model: nn.Module, source: Path) -> None:
    """Copy the weights in `source` into `model` (same architecture), or one ConfigError."""
    source = Path(source)
    if not source.is_dir():
        raise ConfigError(
            f"--init_from {source} is not a folder; give an export (OUTPUT_DIR/final) "
            "or a training state (OUTPUT_DIR/train_latest_state)"
        )
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"--init_from {source} holds no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except (OSError, SafetensorError) as exc:
            raise ConfigError(
                f"--init_from {f} is not a readable safetensors file ({exc}): it is truncated "
                "or corrupt; export or save it again"
            ) from None
    if any(is_adapter(k) for k in tensors):
        raise ConfigError(
            f"--init_from {source} holds LoRA adapters, not full weights; start from its merged "
            "export (OUTPUT_DIR/final) instead"
        )
    target, tensors = kind.init_target(model, tensors, _is_hf_config(source / "config.json"))
    missing, unexpected = _load(target, tensors)
    if missing or unexpected:
        shown = sorted(missing)[:3] + sorted(unexpected)[:3]
        raise ConfigError(
            f"--init_from {source} does not fit this model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected tensors, e.g. {', '.join(shown)}); it must come from "
            "the same architecture and size"
        )


def _is_hf_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def _load(module: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = module.state_dict()
    # With LoRA the base weights sit under peft's `.base_layer.`; the adapters keep their init.
    tensors = {_base_layer_name(k, own): v for k, v in tensors.items()}
    mismatched = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ConfigError(
            f"--init_from tensor {k} has shape {tuple(tensors[k].shape)} but this model's is "
            f"{tuple(own[k].shape)}; it must come from the same architecture and size"
        )
    result = module.load_state_dict(tensors, strict=False)
    # A weight tied to one that loaded (the LM head to the embeddings) is not missing.
    aliases = _tied_names(module)
    missing = [
        k
        for k in result.missing_keys
        if not is_adapter(k) and not aliases.get(k, set()) & tensors.keys()
    ]
    return missing, list(result.unexpected_keys)


def _tied_names(module: nn.Module) -> dict[str, set[str]]:
    """Each parameter's name -> the other names of the same parameter."""
    names: dict[int, set[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), set()).add(name)
    return {name: group - {name} for group in names.values() for name in group}


def _base_layer_name(name: str, own: dict[str, torch.Tensor]) -> str:
    """`name`, or where a LoRA layer keeps that weight (`a.b.weight` -> `a.b.base_layer.weight`)."""
    parent, _, leaf = name.rpartition(".")
    wrapped = f"{parent}.base_layer.{leaf}"
    return wrapped if name not in own and wrapped in own else name
