"""Encoder-decoder models (T5, mT5, BART-style) from a local folder, with packed pairs.

Several (prompt, response) pairs share one encoder row and one decoder row. Pair k is the k-th
segment of both rows (a segment starts where its position id is 0), and three block-diagonal
masks keep the pairs apart: encoder self-attention within a segment, causal decoder
self-attention within a segment, and cross-attention from decoder segment k to encoder segment k
only. T5's relative position bias depends only on distances inside a segment, so a packed pair
computes exactly what it computes alone.

Batch contract (int64 [B, Le] and [B, Ld]):
    input_ids, position_ids                  encoder tokens, 0 at each pair's first token
    decoder_input_ids, decoder_position_ids  decoder start token + response, 0 at each pair start
    labels                                   response + EOS aligned with the decoder positions
                                             (already shifted), -100 at padding
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowmem_core.errors import ConfigError
from lowmem_core.format import IGNORE_INDEX
from trainer_low_mem.hf_model import _transformers, check_model_folder, has_weights
from trainer_low_mem.loss import chunked_cross_entropy
from trainer_low_mem.model import ModelOutput

# Models that scale the decoder output by d_model ** -0.5 before a tied head.
_SCALED_TIED_HEAD = ("t5", "mt5", "umt5")


def _segments(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) segment number of each position; padding (position < 0) gets -1."""
    seg = torch.cumsum(position_ids == 0, dim=-1)
    return torch.where(position_ids < 0, torch.full_like(seg, -1), seg)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def packed_pair_masks(
    position_ids: torch.Tensor, decoder_position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Additive (B, 1, Lq, Lk) masks: encoder self, decoder causal self, decoder-to-encoder."""
    enc, dec = _segments(position_ids), _segments(decoder_position_ids)
    same_enc = (enc[:, :, None] == enc[:, None, :]) & (enc[:, None, :] >= 0)
    ld = dec.shape[1]
    causal = torch.ones(ld, ld, dtype=torch.bool, device=dec.device).tril()
    same_dec = (dec[:, :, None] == dec[:, None, :]) & causal & (dec[:, None, :] >= 0)
    cross = (dec[:, :, None] == enc[:, None, :]) & (enc[:, None, :] >= 0)
    # A padding query row with nothing to attend would softmax over nothing: let it see itself.
    eye_e = torch.eye(enc.shape[1], dtype=torch.bool, device=enc.device)
    eye_d = torch.eye(ld, dtype=torch.bool, device=dec.device)
    same_enc |= eye_e & (enc[:, :, None] < 0)
    same_dec |= eye_d & (dec[:, :, None] < 0)
    cross[:, :, 0] |= dec < 0
    return _additive(same_enc, dtype), _additive(same_dec, dtype), _additive(cross, dtype)


def load_seq2seq_folder(
    path,
    *,
    from_scratch: bool = False,
    grad_checkpointing: bool = False,
    loss_chunk_tokens: int = 4096,
) -> Seq2SeqLM:
    """The encoder-decoder model in `path`, fp32, wrapped in `Seq2SeqLM`."""
    folder = check_model_folder(path)
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if not getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"--model {folder} is not an encoder-decoder ({config.model_type})")
    if from_scratch or not has_weights(folder):
        hf_model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    else:
        hf_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32
        )
    if grad_checkpointing:
        hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    hf_model.config.use_cache = False
    return Seq2SeqLM(hf_model, loss_chunk_tokens=loss_chunk_tokens)


class Seq2SeqLM(nn.Module):
    """A `transformers` encoder-decoder with the packed-pair batch contract above."""

    def __init__(self, hf_model: nn.Module, loss_chunk_tokens: int = 4096) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.loss_chunk_tokens = loss_chunk_tokens
        config = hf_model.config
        # Newer transformers name the T5 rescaling `scale_decoder_outputs`; older ones tie it to
        # tie_word_embeddings.
        scaled = getattr(
            config,
            "scale_decoder_outputs",
            config.model_type in _SCALED_TIED_HEAD and config.tie_word_embeddings,
        )
        self.head_scale = config.d_model**-0.5 if scaled else 1.0
        head = hf_model.get_output_embeddings()
        self.chunked = isinstance(head, nn.Linear) and head.bias is None

    @property
    def config(self):
        return self.hf_model.config

    @property
    def vocab_rows(self) -> int:
        return int(self.hf_model.get_input_embeddings().weight.shape[0])

    def decoder_hidden(self, input_ids, position_ids, decoder_input_ids, decoder_position_ids):
        dtype = self.hf_model.get_input_embeddings().weight.dtype
        enc_mask, dec_mask, cross = packed_pair_masks(position_ids, decoder_position_ids, dtype)
        encoder = self.hf_model.get_encoder()
        decoder = self.hf_model.get_decoder()
        encoded = encoder(input_ids=input_ids, attention_mask=enc_mask).last_hidden_state
        return decoder(
            input_ids=decoder_input_ids,
            attention_mask=dec_mask,
            encoder_hidden_states=encoded,
            encoder_attention_mask=cross,
            use_cache=False,
        ).last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        decoder_position_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        hidden = self.decoder_hidden(
            input_ids, position_ids, decoder_input_ids, decoder_position_ids
        )
        hidden = hidden * self.head_scale if self.head_scale != 1.0 else hidden
        head = self.hf_model.get_output_embeddings()
        if labels is None:
            return ModelOutput(loss=None, n_loss_tokens=None, logits=head(hidden))
        if self.chunked:
            loss, count = chunked_cross_entropy(hidden, head.weight, labels, self.loss_chunk_tokens)
            return ModelOutput(loss=loss, n_loss_tokens=count, logits=None)
        targets = labels.reshape(-1)
        count = (targets != IGNORE_INDEX).sum()
        logits = head(hidden).reshape(targets.shape[0], -1).float()
        loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return ModelOutput(loss=loss_sum / count.clamp(min=1), n_loss_tokens=count, logits=None)
