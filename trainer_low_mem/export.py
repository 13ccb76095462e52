"""Export the trained model as a folder `transformers` loads: `OUTPUT_DIR/final/`.

`export_model` writes the folder atomically; the model's kind (trainer_low_mem/models/) fills it
with the writers here. A Hugging Face model (decoder-only, or an encoder-decoder that
`AutoModelForSeq2SeqLM` loads back) is written in its own format; the built-in `DecoderLM` as a
`LlamaForCausalLM` (same RMSNorm, rotary convention, SwiGLU MLP and tied head, so the logits
match). LoRA adapters are merged into the exported weights without touching the live model (each
merged weight is computed beside it), or written alone in peft's format (`adapter_only`). The
tokenizer is copied from the model folder or the dataset's tokenizer folder, or made for the
built-in byte tokenizer. Weights are written in the model kind's export dtype (the source's by
default: a bf16 folder exports bf16), and a Hugging Face config keeps the source's `use_cache`
(training turns it off). Written like the training state: a temp folder, fsynced, renamed; the
previous export is removed only once the new one is in place. Files are world-readable (0644).

The export replaces `final/` only when that folder holds nothing but an export: the files its
manifest (`MANIFEST_NAME`, written with every export) lists at their recorded sizes, or, for an
export of an earlier release (no manifest), the files an export writes and byte-equal copies of
the tokenizer folder's files (which those releases copied whole). Anything else is the user's and
the export refuses (`check_export_folder`), before training and again before the swap.
"""

from __future__ import annotations

import copy
import filecmp
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lowmem_core.durable import atomic_folder
from lowmem_core.errors import CheckpointError, ConfigError, require_extra
from lowmem_core.format import INDEX_NAME
from pipeline.output import recover_interrupted
from trainer_low_mem.model import ROPE_BASE, DecoderLM

if TYPE_CHECKING:
    from trainer_low_mem.models.kind import DataFacts, ModelKind

EXPORT_DIR_NAME = "final"
BYTE_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
MANIFEST_NAME = ".lowmem_export.json"  # {"files": {name: size in bytes}} of what the export wrote
# Where the manifest of an adapter-only export of a quantised run notes its base.
ADAPTER_BASE_KEY = "lowmem_base"
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def merged_state_dict(
    module: nn.Module, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """CPU copy of `module`'s weights with every LoRA adapter folded in, under the plain names;
    floating-point tensors in `dtype` (None: as they are). Tied weights stay one tensor.
    bitsandbytes layers are dequantised (their quantisation statistics are not written), so the
    result is an ordinary unquantised state dict."""
    # Adapters are peft's layers; a process that never imported peft holds none.
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    adapted = {
        name: sub
        for name, sub in module.named_modules()
        if tuners is not None and isinstance(sub, tuners.BaseTunerLayer)
    }
    quantised = {name: sub for name, sub in module.named_modules() if is_quantised_linear(sub)}
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, sub in quantised.items():
            merged[_plain_name(f"{name}.weight", adapted)] = dequantised_weight(sub)
        for name, sub in adapted.items():
            key = f"{name}.weight"
            base = merged.get(key, sub.get_base_layer().weight)
            delta = sum(sub.get_delta_weight(a) for a in sub.active_adapters)
            # In fp32 whatever the base's dtype (a LoRA base kept in bf16: a small delta added
            # in bf16 would round away), then straight to the written dtype, so no fp32 copy
            # of every merged weight is held at once.
            merged[key] = (base.float() + delta.float()).to(dtype or base.dtype)
        # Each quantised layer's statistics (absmax, quant_map, SCB, ...) under its plain name.
        statistics = {
            _plain_name(f"{name}.weight", adapted)[: -len("weight")] for name in quantised
        }
        out, cast = {}, {}
        for key, value in module.state_dict().items():
            plain = _plain_name(key, adapted)
            if plain is None or _is_statistic(plain, statistics):
                continue
            out[plain] = _on_cpu(merged.get(plain, value), dtype, cast)
    return out


def is_quantised_linear(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit or 8-bit linear layer (none exists in a process
    that never imported bitsandbytes)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return bnb_nn is not None and isinstance(module, (bnb_nn.Linear4bit, bnb_nn.Linear8bitLt))


def dequantised_weight(layer: nn.Module) -> torch.Tensor:
    """A bitsandbytes linear layer's weight as a float32 [out, in] matrix: NF4 codes times their
    (double-quantised) block scales, or int8 codes times each row's scale / 127."""
    functional = sys.modules["bitsandbytes.functional"]
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:  # 4-bit
        # A sharded export holds the codes in host RAM while the statistics stay on the device.
        return functional.dequantize_4bit(weight.data.to(state.absmax.device), state).float()
    scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB
    return functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device)).float()


def _is_statistic(key: str, statistics: set[str]) -> bool:
    """Whether `key` is a quantised layer's statistic, not its weight or bias."""
    owner = next((prefix for prefix in statistics if key.startswith(prefix)), None)
    return owner is not None and key[len(owner) :] not in ("weight", "bias")


def _plain_name(key: str, adapted: dict[str, nn.Module]) -> str | None:
    """`key` under the name it has without adapters: an adapted layer's `base_layer.` dropped;
    None for the adapter's own tensors."""
    owner, _, rest = key.rpartition(".")
    while owner and owner not in adapted:
        owner, _, head = owner.rpartition(".")
        rest = f"{head}.{rest}"
    if not owner:
        return key
    if not rest.startswith("base_layer."):
        return None
    return f"{owner}.{rest.removeprefix('base_layer.')}"


def _on_cpu(tensor: torch.Tensor, dtype: torch.dtype | None, cast: dict) -> torch.Tensor:
    """`tensor` on the CPU in `dtype`; `cast` maps a storage view already converted to its copy,
    so weights tied in the model (embedding and head) are written once."""
    view = (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tensor.shape,
        tensor.stride(),
    )
    if view not in cast:
        to = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        cast[view] = tensor.detach().to("cpu", to)
    return cast[view]


def _llama_state_dict(model: DecoderLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    src = merged_state_dict(model, dtype)
    d = model.preset.d_model
    out = {
        "model.embed_tokens.weight": src["embed.weight"],
        "model.norm.weight": src["norm.weight"],
    }
    for i in range(model.preset.n_layers):
        b, t = f"blocks.{i}.", f"model.layers.{i}."
        qkv = src[b + "attn.qkv.weight"]  # rows: q heads, then k heads, then v heads
        out[t + "self_attn.q_proj.weight"] = qkv[:d].clone()
        out[t + "self_attn.k_proj.weight"] = qkv[d : 2 * d].clone()
        out[t + "self_attn.v_proj.weight"] = qkv[2 * d :].clone()
        out[t + "self_attn.o_proj.weight"] = src[b + "attn.proj.weight"]
        out[t + "input_layernorm.weight"] = src[b + "attn_norm.weight"]
        out[t + "post_attention_layernorm.weight"] = src[b + "mlp_norm.weight"]
        out[t + "mlp.gate_proj.weight"] = src[b + "mlp.gate.weight"]
        out[t + "mlp.up_proj.weight"] = src[b + "mlp.up.weight"]
        out[t + "mlp.down_proj.weight"] = src[b + "mlp.proj.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def llama_state_dict_to_decoder(
    tensors: dict[str, torch.Tensor], model: DecoderLM
) -> dict[str, torch.Tensor]:
    """The inverse of the export's renaming: `LlamaForCausalLM` tensors -> `DecoderLM` names."""
    try:
        return _decoder_names(tensors, model.preset.n_layers)
    except KeyError:
        return {}  # not this model's shape: the caller reports every missing tensor


def _decoder_names(tensors: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    out = {
        "embed.weight": tensors["model.embed_tokens.weight"],
        "norm.weight": tensors["model.norm.weight"],
    }
    for i in range(n_layers):
        b, t = f"blocks.{i}.", f"model.layers.{i}."
        qkv = [tensors[t + f"self_attn.{x}_proj.weight"] for x in "qkv"]
        out[b + "attn.qkv.weight"] = torch.cat(qkv)
        out[b + "attn.proj.weight"] = tensors[t + "self_attn.o_proj.weight"]
        out[b + "attn_norm.weight"] = tensors[t + "input_layernorm.weight"]
        out[b + "mlp_norm.weight"] = tensors[t + "post_attention_layernorm.weight"]
        out[b + "mlp.gate.weight"] = tensors[t + "mlp.gate_proj.weight"]
        out[b + "mlp.up.weight"] = tensors[t + "mlp.up_proj.weight"]
        out[b + "mlp.proj.weight"] = tensors[t + "mlp.down_proj.weight"]
    return out


def llama_config(model: DecoderLM, special_ids: dict[str, int | None], dtype: str = "float32"):
    """The `LlamaConfig` whose `LlamaForCausalLM` computes what `model` computes, its weights
    stored in `dtype`."""
    transformers = require_extra("transformers", "hf", "exporting a Hugging Face model folder")

    p = model.preset
    return transformers.LlamaConfig(
        vocab_size=p.vocab_size,
        hidden_size=p.d_model,
        intermediate_size=p.d_ff,
        num_hidden_layers=p.n_layers,
        num_attention_heads=p.n_heads,
        num_key_value_heads=p.n_heads,
        hidden_act="silu",
        max_position_embeddings=p.max_seq_len,
        rms_norm_eps=1e-6,
        rope_theta=ROPE_BASE,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=special_ids.get("bos_id"),
        eos_token_id=special_ids.get("eos_id"),
        pad_token_id=special_ids.get("pad_id"),
        dtype=dtype,
    )


def byte_tokenizer_folder(out: Path) -> None:
    """A fast tokenizer equal to the built-in byte tokenizer: id i is byte i; 256-258 specials."""
    transformers = require_extra("transformers", "hf", "exporting a Hugging Face model folder")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of_char(ch))
    vocab = {ch: _byte_of_char(ch) for ch in byte_chars}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BYTE_TOKENS.values()))  # ids 256, 257, 258 in this order
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **BYTE_TOKENS)
    fast.save_pretrained(out)


def _byte_of_char(ch: str) -> int:
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to 256 + n.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def export_model(
    kind: ModelKind, model: nn.Module, out_dir: Path, data: DataFacts, *, adapter_only: bool
) -> Path:
    """Write `model` as its kind exports it (weights, config, tokenizer) to `out_dir`
    atomically; returns `out_dir`. Refuses (ConfigError) to replace an `out_dir` that holds
    anything an export did not write (`check_export_folder`)."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.export-tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.export-old-{os.getpid()}"
    recover_interrupted_export(out_dir)
    try:
        with atomic_folder(out_dir, tmp, old):
            kind.export_files(model, tmp, data, adapter_only)
            _write_manifest(tmp)
            for item in tmp.iterdir():
                os.chmod(item, 0o644)
            # Checked last, just before the swap: a file put there during the run is kept too.
            check_export_folder(out_dir, data.tokenizer_dir)
    # A full disk surfaces as OSError, or as SafetensorError from the weights writer.
    except (OSError, SafetensorError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"cannot write the export to {out_dir} ({first}); free space or fix the "
            "folder's permissions, the training state is intact"
        ) from None
    return out_dir


def recover_interrupted_export(out_dir: Path) -> None:
    """Clean up after exports of `out_dir` that were killed (the caller holds the run's lock, so
    no other export of it is alive), as a build does after killed builds."""
    recover_interrupted(out_dir, tag="export")


def check_export_folder(out_dir: Path, tokenizer_dir: Path | None) -> None:
    """Refuse, in one line, to replace `out_dir` when it holds anything an export did not
    write (see the module docstring); no `out_dir` passes. `tokenizer_dir`: the dataset's
    tokenizer folder, which an earlier release copied whole into its export."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ConfigError(
            f"{out_dir} is a {'link' if out_dir.is_symlink() else 'file'}, not a folder an "
            "export wrote, and the export replaces it; move it away or choose another --output_dir"
        )
    foreign = _not_exported(out_dir, tokenizer_dir) if out_dir.exists() else []
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise ConfigError(
            f"{out_dir} holds files no export wrote ({', '.join(foreign[:3])}{more}) and the "
            "export replaces that folder; move them out of it or choose another --output_dir"
        )


def _write_manifest(folder: Path) -> None:
    """The manifest of what `folder` holds, keeping a note the kind wrote (`note_adapter_base`)."""
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest["files"] = {
        item.name: item.stat().st_size for item in sorted(folder.iterdir()) if item != path
    }
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def _not_exported(folder: Path, tokenizer_dir: Path | None) -> list[str]:
    """The names in `folder` an export did not write (a folder as `NAME/`, a file changed since
    the export as `NAME (changed)`)."""
    manifest = _read_manifest(folder)
    foreign = []
    for item in sorted(folder.iterdir()):
        name = item.name
        if item.is_symlink() or not item.is_file():
            foreign.append(f"{name}/" if item.is_dir() else name)
        elif manifest is None:
            if not _written_by_an_earlier_export(item, tokenizer_dir):
                foreign.append(name)
        elif name not in manifest and name != MANIFEST_NAME:
            foreign.append(name)
        elif name in manifest and manifest[name] != item.stat().st_size:
            foreign.append(f"{name} (changed)")
    return foreign


def _read_manifest(folder: Path) -> dict[str, int] | None:
    try:
        files = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


# What an export has written into final/ in every release: the weights (sharded or not) and
# configs by save_pretrained, peft's adapter files and model card, the tokenizer files.
_EXPORT_FILES = frozenset(
    {
        MANIFEST_NAME,
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    }
)
_WEIGHT_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _written_by_an_earlier_export(item: Path, tokenizer_dir: Path | None) -> bool:
    name = item.name
    if name in _EXPORT_FILES or _WEIGHT_SHARD.fullmatch(name) or _is_tokenizer_file(name):
        return True
    if name == "README.md" and _is_peft_model_card(item):
        return True
    # Earlier releases copied every file of the tokenizer folder (often the model folder).
    copy_of = None if tokenizer_dir is None else Path(tokenizer_dir) / name
    return copy_of is not None and copy_of.is_file() and filecmp.cmp(item, copy_of, shallow=False)


def _is_peft_model_card(path: Path) -> bool:
    """The README.md peft's save_pretrained writes beside an adapter."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        head = fh.read(4096)
    return head.startswith("---") and "library_name: peft" in head


def write_hf_weights(hf_model: nn.Module, folder: Path, dtype: str, use_cache: bool | None) -> None:
    """A transformers model in its own format, adapters folded into its weights, in `dtype`;
    its config.json says `dtype` and the source's `use_cache` (None: the source had none). A
    model quantised by bitsandbytes is written dequantised, with no quantization_config: an
    ordinary folder in `dtype`."""
    state_dict = merged_state_dict(hf_model, EXPORT_DTYPES[dtype])
    writer = _unquantised_twin(hf_model) if getattr(hf_model, "is_quantized", False) else hf_model
    writer.save_pretrained(folder, state_dict=state_dict)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype
    if use_cache is None:
        config.pop("use_cache", None)
    else:
        config["use_cache"] = use_cache
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _unquantised_twin(hf_model: nn.Module) -> nn.Module:
    """The same architecture built on the meta device (no memory) from the config without its
    quantization_config: what save_pretrained writes an unquantised folder with."""
    config = copy.deepcopy(hf_model.config)
    del config.quantization_config
    with torch.device("meta"):
        twin = type(hf_model)(config)
    twin.generation_config = hf_model.generation_config
    return twin


def note_adapter_base(folder: Path, base_folder: Path, settings: dict, compute_dtype: str) -> None:
    """Note in the export manifest what an adapter-only export's adapters were trained on: the
    base folder (also peft's `base_model_name_or_path` in adapter_config.json), the
    bitsandbytes settings its weights were quantised with and the compute dtype. Not in
    adapter_config.json: peft warns on every load about a key it does not know."""
    note = {"folder": str(base_folder), "quantisation": settings, "compute_dtype": compute_dtype}
    (folder / MANIFEST_NAME).write_text(json.dumps({ADAPTER_BASE_KEY: note}))


def write_llama_weights(
    model: DecoderLM, folder: Path, special_ids: dict[str, int | None], dtype: str
) -> None:
    """The built-in decoder as the `LlamaForCausalLM` that computes the same logits."""
    llama_config(model, special_ids, dtype).save_pretrained(folder)
    tensors = _llama_state_dict(model, EXPORT_DTYPES[dtype])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def weights_dtype(folder: Path) -> str | None:
    """The dtype most of a folder's safetensors weights are stored in ("bfloat16", ...), read
    from the file headers only; None without safetensors weights or for another dtype."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        counts: dict[str, int] = {}
        for name in files:
            with safe_open(folder / name, framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    tensor = fh.get_slice(key)
                    dtype = tensor.get_dtype()
                    counts[dtype] = counts.get(dtype, 0) + math.prod(tensor.get_shape())
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None
    if not counts:
        return None
    return _SAFETENSORS_DTYPES.get(max(counts, key=counts.__getitem__))


def copy_tokenizer(source: Path, folder: Path) -> None:
    """Copy the tokenizer files of `source` (never its weights or config) into `folder`."""
    for item in Path(source).iterdir():
        if item.is_file() and _is_tokenizer_file(item.name):
            shutil.copy2(item, folder / item.name)


def has_tokenizer_files(folder: Path) -> bool:
    return any(item.is_file() and _is_tokenizer_file(item.name) for item in folder.iterdir())


def dataset_tokenizer_folder(data_path: Path) -> Path | None:
    """The folder of the tokenizer a dataset was built with (index.json's tokenizer source),
    when it still exists and holds tokenizer files; None for the byte tokenizer."""
    try:
        index = json.loads((Path(data_path) / INDEX_NAME).read_text())
        source = index.get("tokenizer", {}).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    if not source:
        return None
    folder = Path(source) if Path(source).is_dir() else Path(source).parent
    return folder if folder.is_dir() and has_tokenizer_files(folder) else None


# What a Hugging Face tokenizer folder holds; a model folder's weights and config never travel
# with its tokenizer (they would overwrite the trained model's).
_TOKENIZER_FILES = frozenset(
    {
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith("tokenizer") or name in _TOKENIZER_FILES
