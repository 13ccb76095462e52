"""The user's Hugging Face causal LM, from a local folder, behind the trainer's forward contract.

`load_model_folder(PATH)` builds any `AutoModelForCausalLM` architecture that `transformers`
builds offline: from the folder's weights, or from its config alone (`from_scratch`, or a folder
without weights). Nothing is downloaded: a hub name that is not a local folder is refused.

`HFCausalLM` gives it the forward contract of `trainer_low_mem.model` (unshifted labels, summed
loss and target count). The loss is the chunked cross-entropy of the backbone's last hidden state
against the output embedding, so no [B, L, vocab] fp32 logits exist; a model whose head does more
than one bias-free matmul (logit scaling or soft-capping) is detected at load by comparing both
losses on a few tokens, and then goes through its full logits instead. Packed rows never attend
across documents when `document_masking` is on: a block-diagonal causal mask built from the
position ids (flash-attention implementations take the position ids alone).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowmem_core.errors import ConfigError, require_extra
from lowmem_core.format import IGNORE_INDEX
from trainer_low_mem.loss import chunked_cross_entropy, shift_labels
from trainer_low_mem.model import ModelOutput, document_causal_mask

log = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Config attributes of architectures whose logits are more than hidden @ head.T.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _transformers():
    return require_extra("transformers", "hf", "--model")


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


def has_weights(folder: Path) -> bool:
    """True when the folder holds a weights file `from_pretrained` can load."""
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def read_folder_config(folder: Path):
    """The folder's config.json as transformers reads it, or one ConfigError saying why not."""
    transformers = _transformers()
    try:
        return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"{folder / 'config.json'} cannot be read by transformers ({first}); fix the file or "
            "save the model again with model.save_pretrained(DIR)"
        ) from None


def load_model_folder(
    path: Path | str,
    *,
    from_scratch: bool = False,
    grad_checkpointing: bool = False,
    document_masking: bool = True,
    load_in_4bit: bool = False,
    loss_chunk_tokens: int = 4096,
) -> HFCausalLM:
    """The causal LM in `path`, fp32, wrapped in `HFCausalLM` (see the module docstring)."""
    folder = check_model_folder(path)
    transformers = _transformers()
    config = read_folder_config(folder)
    if config.is_encoder_decoder:
        raise ConfigError(
            f"--model {folder} is an encoder-decoder ({config.model_type}); this trainer's "
            "causal-LM path needs a decoder-only model"
        )
    quantization = None
    if load_in_4bit:
        quantization = _four_bit_config(transformers)
    if from_scratch or not has_weights(folder):
        if load_in_4bit:
            raise ConfigError(
                "--load_in_4bit quantises existing weights; it cannot start from scratch"
            )
        hf_model = transformers.AutoModelForCausalLM.from_config(config)
        log.info("%s: random initialisation from config.json", folder)
    else:
        try:
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                folder,
                local_files_only=True,
                dtype=torch.float32,
                quantization_config=quantization,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"cannot load the weights in {folder} ({first})") from None
    if grad_checkpointing:
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


def _four_bit_config(transformers):
    if not torch.cuda.is_available():
        raise ConfigError(
            "--load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no CUDA: "
            "drop --load_in_4bit"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--load_in_4bit needs bitsandbytes: pip install bitsandbytes")
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


class HFWrapper(nn.Module):
    """What every wrapper of a `transformers` model (`self.hf_model`) shares: its config,
    embedding rows and the parts of the planner's ModelShape that read the same everywhere
    (subclasses give `n_layers` and `d_ff`, which architectures spell differently)."""

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
        if not isinstance(head, nn.Linear) or head.bias is not None or backbone is self.hf_model:
            return None, None
        return head, backbone

    def _choose_loss_path(self) -> tuple[str, str]:
        head, backbone = self._head_and_backbone()
        if head is None:
            return "logits", "the output layer is not one bias-free linear layer"
        scaled = [
            a for a in _LOGIT_POSTPROCESSING if getattr(self.config, a, None) not in (None, 1.0)
        ]
        if scaled:
            return "logits", f"the model post-processes its logits ({', '.join(scaled)})"
        if any(p.is_meta for p in self.hf_model.parameters()):
            return "chunked", "hidden states x output embedding (not checked on meta weights)"
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
                f"hidden states x output embedding gave loss {chunked.item():.6f} but the model's "
                f"own logits {full.item():.6f}"
            )
        return "chunked", "hidden states x output embedding, a chunk of tokens at a time"

    def _attention_kwargs(self, input_ids, position_ids) -> dict:
        if position_ids is None:
            return {}
        kwargs = {"position_ids": position_ids}
        if not self.document_masking:
            # An explicit all-ones padding mask: transformers would otherwise read packed rows off
            # the position ids and mask across documents by itself.
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        elif "flash" not in str(self.config._attn_implementation):
            allowed = document_causal_mask(position_ids)  # (B, 1, L, L) bool
            dtype = self.hf_model.get_input_embeddings().weight.dtype
            if not dtype.is_floating_point:
                dtype = torch.float32
            # An additive mask: eager and SDPA implementations both take it as it is.
            kwargs["attention_mask"] = torch.zeros(
                allowed.shape, dtype=dtype, device=input_ids.device
            )
            kwargs["attention_mask"].masked_fill_(~allowed, torch.finfo(dtype).min)
        return kwargs

    def _chunked_loss(self, input_ids, position_ids, labels):
        head, backbone = self._head_and_backbone()
        hidden = backbone(
            input_ids=input_ids, use_cache=False, **self._attention_kwargs(input_ids, position_ids)
        ).last_hidden_state
        return chunked_cross_entropy(
            hidden, head.weight, shift_labels(labels), self.loss_chunk_tokens
        )

    def _logits_loss(self, input_ids, position_ids, labels):
        logits = self.hf_model(
            input_ids=input_ids, use_cache=False, **self._attention_kwargs(input_ids, position_ids)
        ).logits
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
            logits = self.hf_model(
                input_ids=input_ids,
                use_cache=False,
                **self._attention_kwargs(input_ids, position_ids),
            ).logits
            return ModelOutput(loss=None, n_loss_tokens=None, logits=logits)
        if self.loss_path == "chunked":
            loss, n_loss_tokens = self._chunked_loss(input_ids, position_ids, labels)
        else:
            loss, n_loss_tokens = self._logits_loss(input_ids, position_ids, labels)
        return ModelOutput(loss=loss, n_loss_tokens=n_loss_tokens, logits=None)
