"""The model a job trains, from its config and its dataset: which one, from what weights, LoRA.

One call, `build_job_model(ModelConfig, DataFacts)`, used by the loop: a built-in preset sized to
the dataset's vocabulary, or the user's Hugging Face folder (decoder-only, or an encoder-decoder
trained on prompt/response pairs: trainer_low_mem/seq2seq.py) checked against the dataset's
vocabulary and EOS; `--init_from` weights (an export, any Hugging Face folder of the
same architecture, or a training state); LoRA adapters last, so only they train.
`job_model_factory` builds the same model without weights, for the planner's trace.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lowmem_core.errors import ConfigError
from lowmem_core.format import INDEX_NAME
from trainer_low_mem.config import JobConfig, ModelConfig
from trainer_low_mem.export import llama_state_dict_to_decoder
from trainer_low_mem.hf_model import (
    HFCausalLM,
    check_dataset_matches_model,
    check_model_folder,
    is_encoder_decoder,
    load_model_folder,
)
from trainer_low_mem.lora import LoraSettings, apply_lora, trainable_parameter_count
from trainer_low_mem.model import DecoderLM, build_model, resolve_preset
from trainer_low_mem.seq2seq import Seq2SeqLM, load_seq2seq_folder


@dataclass(frozen=True)
class DataFacts:
    """What the model setup needs to know of the training dataset."""

    path: Path
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    is_sft: bool  # prompt/response samples: loss on the response, attention within samples
    tokenizer_dir: Path | None  # tokenizer files to export beside the model, when known


@dataclass
class JobModel:
    model: nn.Module
    description: str  # one line for the start-up log
    document_masking: bool
    trainable_params: int
    total_params: int


def build_job_model(cfg: ModelConfig, data: DataFacts) -> JobModel:
    """Build (seed torch first for reproducible weights) the model `cfg` describes."""
    masking = cfg.document_masking if cfg.document_masking is not None else data.is_sft
    model = _architecture(cfg, data.vocab_size, masking, from_scratch=cfg.from_scratch)
    if isinstance(model, Seq2SeqLM) and not data.is_sft:
        raise ConfigError(
            f"--model {cfg.model} is an encoder-decoder and trains on prompt/response pairs, but "
            f"--data {data.path} is plain text; build it with `python -m pipeline build --sft`"
        )
    if isinstance(model, (HFCausalLM, Seq2SeqLM)):
        check_dataset_matches_model(
            vocab_size=data.vocab_size,
            eos_id=data.eos_id,
            bos_id=data.bos_id,
            model=model,
            data=data.path,
        )
        source = "random init from its config" if cfg.from_scratch else "its weights"
        loss = getattr(model, "loss_path_reason", "encoder-decoder, packed pairs")
        what = f"{cfg.model} ({model.config.model_type}, {source}; loss: {loss})"
    else:
        what = f"built-in preset {cfg.model_preset} (vocabulary {data.vocab_size})"
    if cfg.init_from is not None:
        load_initial_weights(model, cfg.init_from)
        what += f", weights from {cfg.init_from}"
    if cfg.lora_rank is not None:
        _add_lora(model, cfg)
        what += f", LoRA rank {cfg.lora_rank}"
    trainable, total = trainable_parameter_count(model)
    return JobModel(model, what, masking, trainable, total)


def job_model_factory(
    cfg: ModelConfig,
    vocab_size: int,
    document_masking: bool = False,
    row_lens: tuple[int, int] | None = None,
) -> Callable[[], nn.Module]:
    """Builds the model `cfg` describes without its weights (from a folder's config.json), LoRA
    included: the planner calls it under the meta device to trace a training step.

    `vocab_size` sizes a preset (a folder keeps its own); `document_masking` applies when
    `cfg.document_masking` is None (on for prompt/response datasets); `row_lens` are an
    encoder-decoder's (encoder, decoder) row lengths (trainer_low_mem.seq2seq).
    """
    masking = cfg.document_masking if cfg.document_masking is not None else document_masking

    def build() -> nn.Module:
        if cfg.load_in_4bit:
            raise ConfigError(
                "4-bit (QLoRA) weights are quantised from real weights, which a trace on fake "
                "tensors does not have; the plan counts them analytically"
            )
        model = _architecture(cfg, vocab_size, masking, from_scratch=True)
        if cfg.lora_rank is not None:
            _add_lora(model, cfg)
        if row_lens is not None and hasattr(model, "row_lens"):
            model.row_lens = row_lens
        return model

    return build


def _architecture(
    cfg: ModelConfig, vocab_size: int, masking: bool, from_scratch: bool
) -> nn.Module:
    """A preset sized to the vocabulary, or the folder's model (its weights unless from_scratch)."""
    if cfg.model is not None and is_encoder_decoder(check_model_folder(cfg.model)):
        if cfg.load_in_4bit:
            raise ConfigError(
                f"--load_in_4bit is for decoder-only models; --model {cfg.model} is an "
                "encoder-decoder: drop --load_in_4bit (LoRA alone works)"
            )
        return load_seq2seq_folder(
            cfg.model, from_scratch=from_scratch, grad_checkpointing=cfg.grad_checkpointing
        )
    if cfg.model is not None:
        return load_model_folder(
            cfg.model,
            from_scratch=from_scratch,
            grad_checkpointing=cfg.grad_checkpointing,
            document_masking=masking,
            load_in_4bit=cfg.load_in_4bit,
        )
    return build_model(
        resolve_preset(cfg.model_preset, vocab_size),
        grad_checkpointing=cfg.grad_checkpointing,
        document_masking=masking,
    )


def _add_lora(model: nn.Module, cfg: ModelConfig) -> None:
    settings = LoraSettings(
        cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules
    )
    apply_lora(model, settings)


def load_initial_weights(model: nn.Module, source: Path) -> None:
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
        tensors.update(load_file(f))
    if any("lora_" in k for k in tensors):
        raise ConfigError(
            f"--init_from {source} holds LoRA adapters, not full weights; start from its merged "
            "export (OUTPUT_DIR/final) instead"
        )
    # An export (or any Hugging Face folder) names tensors as transformers does; a training
    # state as this trainer's modules do.
    is_export = _is_hf_config(source / "config.json")
    target = model
    if is_export and isinstance(model, DecoderLM):
        tensors = llama_state_dict_to_decoder(tensors, model)
    elif is_export:
        target = model.hf_model
    missing, unexpected = _load(target, tensors)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        shown = sorted(set(missing) - tied)[:3] + sorted(unexpected)[:3]
        raise ConfigError(
            f"--init_from {source} does not fit this model ({len(set(missing) - tied)} missing, "
            f"{len(unexpected)} unexpected tensors, e.g. {', '.join(shown)}); it must come from "
            "the same architecture and size"
        )


def _is_hf_config(path: Path) -> bool:
    try:
        return "model_type" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _load(module: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = module.state_dict()
    mismatched = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ConfigError(
            f"--init_from tensor {k} has shape {tuple(tensors[k].shape)} but this model's is "
            f"{tuple(own[k].shape)}; it must come from the same architecture and size"
        )
    result = module.load_state_dict(tensors, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def tokenizer_folder(model_dir: Path | None, data_path: Path) -> Path | None:
    """The tokenizer files exported beside the model: the model folder's own when it has them,
    else the folder the dataset was built with (index.json's tokenizer source), when it still
    exists; None for the byte tokenizer (the export writes its own)."""
    candidates = [model_dir] if model_dir is not None else []
    index = Path(data_path) / INDEX_NAME
    try:
        source = json.loads(index.read_text()).get("tokenizer", {}).get("source")
    except (OSError, ValueError):
        source = None
    if source:
        source = Path(source)
        candidates.append(source if source.is_dir() else source.parent)
    for folder in candidates:
        if any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES):
            return Path(folder)
    return None


def data_facts(path: Path, dataset) -> DataFacts:
    return DataFacts(
        path=path,
        vocab_size=dataset.vocab_size,
        bos_id=dataset.bos_id,
        eos_id=dataset.eos_id,
        pad_id=dataset.pad_id,
        is_sft=getattr(dataset, "prompt_lengths", None) is not None,
        tokenizer_dir=tokenizer_folder(None, path),
    )


def model_identity(config: JobConfig, preset) -> dict[str, Any]:
    """What resume compares so a state is never loaded into another model."""
    m = config.model
    lora = None
    if m.lora_rank is not None:
        lora = {
            "rank": m.lora_rank,
            "alpha": m.lora_alpha,
            "dropout": m.lora_dropout,
            "targets": str(m.lora_target_modules),
        }
    if m.model is None:
        return {"preset": m.model_preset, **preset.__dict__, "lora": lora}
    try:
        hf_config = json.loads((Path(m.model) / "config.json").read_text())
    except (OSError, ValueError):
        hf_config = None
    return {"folder_config": hf_config, "lora": lora}
