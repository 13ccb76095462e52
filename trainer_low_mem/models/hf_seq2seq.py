"""A Hugging Face encoder-decoder folder (T5, mT5, BART-style) as a model kind: prompt/response
pairs packed into encoder and decoder rows, `Seq2SeqLM` (trainer_low_mem/seq2seq.py) as its
module."""

from __future__ import annotations

import contextlib

from lowmem_core.errors import ConfigError
from pipeline.batch_spec import PairRows
from trainer_low_mem.hf_model import check_lora_targets
from trainer_low_mem.models.hf_folder import HFFolderKind
from trainer_low_mem.models.kind import AdapterHost, DataFacts
from trainer_low_mem.seq2seq import Seq2SeqLM, load_seq2seq_folder


class Seq2SeqKind(HFFolderKind):
    peft_task_type = "SEQ_2_SEQ_LM"  # peft's T5 targets: q k v o

    def __init__(self, folder, config, *, lora_targets=None, **settings) -> None:
        super().__init__(folder, config, **settings)
        self.lora_targets = lora_targets  # the layers --lora_target_modules names, if any

    @property
    def start_id(self) -> int:
        """The decoder start token (T5: the pad token)."""
        start = self.config.decoder_start_token_id
        return int(start if start is not None else self.config.pad_token_id)

    def check_data(self, data: DataFacts) -> None:
        if not data.is_sft:
            raise ConfigError(
                f"{self.what} is an encoder-decoder and trains on prompt/response pairs, but "
                f"--data {data.path} is plain text; build it with `python -m pipeline build --sft`"
            )
        super().check_data(data)

    def batch_spec(self, dataset, seq_len, packing, saved_loader_state) -> PairRows:
        return PairRows.for_dataset(dataset, seq_len, self.start_id, saved_loader_state)

    def load(self, *, weights: bool, document_masking: bool, quantised: bool) -> Seq2SeqLM:
        # Pairs are always kept apart (block-diagonal masks), and nothing is quantised.
        return load_seq2seq_folder(
            self.folder,
            from_scratch=self.from_scratch or not weights,
            grad_checkpointing=self.grad_checkpointing,
            dtype=self.base_dtype,
        )

    def adapter_host(self, module: Seq2SeqLM) -> AdapterHost:
        check_lora_targets(module.hf_model, self.lora_targets, self.what)
        return super().adapter_host(module)

    def describe(self, module: Seq2SeqLM) -> str:
        return (
            f"{self.folder} ({self.config.model_type}, {self._source()}; "
            "loss: encoder-decoder, packed pairs)"
        )

    def eval_mode(self, module: Seq2SeqLM):
        return contextlib.nullcontext()  # pairs never attend to each other, in training too
