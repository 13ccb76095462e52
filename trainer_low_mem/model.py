"""The model: a decoder-only transformer in plain torch, its presets, and its FLOPs count.

Read top to bottom: presets, building blocks (RMSNorm, rotary positions, attention, MLP), then
the model; its loss is trainer_low_mem/loss.py.

Forward contract, shared by `DecoderLM` and the Hugging Face adapter:

    out = model(input_ids, position_ids=None, labels=None)
    input_ids     int64 [B, L] token ids
    position_ids  int64 [B, L], 0 at each row start and each document start (packed rows);
                  0..L-1 when None
    labels        int64 [B, L], UNSHIFTED: labels[b, t] is the token at position t, -100 where the
                  token is not to be predicted. The model shifts them, so position t is scored on
                  labels[b, t + 1].
    out.loss          fp32 scalar: mean cross-entropy over the counted targets (0.0 when none)
    out.n_loss_tokens int64 scalar: number of counted targets, so `loss * n_loss_tokens` is the
                      summed loss a caller needs for an exact mean over ranks and micro-batches
    out.logits        [B, L, vocab_size], only when labels is None

Attention: by default causal over the whole row (a packed document can attend to the documents
before it; its rotary positions restart at 0), which keeps the fused causal SDPA kernel. With
`document_masking=True` (SFT, eval) attention is block-diagonal: a document sees only itself.

The built-in model uses only deterministic CPU kernels and no dropout, so two CPU runs from the
same weights and data produce bit-identical losses and gradients (exact-resume tests rely on it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowmem_core.errors import ConfigError
from trainer_low_mem.loss import chunked_cross_entropy, shift_labels

ROPE_BASE = 10_000.0


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPreset:
    """The shape of a `DecoderLM`. Embeddings are tied to the LM head; linear layers have no
    bias."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    # The planner's ModelShape: a preset is never quantised and holds no bf16/fp16 weights.
    quantised_weights: ClassVar[None] = None

    def half_precision_param_count(self) -> int:
        return 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model {name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}; "
                "choose n_heads dividing d_model"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(
                f"head size d_model/n_heads = {self.head_dim} is odd but rotary positions need it "
                "even; change d_model or n_heads"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    def with_vocab(self, vocab_size: int) -> ModelPreset:
        """The same shape with another vocabulary (e.g. 259 for byte-tokenised data)."""
        return dataclasses.replace(self, vocab_size=vocab_size)

    def param_count(self) -> int:
        """Exact number of parameters of the built model (tied head counted once)."""
        d = self.d_model
        per_layer = 4 * d * d + 3 * d * self.d_ff + 2 * d  # qkv + out proj, SwiGLU MLP, two norms
        return self.vocab_size * d + self.n_layers * per_layer + d  # embedding, blocks, final norm

    def trainable_param_count(self) -> int:
        """Parameters trained when the whole model trains: all (the planner's ModelShape)."""
        return self.param_count()

    def matmul_param_count(self) -> int:
        """Parameters that take part in a matmul per token: all linear layers plus the LM head."""
        d = self.d_model
        return self.n_layers * (4 * d * d + 3 * d * self.d_ff) + self.vocab_size * d


MODEL_PRESETS: dict[str, ModelPreset] = {
    # Tests and CPU demos; the vocabulary fits the built-in byte tokenizer.
    "tiny": ModelPreset(
        vocab_size=259, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=512
    ),
    # The reference size (about 42M parameters with a 32k vocabulary).
    "small": ModelPreset(
        vocab_size=32000, d_model=512, n_layers=6, n_heads=8, d_ff=2048, max_seq_len=2048
    ),
    # About 341M parameters (d_ff about 2/3 of 4 d_model, as gated MLPs use).
    "medium": ModelPreset(
        vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, d_ff=2816, max_seq_len=2048
    ),
    # About 0.99B parameters.
    "large": ModelPreset(
        vocab_size=32000, d_model=2048, n_layers=18, n_heads=16, d_ff=5632, max_seq_len=2048
    ),
}


def resolve_preset(
    preset_name_or_preset: str | ModelPreset, vocab_size: int | None = None
) -> ModelPreset:
    """A preset by name (or as given), with its vocabulary replaced when `vocab_size` is set."""
    if isinstance(preset_name_or_preset, ModelPreset):
        preset = preset_name_or_preset
    else:
        if preset_name_or_preset not in MODEL_PRESETS:
            raise ConfigError(
                f"unknown model preset {preset_name_or_preset!r}; choose one of "
                f"{', '.join(MODEL_PRESETS)}"
            )
        preset = MODEL_PRESETS[preset_name_or_preset]
    return preset if vocab_size is None else preset.with_vocab(vocab_size)


def model_flops_per_token(preset: ModelPreset, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) for model FLOPs utilisation.

    6 x the matmul parameters (2 FLOPs per multiply-add, forward + 2x backward) plus the attention
    scores and their weighted sum, 12 x n_layers x d_model x seq_len. The attention term counts the
    full L x L score matrix, not its causal half: the convention of the PaLM paper's MFU and of
    most published MFU numbers, so ours compare with theirs.
    """
    return 6.0 * preset.matmul_param_count() + 12.0 * preset.n_layers * preset.d_model * seq_len


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain; statistics in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each fp32 [B, 1, L, head_dim // 2].

    Computed from the position ids at every call (a few thousand multiplies) rather than read from
    a cached table: a table held as a buffer would be rounded to bf16 when the model is cast.
    """
    inv_freq = 1.0 / (
        ROPE_BASE
        ** (
            torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
        )
    )
    angles = position_ids[:, None, :, None].float() * inv_freq  # [B, 1, L, head_dim // 2]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head of x [B, H, L, head_dim] by the position angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L]: query t may attend key s when s <= t and both are in the same document.

    Documents are read off the position ids: a new one starts wherever the position is 0.
    """
    doc = torch.cumsum(position_ids == 0, dim=-1)  # (B, L) document number of each position
    seq_len = position_ids.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions, through fused SDPA kernels."""

    def __init__(self, preset: ModelPreset) -> None:
        super().__init__()
        self.n_heads = preset.n_heads
        self.head_dim = preset.head_dim
        self.qkv = nn.Linear(preset.d_model, 3 * preset.d_model, bias=False)
        self.proj = nn.Linear(preset.d_model, preset.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, seq_len, d_model = x.shape
        # (B, L, 3, H, hd) -> three (B, H, L, hd)
        qkv = self.qkv(x).view(batch, seq_len, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(batch, seq_len, d_model))


class MLP(nn.Module):
    """Gated feed-forward layer (SwiGLU, as in Llama): down(silu(gate(x)) * up(x))."""

    def __init__(self, preset: ModelPreset) -> None:
        super().__init__()
        self.gate = nn.Linear(preset.d_model, preset.d_ff, bias=False)
        self.up = nn.Linear(preset.d_model, preset.d_ff, bias=False)
        self.proj = nn.Linear(preset.d_ff, preset.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """One pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, preset: ModelPreset) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(preset.d_model)
        self.attn = CausalSelfAttention(preset)
        self.mlp_norm = RMSNorm(preset.d_model)
        self.mlp = MLP(preset)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class ModelOutput(NamedTuple):
    """What a forward pass returns; see the module docstring for shapes and meaning."""

    loss: torch.Tensor | None
    n_loss_tokens: torch.Tensor | None
    logits: torch.Tensor | None


class DecoderLM(nn.Module):
    """Token embedding, `n_layers` pre-norm blocks, a final RMSNorm and the tied LM head."""

    def __init__(
        self,
        preset: ModelPreset,
        grad_checkpointing: bool = False,
        loss_chunk_tokens: int = 4096,
        document_masking: bool = False,
    ) -> None:
        super().__init__()
        if loss_chunk_tokens <= 0:
            raise ConfigError(f"loss_chunk_tokens must be positive, got {loss_chunk_tokens}")
        self.preset = preset
        self.grad_checkpointing = grad_checkpointing
        # True: packed documents do not attend to each other (SFT, eval); False keeps the fused
        # causal kernel, and documents see the ones before them in their row (pretraining).
        self.document_masking = document_masking
        self.loss_chunk_tokens = loss_chunk_tokens
        self.embed = nn.Embedding(preset.vocab_size, preset.d_model)
        self.blocks = nn.ModuleList(Block(preset) for _ in range(preset.n_layers))
        self.norm = RMSNorm(preset.d_model)
        self.reset_parameters()

    @property
    def max_seq_len(self) -> int:
        """Longest row the model accepts."""
        return self.preset.max_seq_len

    def loss_head_parameters(self) -> list[nn.Parameter]:
        """What the forward reads outside the owning module's forward: the tied head's weight,
        which the chunked loss multiplies by the hidden states (ZeRO-3 gathers it for the whole
        forward, trainer_low_mem/zero3.py)."""
        return [self.embed.weight]

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual out-projections scaled by 1/sqrt(2 n_layers)."""
        residual_std = 0.02 / math.sqrt(2 * self.preset.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(param, mean=0.0, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Run the model; loss when labels are given, logits otherwise (see module docstring)."""
        batch, seq_len = input_ids.shape
        if seq_len > self.preset.max_seq_len:
            raise ConfigError(
                f"rows of {seq_len} tokens exceed the model's max_seq_len "
                f"{self.preset.max_seq_len}; lower --max_seq_len to at most "
                f"{self.preset.max_seq_len}"
            )
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        cos, sin = rotary_cos_sin(position_ids, self.preset.head_dim)
        mask = document_causal_mask(position_ids) if self.document_masking else None
        x = self.embed(input_ids)  # (B, L, d)
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask)
        hidden = self.norm(x)
        if labels is None:
            return ModelOutput(
                loss=None, n_loss_tokens=None, logits=F.linear(hidden, self.embed.weight)
            )
        loss, n_loss_tokens = chunked_cross_entropy(
            hidden, self.embed.weight, shift_labels(labels), self.loss_chunk_tokens
        )
        return ModelOutput(loss=loss, n_loss_tokens=n_loss_tokens, logits=None)


def build_model(
    preset_name_or_preset: str | ModelPreset,
    vocab_size: int | None = None,
    grad_checkpointing: bool = False,
    document_masking: bool = False,
) -> DecoderLM:
    """A freshly initialised `DecoderLM` (seed torch first for reproducible weights)."""
    return DecoderLM(
        resolve_preset(preset_name_or_preset, vocab_size),
        grad_checkpointing=grad_checkpointing,
        document_masking=document_masking,
    )
