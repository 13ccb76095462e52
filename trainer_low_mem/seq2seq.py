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
Without position ids a row is one pair. pipeline/pairs.py fills these batches and
pipeline/batch_spec.py's `PairRows` sizes them (the planner traces its example batches).
"""

from __future__ import annotations

import torch
from torch import nn

from lowmem_core.errors import ConfigError, require_extra
from trainer_low_mem.hf_model import (
    HFWrapper,
    _transformers,
    build_hf_model,
    check_model_folder,
    read_folder_config,
)
from trainer_low_mem.loss import chunked_cross_entropy, gathered_logits_cross_entropy
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
    dtype: torch.dtype = torch.float32,
) -> Seq2SeqLM:
    """The encoder-decoder model in `path`, in `dtype` (fp32, or a LoRA run's frozen base in its
    compute dtype), wrapped in `Seq2SeqLM`."""
    folder = check_model_folder(path)
    config = read_folder_config(folder)
    if not config.is_encoder_decoder:
        raise ConfigError(f"--model {folder} is not an encoder-decoder ({config.model_type})")
    hf_model = build_hf_model(
        "AutoModelForSeq2SeqLM", folder, config, from_scratch=from_scratch, dtype=dtype
    )
    if grad_checkpointing:
        hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    hf_model.config.use_cache = False
    # from_pretrained returns eval mode; train mode from the start, so dropout is on from step 1
    # whether or not an eval ran first (a resumed run must train as the straight run did).
    hf_model.train()
    return Seq2SeqLM(hf_model, loss_chunk_tokens=loss_chunk_tokens)


class Seq2SeqLM(HFWrapper):
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
        self.chunked = isinstance(hf_model.get_output_embeddings(), nn.Linear)

    # The planner's ModelShape (config names mapped by transformers: d_model, num_layers, ...).
    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers) + int(
            getattr(self.config, "num_decoder_layers", None) or self.config.num_hidden_layers
        )

    @property
    def d_ff(self) -> int:
        c = self.config
        return int(getattr(c, "d_ff", None) or getattr(c, "encoder_ffn_dim", 4 * self.d_model))

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
        position_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        if decoder_input_ids is None:
            raise ConfigError(
                "an encoder-decoder takes decoder_input_ids: feed it batches of "
                "pipeline.batch_spec.PairRows (a prompt/response dataset built with --sft)"
            )
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(
                input_ids
            )
        if decoder_position_ids is None:
            decoder_position_ids = torch.arange(
                decoder_input_ids.shape[1], device=input_ids.device
            ).expand_as(decoder_input_ids)
        hidden = self.decoder_hidden(
            input_ids, position_ids, decoder_input_ids, decoder_position_ids
        )
        hidden = hidden * self.head_scale if self.head_scale != 1.0 else hidden
        head = self.hf_model.get_output_embeddings()
        if labels is None:
            return ModelOutput(loss=None, n_loss_tokens=None, logits=head(hidden))
        if self.chunked:
            loss, count = chunked_cross_entropy(
                hidden, head.weight, labels, self.loss_chunk_tokens, bias=head.bias
            )
        else:
            loss, count = gathered_logits_cross_entropy(hidden, head, labels)
        return ModelOutput(loss=loss, n_loss_tokens=count, logits=None)


def write_sample_t5(out, vocab_size: int = 384, d_model: int = 32, seed: int = 0):
    """A tiny T5 folder made locally (no download): a byte-level BPE tokenizer trained on the
    sample corpus (<pad> 0 = decoder start, </s> 1, <unk> 2; no BOS, as T5's) and seeded weights.
    The stand-in for a user's encoder-decoder in the tests and `bench.pairs_speed`."""
    from pipeline.sample_corpus import generate_documents

    transformers = _transformers()
    tokenizers = require_extra("tokenizers", "tokenizers", "training the sample tokenizer")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(generate_documents(300, seed=seed + 3), trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(out)
    config = transformers.T5Config(
        vocab_size=fast.vocab_size,
        d_model=d_model,
        d_kv=max(d_model // 4, 1),  # 4 heads spanning d_model, as T5 checkpoints are shaped
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    transformers.T5ForConditionalGeneration(config).save_pretrained(out)
    return out
