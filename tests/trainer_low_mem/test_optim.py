"""Optimizer parameter groups: matrices decay, 1-D parameters do not, and no group is empty."""

from __future__ import annotations

import torch

from trainer_low_mem.config import ModelConfig, OptimConfig
from trainer_low_mem.models import resolve_model_kind
from trainer_low_mem.optim import build_scheduler, param_groups


def test_a_full_model_has_a_decay_and_a_no_decay_group():
    model = resolve_model_kind(ModelConfig(model_preset="tiny")).build(
        259, document_masking=False, weights=False
    )
    groups = param_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_lora_trains_matrices_only_so_its_one_group_matches_the_schedule():
    kind = resolve_model_kind(ModelConfig(model_preset="tiny", lora_rank=4))
    model = kind.build(259, document_masking=False, weights=False)
    groups = param_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1]  # no empty no-decay group
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = build_scheduler(optimizer, OptimConfig(warmup_steps=1), total_steps=4)
    optimizer.step()
    scheduler.step()
    assert len(scheduler.get_last_lr()) == len(optimizer.param_groups) == 1
