"""Optimizer parameter groups: matrices decay, 1-D parameters do not, and no group is empty;
bitsandbytes' 8-bit AdamW takes the same groups, its states are counted exactly by the planner
and restored exactly at resume."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_core.errors import ConfigError
from trainer_low_mem import loop
from trainer_low_mem.cli import parse_job_config
from trainer_low_mem.config import ModelConfig, OptimConfig
from trainer_low_mem.models import resolve_model_kind
from trainer_low_mem.optim import build_optimizer, build_scheduler, param_groups
from trainer_low_mem.planner.optimizer_states import MIN_8BIT_SIZE, adamw_8bit_state_bytes


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


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return resolve_model_kind(ModelConfig(model_preset="tiny")).build(
        259, document_masking=False, weights=True
    )


def test_adamw_8bit_takes_the_same_groups_betas_and_decay_rules():
    bnb = pytest.importorskip("bitsandbytes")
    model = _tiny_model()
    o = OptimConfig(lr=2e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95)
    optimizer = build_optimizer(model, o, cpu_offload=False, optimizer="adamw_8bit")
    reference = build_optimizer(model, o, cpu_offload=False, optimizer="adamw")
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    assert isinstance(reference, torch.optim.AdamW)
    for mine, theirs in zip(optimizer.param_groups, reference.param_groups, strict=True):
        assert [id(p) for p in mine["params"]] == [id(p) for p in theirs["params"]]
        for key in ("lr", "betas", "weight_decay", "eps"):
            assert mine[key] == theirs[key]


def test_adamw_8bit_states_are_counted_exactly_by_the_planner():
    pytest.importorskip("bitsandbytes")
    model = _tiny_model()
    optimizer = build_optimizer(model, OptimConfig(), cpu_offload=False, optimizer="adamw_8bit")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    storages = {
        id(t.untyped_storage()): t.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    }
    numels = [p.numel() for p in model.parameters()]
    assert any(n < MIN_8BIT_SIZE for n in numels) and any(n >= MIN_8BIT_SIZE for n in numels)
    assert sum(storages.values()) == adamw_8bit_state_bytes(numels)


def test_adamw_8bit_without_bitsandbytes_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(ConfigError) as info:
        build_optimizer(_tiny_model(), OptimConfig(), cpu_offload=False, optimizer="adamw_8bit")
    assert str(info.value) == (
        "--optimizer adamw_8bit needs the `bitsandbytes` package: "
        "pip install 'lowmem-pipeline[qlora]'"
    )


def _run(data: Path, out: Path, *extra: str):
    flags = ["--data", str(data), "--output_dir", str(out), "--model_preset", "tiny"]
    flags += ["--max_seq_len", "64", "--auto_plan=False", "--batch_size_per_gpu", "4"]
    flags += ["--gradient_accumulation_steps", "2", "--max_steps", "6", "--lr", "3e-3"]
    flags += ["--warmup_steps", "2", "--save_every", "0", "--progress_bar=False"]
    flags += ["--num_readers", "1", "--optimizer", "adamw_8bit", *extra]
    return loop.train(parse_job_config(flags))


@pytest.mark.slow  # three short CPU runs: about 40 s on two cores
def test_adamw_8bit_resume_is_bit_exact(tmp_path, sample_dataset_dir, monkeypatch):
    pytest.importorskip("bitsandbytes")
    straight = _run(sample_dataset_dir, tmp_path / "straight")
    assert straight.plan["optimizer"] == "adamw_8bit"
    original = loop._Run._train_step

    def train_step(self):
        outcome = original(self)
        if self.progress.step + 1 == 3 and not isinstance(outcome, str):
            signal.raise_signal(signal.SIGTERM)
        return outcome

    with monkeypatch.context() as patch:
        patch.setattr(loop._Run, "_train_step", train_step)
        first = _run(sample_dataset_dir, tmp_path / "resumed")
    assert first.final_step == 3
    resumed = _run(sample_dataset_dir, tmp_path / "resumed", "--is_keep_training=True")
    assert first.losses + resumed.losses == straight.losses  # exact float equality
    a = load_file(str(straight.export_dir / "model.safetensors"))
    b = load_file(str(resumed.export_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
