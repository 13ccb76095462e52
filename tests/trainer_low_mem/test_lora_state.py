"""A LoRA run's training state holds what training changes (the adapters, their optimizer
state, the data position), not the frozen base: the base is read again from the model folder at
resume, and a base that changed is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from lowmem_core.errors import CheckpointError
from trainer_low_mem import loop
from trainer_low_mem.cli import parse_job_config
from trainer_low_mem.sample_model import write_sample_model

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory, build_sample_sft) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_state")
    return build_sample_sft(root, write_sample_model(root / "model"), num_train=96, num_eval=4)


def _config(inputs: dict[str, Path], out: Path, *extra: str, model: Path | None = None):
    return parse_job_config(
        [
            "--model",
            str(model or inputs["model"]),
            "--data",
            str(inputs["train_data"]),
            "--output_dir",
            str(out),
            "--lora_rank",
            "4",
            "--max_seq_len",
            "128",
            "--global_batch",
            "4",
            "--max_steps",
            "4",
            "--lr",
            "3e-3",
            "--warmup_steps",
            "1",
            "--num_readers",
            "1",
            "--progress_bar=False",
            *extra,
        ]
    )


def test_the_state_holds_the_adapters_and_resumes_bit_equal(
    lora_inputs, tmp_path, monkeypatch, stop_after_step
):
    straight = loop.train(_config(lora_inputs, tmp_path / "straight"))
    with monkeypatch.context() as patch:
        stop_after_step(patch, 2)
        first = loop.train(_config(lora_inputs, tmp_path / "run"))
    assert first.final_step == 2
    weights = tmp_path / "run" / "train_latest_state" / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in name for name in names)  # no copy of the frozen base
    resumed = loop.train(_config(lora_inputs, tmp_path / "run", "--is_keep_training=True"))
    assert first.losses + resumed.losses == straight.losses  # exact float equality


def test_a_changed_base_is_refused_at_resume(lora_inputs, tmp_path, monkeypatch, stop_after_step):
    base = write_sample_model(tmp_path / "base", seed=0)
    with monkeypatch.context() as patch:
        stop_after_step(patch, 2)
        loop.train(_config(lora_inputs, tmp_path / "run", model=base))
    write_sample_model(tmp_path / "base", seed=1)  # same architecture, other weights
    with pytest.raises(CheckpointError, match="frozen weights it trained on .* --model or"):
        loop.train(_config(lora_inputs, tmp_path / "run", "--is_keep_training=True", model=base))
