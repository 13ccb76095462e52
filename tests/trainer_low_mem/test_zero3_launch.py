"""DeepSpeed ZeRO-3 on two CPU ranks through the shipped accelerate config: a built-in preset
with gradient checkpointing, the chunked loss and eval, stopped and resumed to the uninterrupted
run's losses bit for bit, its export equal to DeepSpeed's own consolidation of the saved shards;
a Hugging Face model with LoRA stopped in one line by one rank's out-of-memory error, resumed,
exported with its adapters merged, and refused a resume on another number of ranks; QLoRA with
its 4-bit base partitioned, resumed and exported dequantised. Slow: each launch starts fresh
interpreters."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
ZERO3_CONFIG = REPO / "accelerate_configs" / "zero3_offload_3gpu.yaml"
STATE = "train_latest_state"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Rank 0 writes the run's per-step losses (TrainResult.losses) to $LOSSES_FILE; with
# $STOP_AT_STEP the run receives SIGTERM once that optimizer step is done, as a user's stop does.
DRIVER = r"""
import json, os, signal, sys

from trainer_low_mem import loop
from trainer_low_mem.cli import main

stop = int(os.environ.get("STOP_AT_STEP", "0"))
train_step, run = loop._Run._train_step, loop._Run.run


def stopping_train_step(self):
    outcome = train_step(self)
    if self.progress.step + 1 == stop:
        signal.raise_signal(signal.SIGTERM)
    return outcome


def recorded_run(self):
    result = run(self)
    if self.ctx.is_main:
        with open(os.environ["LOSSES_FILE"], "w") as f:
            json.dump(result.losses, f)
    return result


loop._Run._train_step, loop._Run.run = stopping_train_step, recorded_run

# Each rank appends to $GATHER_FILE.<rank> the number of parameters each gather of the export
# holds whole at once. (These small models' parameters are all below DeepSpeed's persistence
# threshold, so the parameters' own status says nothing here: the gathers are counted.)
import deepspeed.runtime.zero as ds_zero

exporting, export = [], loop._Run._export


def recorded_export(self):
    exporting.append(True)
    try:
        return export(self)
    finally:
        exporting.clear()


class RecordedGather(ds_zero.GatheredParameters):
    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        if exporting:
            with open(f"{os.environ['GATHER_FILE']}.{os.environ['RANK']}", "a") as f:
                f.write(f"{len(list(params))}\n")


loop._Run._export, ds_zero.GatheredParameters = recorded_export, RecordedGather
sys.exit(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    tmp_path: Path, num_processes: int, out: Path, *flags: str, **env: str
) -> tuple[subprocess.CompletedProcess, list[float] | None]:
    """`accelerate launch` the trainer on `num_processes` CPU ranks with the ZeRO-3 config;
    returns the finished process and rank 0's per-step losses (None when it wrote none)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    losses = tmp_path / f"losses-{_free_port()}.json"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ZERO3_CONFIG),
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(_free_port()),
        str(driver),
        "train",
        "--output_dir",
        str(out),
        "--progress_bar=False",
        "--warmup_steps",
        "2",
        "--log_every",
        "1",
        *flags,
    ]
    run_env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "LOSSES_FILE": str(losses),
        "GATHER_FILE": str(out / "gathers"),
        **env,
    }
    proc = subprocess.run(
        command, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600
    )
    return proc, json.loads(losses.read_text()) if losses.exists() else None


def _export_gathers(out: Path, num_processes: int) -> list[list[int]]:
    """Per rank, the number of parameters each gather of the run's exports held whole at once
    (the DRIVER records them)."""
    return [
        [int(n) for n in (out / f"gathers.{rank}").read_text().split()]
        for rank in range(num_processes)
    ]


def _consolidated(out: Path) -> dict[str, torch.Tensor]:
    """The trained parameters as DeepSpeed itself gathers them from the saved ZeRO-3 shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(
        str(out / STATE), tag="pytorch_model", exclude_frozen_parameters=True
    )


def test_zero3_preset_trains_evaluates_resumes_bit_equal_and_exports_its_shards(tmp_path):
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig
    from pipeline.sample_corpus import write_sample_corpus
    from trainer_low_mem.export import llama_state_dict_to_decoder
    from trainer_low_mem.model import build_model

    # 8 sample documents: 42 rows of 64 tokens, trained on and evaluated whole.
    files = write_sample_corpus(tmp_path / "corpus", num_docs=8)
    data = tmp_path / "tokens"
    build_dataset(BuildConfig(inputs=[files["txt"]], out=data), progress=False)
    flags = (
        *("--data", str(data), "--eval_data", str(data)),
        *("--model_preset", "tiny", "--max_seq_len", "64", "--global_batch", "8"),
        *("--max_steps", "6", "--save_every", "2", "--eval_every", "3"),
        *("--grad_checkpointing", "True"),
    )
    whole, whole_losses = _launch(tmp_path, 2, tmp_path / "whole", *flags)
    log = whole.stdout + whole.stderr
    assert whole.returncode == 0, log
    assert "DeepSpeedZeroOptimizer_Stage3 > DeepSpeedCPUAdam" in whole.stdout, log
    # The tiny preset's 147,968 fp32 parameters, half on each rank.
    assert "ZeRO-3: parameters partitioned over 2 ranks: 289.00 KiB on rank 0 of 578.00 KiB" in (
        whole.stdout
    )
    evals = [line for line in whole.stdout.splitlines() if "eval_loss" in line]
    assert [line.split(",")[0] for line in evals] == ["step: 0/6", "step: 3/6", "step: 6/6"]
    assert len(whole_losses) == 6 and whole_losses[-1] < whole_losses[0]

    out = tmp_path / "stopped"
    stopped, first = _launch(tmp_path, 2, out, *flags, STOP_AT_STEP="3")
    assert stopped.returncode != 0
    assert "received SIGTERM: saving the state at step 3" in stopped.stdout, stopped.stderr
    resumed, rest = _launch(tmp_path, 2, out, *flags, "--is_keep_training=True")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 3 (epoch 0, row 24" in resumed.stdout
    # DeepSpeed's CPU Adam and the reductions run in the same order: bit-equal, not close.
    assert first + rest == whole_losses
    assert evals[-1] in resumed.stdout

    # The export gathers one module's parameters at a time, never the whole model: the tiny
    # preset's 16 modules with parameters (embedding, 2 blocks of 7, final norm; head tied).
    assert _export_gathers(out, 2) == [[1] * 16] * 2
    manifest = json.loads((out / STATE / "manifest.json").read_text())
    assert (manifest["step"], manifest["world_size"], manifest["sharding"]) == (6, 2, "zero3")
    trained = _consolidated(out)
    exported = load_file(out / "final" / "model.safetensors")
    vocab_size = trained["embed.weight"].shape[0]
    as_decoder = llama_state_dict_to_decoder(exported, build_model("tiny", vocab_size))
    assert sorted(as_decoder) == sorted(trained)
    for name, weight in trained.items():
        assert torch.equal(as_decoder[name], weight), name
    llama = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert torch.equal(llama.model.embed_tokens.weight, trained["embed.weight"])


def test_zero3_lora_stops_on_one_ranks_oom_resumes_exports_merged_and_keeps_its_world_size(
    tmp_path, build_sample_sft
):
    from trainer_low_mem.sample_model import write_sample_model

    data = build_sample_sft(tmp_path, write_sample_model(tmp_path / "model"), 48, 8)
    out = tmp_path / "out"
    flags = (
        *("--data", str(data["train_data"]), "--eval_data", str(data["eval_data"])),
        *("--model", str(data["model"]), "--lora_rank", "4", "--max_seq_len", "64"),
        *("--global_batch", "6", "--save_every", "2"),
    )
    # Rank 1 alone runs out of memory in step 3's first forward, while rank 0 waits in a
    # parameter all-gather: rank 1 stops the job in one line, the state of step 2 stays.
    first, _ = _launch(
        tmp_path,
        2,
        out,
        *flags,
        "--max_steps",
        "4",
        LOWMEM_INJECT_OOM_AT_STEP="3",
        LOWMEM_INJECT_OOM_RANK="1",
    )
    assert first.returncode != 0
    assert (
        "error: out of memory in a ZeRO-3 step (rank 1, micro-batch 0 forward: injected "
        "out-of-memory error at step 3 (LOWMEM_INJECT_OOM_AT_STEP)); its ranks cannot back off "
        "together inside the parameter all-gathers: restart with a smaller --batch_size_per_gpu"
    ) in first.stderr, first.stdout + first.stderr
    assert json.loads((out / STATE / "manifest.json").read_text())["step"] == 2
    resumed, losses = _launch(
        tmp_path, 2, out, *flags, "--max_steps", "4", "--is_keep_training=True"
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert len(losses) == 2 and "step: 4/4, eval_loss:" in resumed.stdout

    # The merged export is the base plus each trained adapter's B @ A * alpha / rank.
    base = load_file(data["model"] / "model.safetensors")
    exported = load_file(out / "final" / "model.safetensors")
    adapters = _consolidated(out)
    assert sorted(exported) == sorted(base)
    merged = set()
    for name, lora_a in adapters.items():
        if ".lora_A." not in name:
            continue
        lora_b = adapters[name.replace(".lora_A.", ".lora_B.")]
        key = name.removeprefix("hf_model.").replace(".lora_A.default", "")
        expected = base[key] + (lora_b @ lora_a) * (16.0 / 4)
        torch.testing.assert_close(exported[key], expected, rtol=0, atol=1e-6)
        assert not torch.equal(exported[key], base[key]), key
        merged.add(key)
    assert merged and all(torch.equal(exported[k], base[k]) for k in base.keys() - merged)
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 2
    # One module at a time: the 48 modules with parameters (base layers, adapters, norms).
    assert _export_gathers(out, 2) == [[1] * 48] * 2

    refused, _ = _launch(tmp_path, 3, out, *flags, "--max_steps", "6", "--is_keep_training=True")
    assert refused.returncode != 0
    assert (
        "holds ZeRO-3 parameter and optimizer shards of 2 ranks and cannot be re-sharded for 3; "
        "resume with --num_processes 2"
    ) in refused.stderr
    assert json.loads((out / STATE / "manifest.json").read_text())["step"] == 4


def test_zero3_qlora_partitions_the_4bit_base_resumes_and_exports_it_dequantised(
    tmp_path, build_sample_sft
):
    """bitsandbytes' packed NF4 codes are frozen uint8 parameters, which ZeRO-3 partitions like
    any other (it casts only floating-point tensors); their statistics stay whole on each rank
    and are quantised again from the model folder at resume."""
    pytest.importorskip("bitsandbytes")
    from trainer_low_mem.sample_model import write_sample_model

    data = build_sample_sft(tmp_path, write_sample_model(tmp_path / "model"), 48, 8)
    out = tmp_path / "out"
    flags = (
        *("--data", str(data["train_data"]), "--model", str(data["model"])),
        *("--lora_rank", "4", "--load_in_4bit", "True", "--max_seq_len", "64"),
        *("--global_batch", "4", "--save_every", "1"),
    )
    first, losses = _launch(tmp_path, 2, out, *flags, "--max_steps", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    # The sample model's 4-bit layers, its fp32 embeddings, norms and adapters: half per rank.
    assert (
        "ZeRO-3: parameters partitioned over 2 ranks: 107.62 KiB on rank 0 of 215.25 KiB"
    ) in first.stdout
    resumed, more = _launch(tmp_path, 2, out, *flags, "--max_steps", "3", "--is_keep_training=True")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and " at step 2 " in resumed.stdout
    assert len(losses) == 2 and len(more) == 1
    config = json.loads((out / "final" / "config.json").read_text())
    assert "quantization_config" not in config
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    assert all(p.dtype == torch.float32 for p in model.parameters())
