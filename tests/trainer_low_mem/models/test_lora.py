"""LoRA: only the adapters train, and merging them changes no output."""

from __future__ import annotations

import sys

import pytest
import torch

from lowmem_core.errors import ConfigError
from trainer_low_mem.config import LoraSettings
from trainer_low_mem.export import merged_state_dict
from trainer_low_mem.model import build_model
from trainer_low_mem.models import is_adapter, trainable_parameter_count
from trainer_low_mem.models.builtin import PresetKind
from trainer_low_mem.models.lora import LoraKind

pytest.importorskip("peft")
RANK_4 = LoraSettings(4, 8.0, 0.0, None)


def _tiny_with_adapters(settings: LoraSettings = RANK_4):
    model = build_model("tiny")
    LoraKind(PresetKind("tiny", grad_checkpointing=False), settings).add_adapters(model)
    return model


def test_only_adapters_train_and_frozen_weights_stay_bit_equal():
    torch.manual_seed(0)
    model = _tiny_with_adapters()
    trainable, total = trainable_parameter_count(model)
    # rank 4 on qkv (64->192), attention out (64->64), gate and up (64->256), down (256->64)
    per_layer = 4 * ((64 + 192) + (64 + 64) + 2 * (64 + 256) + (256 + 64))
    assert trainable == 2 * per_layer
    assert total == trainable + build_model("tiny").preset.param_count()
    assert all(p.requires_grad == is_adapter(n) for n, p in model.named_parameters())
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 259, (2, 32), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert sum(s["exp_avg"].numel() for s in optimizer.state.values()) == trainable


def test_merging_folds_adapters_in_under_the_plain_names():
    torch.manual_seed(0)
    model = _tiny_with_adapters().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(2))
    before = model(ids).logits
    merged = merged_state_dict(model)
    plain = build_model("tiny").eval()
    assert merged.keys() == plain.state_dict().keys()
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(ids).logits, before, rtol=1e-4, atol=1e-5)


def test_unknown_target_modules_name_the_problem():
    with pytest.raises(ConfigError, match="do not match the model's layers"):
        _tiny_with_adapters(LoraSettings(4, 8.0, 0.0, ("no_such_layer",)))


def test_without_peft_installed_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what an environment without peft looks like
    with pytest.raises(ConfigError, match=r"lowmem-pipeline\[lora\]"):
        _tiny_with_adapters()
