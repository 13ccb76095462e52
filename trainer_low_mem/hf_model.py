"""The user's Hugging Face causal LM, from a local folder, behind the trainer's forward contract.

`load_model_folder(PATH)` builds any `AutoModelForCausalLM` architecture that `transformers`
builds offline: from the folder's weights, or from its config alone when asked (`from_scratch`).
Nothing is downloaded: a hub name that is not a local folder is refused. Weights load through
`from_pretrained`, also where it would not find them by itself (shards without their index,
`consolidated.safetensors`: a temporary folder links them beside an index written for them), and
its loading report is checked: a weight the model expects and the files lack, a tensor it does
not take or one of another shape is an error, never a silently random weight. The same helpers
(`read_folder_config`, `build_hf_model`) build the encoder-decoders of trainer_low_mem/seq2seq.py.

`HFCausalLM` gives it the forward contract of `trainer_low_mem.model` (unshifted labels, summed
loss and target count). The loss is the chunked cross-entropy of the backbone's last hidden state
against the output embedding, so no [B, L, vocab] fp32 logits exist; a model whose head does more
than one bias-free matmul (logit scaling or soft-capping) is detected at load by comparing both
losses on a few tokens, and then goes through its full logits instead. Packed rows never attend
across documents when `document_masking` is on: a block-diagonal causal mask built from the
position ids (flash-attention implementations take the position ids alone).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from lowmem_core.errors import ConfigError, require_extra
from lowmem_core.format import IGNORE_INDEX
from lowmem_core.hub_kernels import require_extra_offline
from trainer_low_mem.attention import sample_isolation
from trainer_low_mem.loss import LogitMap, chunked_cross_entropy, shift_labels
from trainer_low_mem.model import ModelOutput

if TYPE_CHECKING:
    from trainer_low_mem.planner.model_memory import QuantisedWeights

log = logging.getLogger(__name__)

# What `from_pretrained` finds by itself: an index of shards, else one file.
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
# What it does not look for, in this order: transformers' shards without their index, any other
# safetensors file (Mistral's consolidated.safetensors), PyTorch shards without their index.
_UNINDEXED = ("model*.safetensors", "*.safetensors", "pytorch_model*.bin")
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)(?P<ext>\.\w+)$")
# Config attributes of architectures whose logits are more than hidden @ head.T.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# The Auto classes the folder kinds build: the mapping of the configs each takes, and its name.
_AUTO_CLASSES = {
    "AutoModelForCausalLM": ("MODEL_FOR_CAUSAL_LM_MAPPING", "a causal language model"),
    "AutoModelForSeq2SeqLM": (
        "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING",
        "an encoder-decoder language model",
    ),
}
# Token ids a model feeds its own embedding (padding row, decoder start): below vocab_size.
_EMBEDDED_IDS = ("pad_token_id", "decoder_start_token_id")


def _transformers():
    return require_extra("transformers", "hf", "--model")


def _model_errors() -> tuple[type[Exception], ...]:
    """What transformers and an architecture's own code raise on a config or weights they cannot
    build (not MemoryError or KeyboardInterrupt): each becomes one ConfigError line."""
    hub_errors = require_extra("huggingface_hub.errors", "hf", "--model")
    strict = getattr(hub_errors, "StrictDataclassError", ValueError)  # config validation
    return (
        OSError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AssertionError,
        RuntimeError,
        pickle.UnpicklingError,
        SafetensorError,
        strict,
    )


def _first_line(exc: BaseException) -> str:
    """The line of an exception's message that says what is wrong, at most 200 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = [line for line in lines if not line.endswith(":")] or lines
    return (said[0] if said else type(exc).__name__)[:200]


def _few(names: Sequence[str], shown: int = 3) -> str:
    """`a, b, c and 4 more`."""
    names = sorted(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _count(items: Sequence, noun: str) -> str:
    """`1 weight`, `3 weights`."""
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def check_model_folder(path: Path | str) -> Path:
    """The folder as a Path, or a one-line ConfigError saying what is missing."""
    folder = Path(path)
    if not folder.exists():
        looks_like_hub_id = str(path).count("/") == 1 and not str(path).startswith((".", "/"))
        hint = (
            "; models are never downloaded here: fetch it on a machine with network access "
            f"(`huggingface-cli download {path} --local-dir DIR`) and pass --model DIR"
            if looks_like_hub_id
            else "; pass the folder holding config.json and the weights"
        )
        raise ConfigError(f"--model {path} is not a local folder{hint}")
    if not folder.is_dir():
        raise ConfigError(f"--model {folder} is a file; pass the folder that holds its config.json")
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"--model {folder} has no config.json, so it is not a Hugging Face model folder; "
            "save one with model.save_pretrained(DIR)"
        )
    return folder


# -- config.json ---------------------------------------------------------------------------


def read_folder_config(folder: Path):
    """The folder's config.json as transformers reads it, checked enough that the model builds,
    or one ConfigError naming the file and the fix."""
    transformers = _transformers()
    path = folder / "config.json"
    unreadable = f"{path} cannot be read by transformers"
    fix = "fix the file or save the model again with model.save_pretrained(DIR)"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{unreadable} (not JSON: {_first_line(exc)}); {fix}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{unreadable} (it holds a JSON {type(raw).__name__}, not an object of settings); {fix}"
        )
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type not in transformers.CONFIG_MAPPING:
        raise ConfigError(
            f"{unreadable} (model_type {model_type!r} is not an architecture transformers "
            f"{transformers.__version__} knows; code shipped with a model is never run here); "
            "upgrade transformers if the architecture is newer, else " + fix
        )
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except _model_errors() as exc:
        raise ConfigError(f"{unreadable} ({_first_line(exc)}); {fix}") from None
    _check_embedded_ids(path, config)
    return config


def _check_embedded_ids(path: Path, config) -> None:
    vocab_size = getattr(config, "vocab_size", None)
    if not isinstance(vocab_size, int):
        return
    if vocab_size < 1:
        raise ConfigError(
            f"{path}: vocab_size is {vocab_size}; set it to the tokenizer's size (len(tokenizer))"
        )
    for name in _EMBEDDED_IDS:
        token_id = getattr(config, name, None)
        if isinstance(token_id, int) and token_id >= vocab_size:
            raise ConfigError(
                f"{path}: {name} {token_id} is not below vocab_size {vocab_size}, so the "
                f"embedding has no row for it; set vocab_size to the tokenizer's size "
                f"(len(tokenizer)) or {name} to an id below it"
            )


# -- weights files -------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderWeights:
    """The files holding a model folder's weights. `indexed`: `from_pretrained` finds them by
    itself (an index, model.safetensors or pytorch_model.bin); else they need an index written
    for them (shards whose index is missing, consolidated.safetensors)."""

    folder: Path
    files: tuple[Path, ...]
    indexed: bool

    @property
    def names(self) -> str:
        return _few([f.name for f in self.files])

    def absent_shards(self) -> list[str]:
        """Shards that the present ones' names (`-00001-of-00002`) say exist but do not."""
        absent = set()
        for f in self.files:
            m = _SHARD_NAME.match(f.name)
            if m is None:
                continue
            width, count = len(m["i"]), int(m["n"])
            for i in range(1, count + 1):
                name = f"{m['stem']}-{i:0{width}d}-of-{m['n']}{m['ext']}"
                if not (self.folder / name).is_file():
                    absent.add(name)
        return sorted(absent)


def folder_weights(folder: Path) -> FolderWeights:
    """Which files hold the folder's weights; none when it has no weights file."""
    for index in _INDEXES:
        if (folder / index).is_file():
            return FolderWeights(folder, _indexed_files(folder / index), indexed=True)
    for name in _SINGLE_FILES:
        if (folder / name).is_file():
            return FolderWeights(folder, (folder / name,), indexed=True)
    return FolderWeights(folder, _unindexed_files(folder), indexed=False)


def has_weights(folder: Path) -> bool:
    """True when the folder holds a weights file (see `folder_weights`)."""
    names = _INDEXES + _SINGLE_FILES
    return any((folder / name).is_file() for name in names) or bool(_unindexed_files(folder))


def _unindexed_files(folder: Path) -> tuple[Path, ...]:
    for pattern in _UNINDEXED:
        files = tuple(sorted(f for f in folder.glob(pattern) if f.is_file()))
        if files:
            return files
    return ()


def _indexed_files(index: Path) -> tuple[Path, ...]:
    try:
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(
            f"{index} is not a weights index (JSON with a weight_map); download it again, or "
            "delete it to load the shards beside it without it"
        ) from None
    files = tuple(index.parent / name for name in names)
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise ConfigError(
            f"{index} lists {len(files)} weight files but {len(absent)} of them are absent "
            f"({_few(absent)}); download them into {index.parent}"
        )
    return files


def _tensor_names(path: Path) -> list[str]:
    """The tensors a weights file holds (a safetensors file: its header alone), or one
    ConfigError naming the file when it is truncated or not a weights file."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        return list(torch.load(path, map_location="meta", mmap=True, weights_only=True))
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as exc:
        raise ConfigError(
            f"{path} is not a readable weights file ({_first_line(exc)}): it is truncated or "
            "corrupt; download it again"
        ) from None


@contextlib.contextmanager
def _loadable(weights: FolderWeights) -> Iterator[Path]:
    """A folder `from_pretrained` loads `weights` from: the model folder itself, or a temporary
    one linking the folder's files beside an index written for the files it would not find."""
    for f in weights.files:
        if f.suffix == ".safetensors":
            _tensor_names(f)  # a truncated file is named here, not deep inside from_pretrained
    if weights.indexed:
        yield weights.folder
        return
    weight_map: dict[str, str] = {}
    for f in weights.files:
        for name in _tensor_names(f):
            if name in weight_map:
                raise ConfigError(
                    f"tensor {name} is in both {weight_map[name]} and {f.name} in {f.parent}; "
                    "keep the files of one copy of the weights"
                )
            weight_map[name] = f.name
    index = _INDEXES[0] if weights.files[0].suffix == ".safetensors" else _INDEXES[1]
    with tempfile.TemporaryDirectory(prefix="lowmem-weights-") as tmp:
        staged = Path(tmp)
        for entry in weights.folder.iterdir():
            (staged / entry.name).symlink_to(entry.resolve())
        (staged / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        yield staged


def _check_loading_info(weights: FolderWeights, info: dict) -> None:
    """Refuse what `from_pretrained` reports but only logs: weights the model expects that the
    files lack (left at random init), tensors it does not take, shapes that differ."""
    problems = []
    if info["missing_keys"]:
        missing = info["missing_keys"]
        problems.append(f"missing {_count(missing, 'weight')} the model expects ({_few(missing)})")
    if info["unexpected_keys"]:
        unexpected = info["unexpected_keys"]
        problems.append(
            f"{_count(unexpected, 'tensor')} the model does not take ({_few(unexpected)})"
        )
    if info.get("mismatched_keys"):
        mismatched = sorted(info["mismatched_keys"])
        key, in_file, in_model = mismatched[0]
        problems.append(
            f"{_count(mismatched, 'tensor')} of another shape (e.g. {key}: {tuple(in_file)} in "
            f"the files, {tuple(in_model)} in the model)"
        )
    if info.get("error_msgs"):
        problems.append(_first_line(Exception(info["error_msgs"][0])))
    if not problems:
        return
    absent = weights.absent_shards()
    if absent:
        problems.append(f"{_few(absent)} {'is' if len(absent) == 1 else 'are'} absent")
    raise ConfigError(
        f"--model {weights.folder}: the weights in {weights.names} do not fit its config.json: "
        f"{'; '.join(problems)}; download the folder again (or save it with "
        "model.save_pretrained(DIR)), or pass --from_scratch to train from random weights"
    )


# -- building ------------------------------------------------------------------------------


def build_hf_model(
    auto_class_name: str,
    folder: Path,
    config,
    *,
    from_scratch: bool,
    quantization=None,
    dtype: torch.dtype = torch.float32,
    device_map: dict | None = None,
) -> nn.Module:
    """The `transformers.<auto_class_name>` model of `folder`: from its weights, checked against
    its config, or from `config` alone (`from_scratch`); every failure is one ConfigError.
    `quantization` (a BitsAndBytesConfig) and `device_map` go to `from_pretrained`; `dtype` is
    that of the weights it does not quantise."""
    transformers = _transformers()
    auto_class = getattr(transformers, auto_class_name)
    mapping_name, family = _AUTO_CLASSES[auto_class_name]
    if type(config) not in getattr(transformers, mapping_name):
        raise ConfigError(
            f"--model {folder} is a {config.model_type} model, which transformers does not build "
            f"as {family} ({auto_class_name}); pass the folder of {family}"
        )
    if from_scratch:
        try:
            # In `dtype`, as from its weights: transformers would take config.json's (bf16 for
            # most released models), and the plan's trace of this build would count half-size
            # weights, gradients and optimizer states.
            return _keep_in_fp32(auto_class.from_config(config, dtype=dtype), dtype)
        except _model_errors() as exc:
            raise ConfigError(
                f"transformers cannot build --model {folder} from its config.json "
                f"({type(exc).__name__}: {_first_line(exc)}); fix config.json"
            ) from None
    weights = folder_weights(folder)
    if not weights.files:
        raise ConfigError(
            f"--model {folder} holds no weights (no model.safetensors, model-*.safetensors or "
            "pytorch_model*.bin); put the weights in it, or pass --from_scratch to train from "
            "random weights with its config.json"
        )
    with _loadable(weights) as source:
        try:
            hf_model, info = auto_class.from_pretrained(
                source,
                local_files_only=True,
                dtype=dtype,
                output_loading_info=True,
                # Quantised weights are packed in other shapes; transformers checks them itself.
                ignore_mismatched_sizes=quantization is None,
                quantization_config=quantization,
                device_map=device_map,
            )
        except _model_errors() as exc:
            raise ConfigError(
                f"cannot load the weights in {folder} ({weights.names}: {type(exc).__name__}: "
                f"{_first_line(exc)}); download them again, or pass --from_scratch to train from "
                "random weights"
            ) from None
    _check_loading_info(weights, info)
    hf_model.name_or_path = hf_model.config.name_or_path = str(folder)  # not the temporary one
    return hf_model


def _keep_in_fp32(hf_model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`hf_model` with the layers from_pretrained keeps in fp32 at `dtype` in fp32 too (T5's
    `wo` under fp16, for its range), so a build from the config, the planner's among them, holds
    what a load from the weights holds."""
    kept = set()
    if dtype == torch.float16:
        kept |= set(getattr(hf_model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        kept |= set(getattr(hf_model, "_keep_in_fp32_modules_strict", None) or ())
    for name, param in hf_model.named_parameters():
        if kept.intersection(name.split(".")):
            param.data = param.data.float()
    return hf_model


def check_lora_targets(hf_model: nn.Module, targets: Sequence[str] | None, what: str) -> None:
    """Refuse LoRA targets (peft's matching: a module's name or its last dotted parts) that name
    the output head, whose weight the chunked loss reads directly, or a layer whose weight is
    tied to another (embeddings and a tied head), which a merged export could not fold an
    adapter into without changing the other layer too."""
    if targets is None:
        return
    head = hf_model.get_output_embeddings()
    owners: dict[int, list[str]] = {}
    for name, module in hf_model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    for name, module in hf_model.named_modules():
        target = next((t for t in targets if name == t or name.endswith(f".{t}")), None)
        if target is None:
            continue
        if module is head:
            raise ConfigError(
                f"--lora_target_modules {target}: {name} is {what}'s output head, which takes no "
                "adapter here (the loss reads its weight directly); drop it: the default adapts "
                "every linear layer but the head"
            )
        sharing = owners.get(id(getattr(module, "weight", None)), [])
        if len(sharing) > 1:
            others = _few([n for n in sharing if n != name])
            raise ConfigError(
                f"--lora_target_modules {target}: {name} shares its weight with {others} "
                f"(tied embeddings in {what}), so a merged export would change both; drop it"
            )


# The dtype each --mixed_precision computes in: a quantised model's compute dtype.
COMPUTE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Quantisation:
    """How a folder's frozen weights are stored while LoRA adapters train on them (bitsandbytes):
    4-bit NF4 with double quantisation (QLoRA) or 8-bit LLM.int8, computed in `compute_dtype`
    (--mixed_precision's)."""

    bits: int  # 4 or 8
    compute_dtype: torch.dtype

    @classmethod
    def of(cls, quantisation: str | None, mixed_precision: str) -> Quantisation | None:
        """From ModelConfig.quantisation ("4bit", "8bit", None) and --mixed_precision."""
        if quantisation is None:
            return None
        return cls(int(quantisation.removesuffix("bit")), COMPUTE_DTYPES[mixed_precision])

    @property
    def flag(self) -> str:
        return f"--load_in_{self.bits}bit"

    @property
    def settings(self) -> dict[str, Any]:
        """What decides the stored weights (resume compares it; the export notes it)."""
        if self.bits == 4:
            return {"bits": 4, "quant_type": "nf4", "double_quant": True}
        return {"bits": 8, "int8_threshold": 6.0}

    def bnb_config(self, transformers):
        """transformers' BitsAndBytesConfig for these settings."""
        if self.bits == 4:
            return transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=self.compute_dtype,
            )
        return transformers.BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=self.settings["int8_threshold"]
        )


def rank_device() -> torch.device:
    """Where this rank computes: its CUDA device (LOCAL_RANK, as torchrun and accelerate set
    it), else the CPU; a quantised model is loaded straight there."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def load_model_folder(
    path: Path | str,
    *,
    from_scratch: bool = False,
    grad_checkpointing: bool = False,
    document_masking: bool = True,
    quantisation: Quantisation | None = None,
    loss_chunk_tokens: int = 4096,
    dtype: torch.dtype = torch.float32,
) -> HFCausalLM:
    """The causal LM in `path`, wrapped in `HFCausalLM` (see the module docstring): in `dtype`
    (fp32, or a LoRA run's frozen base in its compute dtype), or with `quantisation` its linear
    layers quantised on this rank's device (see `_load_quantised`)."""
    folder = check_model_folder(path)
    config = read_folder_config(folder)
    if config.is_encoder_decoder:
        raise ConfigError(
            f"--model {folder} is an encoder-decoder ({config.model_type}); this trainer's "
            "causal-LM path needs a decoder-only model"
        )
    if quantisation is None:
        hf_model = build_hf_model(
            "AutoModelForCausalLM", folder, config, from_scratch=from_scratch, dtype=dtype
        )
    else:
        hf_model = _load_quantised(folder, config, quantisation, from_scratch)
    if from_scratch:
        log.info("%s: random initialisation from config.json", folder)
    if grad_checkpointing:
        # This also makes the embedding output require grad (transformers'
        # enable_input_require_grads, the input-grad step of peft's k-bit preparation), so a
        # checkpointed block whose only trainable weights are adapters still gets gradients.
        hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    hf_model.config.use_cache = False
    # from_pretrained returns eval mode: dropout would stay off until the first eval switched it
    # on, and a resumed run would then differ from an uninterrupted one.
    hf_model.train()
    return HFCausalLM(
        hf_model, document_masking=document_masking, loss_chunk_tokens=loss_chunk_tokens
    )


def _load_quantised(folder: Path, config, quantisation: Quantisation, from_scratch: bool):
    """The folder's model with its linear layers (not the output head) quantised by
    bitsandbytes, loaded onto this rank's device.

    What is kept in which dtype, for memory: the quantised layers as 4-bit (NF4, with their
    scales double-quantised) or int8 codes; everything else (embeddings, output head, norms) in
    the compute dtype: all of it is frozen, so unlike peft's `prepare_model_for_kbit_training`
    nothing is upcast to fp32 (that would double the embedding and head of a 7B model). Only the
    LoRA adapters, added later, are fp32: they are the master weights the optimizer updates.
    """
    if from_scratch:
        raise ConfigError(
            f"{quantisation.flag} quantises the folder's own weights; it cannot start from "
            f"scratch: drop --from_scratch (or {quantisation.flag})"
        )
    transformers = _transformers()
    bnb = require_extra_offline("bitsandbytes", "qlora", quantisation.flag)
    hf_model = build_hf_model(
        "AutoModelForCausalLM",
        folder,
        config,
        from_scratch=False,
        quantization=quantisation.bnb_config(transformers),
        dtype=quantisation.compute_dtype,
        device_map={"": rank_device()},
    )
    for module in hf_model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place for a
            # bf16 inference kernel the first time it runs in eval mode without gradients. That
            # kernel has no backward (training after an eval would get wrong gradients) and
            # computes in bf16 whatever the compute dtype: every pass takes the one
            # dequantise-and-matmul path instead, so eval and training compute alike.
            module.support_avx512bf16_for_cpu = False
    return hf_model


class HFWrapper(nn.Module):
    """What every wrapper of a `transformers` model (`self.hf_model`) shares: its config,
    embedding rows and the parts of the planner's ModelShape that read the same everywhere
    (subclasses give `n_layers` and `d_ff`, which architectures spell differently)."""

    # Set by a quantised kind's planner shape (models/hf_causal.py); never on a built model.
    quantised_weights: QuantisedWeights | None = None

    def half_precision_param_count(self) -> int:
        """Parameters kept in bf16/fp16: a LoRA run's frozen base (see the planner's
        ModelShape)."""
        return sum(
            p.numel() for p in self.parameters() if p.is_floating_point() and p.element_size() == 2
        )

    def loss_head_parameters(self) -> list[nn.Parameter]:
        """What the forward reads outside the owning module's forward: the output head's
        parameters, which the chunked loss multiplies by the hidden states (ZeRO-3 gathers them
        for the whole forward, trainer_low_mem/zero3.py)."""
        head = self.hf_model.get_output_embeddings()
        return list(head.parameters()) if isinstance(head, nn.Linear) else []

    @property
    def config(self):
        return self.hf_model.config

    @property
    def vocab_rows(self) -> int:
        """Rows of the input embedding: the largest token id the model accepts, plus one."""
        return int(self.hf_model.get_input_embeddings().weight.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def vocab_size(self) -> int:
        return self.vocab_rows

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def trainable_param_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class HFCausalLM(HFWrapper):
    """A `transformers` causal LM with the forward contract of `trainer_low_mem.model`."""

    def __init__(
        self, hf_model: nn.Module, document_masking: bool = True, loss_chunk_tokens: int = 4096
    ) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.document_masking = document_masking
        self.loss_chunk_tokens = loss_chunk_tokens
        self.loss_path, self.loss_path_reason = self._choose_loss_path()

    # -- shape facts (read by the planner and the dataset check) ----------------------------
    # The planner's ModelShape: decoder dimensions (config names, mapped by transformers for
    # architectures that spell them otherwise) and parameter counts.
    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def d_ff(self) -> int:
        return int(getattr(self.config, "intermediate_size", None) or 4 * self.d_model)

    # -- loss path -------------------------------------------------------------------------
    def _head_and_backbone(self) -> tuple[nn.Linear | None, nn.Module | None]:
        head = self.hf_model.get_output_embeddings()
        backbone = getattr(self.hf_model, "base_model", None)
        if not isinstance(head, nn.Linear) or backbone is self.hf_model:
            return None, None
        return head, backbone

    def _logit_map(self) -> LogitMap:
        """The elementwise post-processing of `_LOGIT_POSTPROCESSING` as transformers applies
        it: logits * logit_scale / logits_scaling, then final_logit_softcapping's
        cap * tanh(x / cap)."""
        c = self.config
        scale = float(getattr(c, "logit_scale", None) or 1.0)
        scale /= float(getattr(c, "logits_scaling", None) or 1.0)
        cap = getattr(c, "final_logit_softcapping", None)
        return LogitMap(scale=scale, softcap=float(cap) if cap else None)

    def _choose_loss_path(self) -> tuple[str, str]:
        head, backbone = self._head_and_backbone()
        if head is None:
            return "logits", (
                "the output layer is not a linear layer, so its post-processing is not known to be "
                "per position: the model's own logits at every position"
            )
        mapped = [
            a for a in _LOGIT_POSTPROCESSING if getattr(self.config, a, None) not in (None, 1.0)
        ]
        what = "labelled hidden states x output layer" + (
            f", then {', '.join(mapped)} elementwise" if mapped else ""
        )
        if any(p.is_meta for p in self.hf_model.parameters()):
            return "chunked", f"{what} (not checked on meta weights)"
        ids = torch.arange(8, device=head.weight.device).remainder(self.vocab_rows)[None]
        was_training = self.hf_model.training
        self.hf_model.eval()
        try:
            with torch.no_grad():
                chunked = self._chunked_loss(ids, None, ids)[0]
                full = self._logits_loss(ids, None, ids)[0]
        finally:
            self.hf_model.train(was_training)
        if not torch.allclose(chunked, full, rtol=1e-4, atol=1e-4):
            return "logits", (
                f"{what} gave loss {chunked.item():.6f} but the model's own logits "
                f"{full.item():.6f}, so it post-processes them in a way not known to be per "
                "position: the model's own logits at every position"
            )
        return "chunked", f"{what}, a chunk of labelled positions at a time"

    def _inputs(self, input_ids, position_ids) -> dict:
        """The forward's inputs: with document masking, what keeps packed samples apart for
        this model's attention (`sample_isolation`; flash-attention takes the batch as one
        row, so outputs may come back as (1, B * L, ...))."""
        if position_ids is None:
            return {"input_ids": input_ids}
        if not self.document_masking:
            # An explicit all-ones padding mask: transformers would otherwise read packed rows off
            # the position ids and mask across documents by itself.
            return {
                "input_ids": input_ids,
                "position_ids": position_ids,
                "attention_mask": torch.ones_like(input_ids),
            }
        dtype = self.hf_model.get_input_embeddings().weight.dtype
        attn = str(self.config._attn_implementation)
        return sample_isolation(input_ids, position_ids, attn, dtype)

    def _chunked_loss(self, input_ids, position_ids, labels):
        head, backbone = self._head_and_backbone()
        hidden = backbone(
            use_cache=False, **self._inputs(input_ids, position_ids)
        ).last_hidden_state
        return chunked_cross_entropy(
            hidden,
            head.weight,
            shift_labels(labels),
            self.loss_chunk_tokens,
            bias=head.bias,
            logit_map=self._logit_map(),
        )

    def _logits_loss(self, input_ids, position_ids, labels):
        logits = self.hf_model(use_cache=False, **self._inputs(input_ids, position_ids)).logits
        targets = shift_labels(labels).reshape(-1)
        n_loss_tokens = (targets != IGNORE_INDEX).sum()
        loss_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss_sum / n_loss_tokens.clamp(min=1), n_loss_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Run the wrapped model; loss when labels are given, logits otherwise."""
        if labels is None:
            logits = self.hf_model(use_cache=False, **self._inputs(input_ids, position_ids)).logits
            return ModelOutput(
                loss=None, n_loss_tokens=None, logits=logits.view(*input_ids.shape, -1)
            )
        if self.loss_path == "chunked":
            loss, n_loss_tokens = self._chunked_loss(input_ids, position_ids, labels)
        else:
            loss, n_loss_tokens = self._logits_loss(input_ids, position_ids, labels)
        return ModelOutput(loss=loss, n_loss_tokens=n_loss_tokens, logits=None)
