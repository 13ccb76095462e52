"""trainer_low_mem/zero3.py in one process: the model is built whole while accelerate's ZeRO-3
config is alive, and the parameters the chunked loss reads outside their module are named.
The 2-rank training runs are in test_zero3_launch.py (slow)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from trainer_low_mem import zero3
from trainer_low_mem.hf_model import HFCausalLM
from trainer_low_mem.model import MODEL_PRESETS, DecoderLM

transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

ZERO3_JSON = Path(__file__).resolve().parents[2] / "accelerate_configs" / "ds_zero3_offload.json"


def _tiny_llama(tie: bool) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def test_the_builtin_decoder_names_its_tied_head_for_the_chunked_loss():
    model = DecoderLM(MODEL_PRESETS["tiny"])
    assert [id(p) for p in model.loss_head_parameters()] == [id(model.embed.weight)]


@pytest.mark.parametrize("tie", [False, True])
def test_a_hugging_face_model_names_its_output_head(tie):
    hf = _tiny_llama(tie)
    named = HFCausalLM(hf).loss_head_parameters()
    assert [id(p) for p in named] == [id(hf.lm_head.weight)]
    assert (named[0] is hf.model.embed_tokens.weight) is tie


def test_whole_model_build_hides_zero3_from_transformers_and_restores_it():
    """accelerate keeps transformers' DeepSpeed config alive for stage 3, so from_pretrained and
    from_config would build under zero.Init (parameters empty placeholders on every rank)."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    plugin = DeepSpeedPlugin(hf_ds_config=str(ZERO3_JSON))
    plugin.set_deepspeed_weakref()  # what Accelerator() does with this plugin
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin))
    try:
        assert is_deepspeed_zero3_enabled()
        with zero3.whole_model_build(accelerator):
            assert not is_deepspeed_zero3_enabled()
            model = _tiny_llama(tie=False)
        assert is_deepspeed_zero3_enabled()
        assert not zero3.is_partitioned(model)
        assert model.lm_head.weight.shape == (64, 16)
    finally:
        unset_hf_deepspeed_config()


def test_whole_model_build_and_gathered_pass_through_without_zero3():
    model = torch.nn.Linear(3, 2)
    without_deepspeed = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=None))
    with zero3.whole_model_build(without_deepspeed), zero3.gathered(model):
        assert model.weight.shape == (2, 3)
