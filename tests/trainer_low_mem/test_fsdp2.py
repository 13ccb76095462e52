"""FSDP2 parameter sharding (trainer_low_mem/fsdp.py) launched with
accelerate_configs/fsdp2_cpu_2proc.yaml on two gloo CPU ranks: a built-in preset and a Hugging
Face model with LoRA train, evaluate, stop, resume with the uninterrupted run's losses (also on
another number of ranks: the distributed checkpoint reshards) and export one folder transformers
loads holding the gathered training weights; what FSDP2 cannot run is refused in one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_core.errors import ConfigError
from trainer_low_mem.cli import parse_job_config, parse_plan_config
from trainer_low_mem.fsdp import STATE_DIR_NAME, block_modules
from trainer_low_mem.job import check_flags
from trainer_low_mem.launch import Launch
from trainer_low_mem.sample_model import write_sample_model
from trainer_low_mem.sanity import check_launch

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"
FSDP2_CONFIG = REPO / "accelerate_configs" / "fsdp2_cpu_2proc.yaml"
STEP_LINE = re.compile(r"^step: (\d+)/\d+, loss: ([0-9.]+)", re.M)
EVAL_LINE = re.compile(r"^step: (\d+)/\d+, eval_loss: ([0-9.]+)", re.M)
BUILT_LINE = re.compile(r"bytes of model built before sharding, by rank: \[([0-9, ]+)\]")

# The trainer's entry, stopped by SIGTERM once optimizer step $STOP_AFTER_STEP is done on every
# rank, as a user's stop or a scheduler's preemption stops it.
DRIVER = r"""
import os, signal, sys
from trainer_low_mem import loop
from trainer_low_mem.cli import main

stop_after = int(os.environ.get("STOP_AFTER_STEP", "0"))
train_step = loop._Run._train_step


def stopping_train_step(self):
    outcome = train_step(self)
    if self.progress.step + 1 == stop_after:
        signal.raise_signal(signal.SIGTERM)
    return outcome


loop._Run._train_step = stopping_train_step
sys.exit(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    tmp: Path,
    engine: str,
    *flags: str,
    processes: int = 2,
    stop_after: int = 0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`accelerate launch` the trainer on `processes` CPU ranks under "fsdp2" or "ddp"."""
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    if engine == "fsdp2":
        engine_flags = ["--config_file", str(FSDP2_CONFIG)]
    else:
        engine_flags = ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [
        str(ACCELERATE), "launch", *engine_flags, "--num_machines", "1",
        "--num_processes", str(processes), "--main_process_port", str(_free_port()),
        str(driver), "train", "--progress_bar=False", "--log_every", "1", *flags,
    ]  # fmt: skip
    run_env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "STOP_AFTER_STEP": str(stop_after),
        **(env or {}),
    }
    return subprocess.run(cmd, capture_output=True, text=True, env=run_env, cwd=REPO, timeout=300)


def _built_bytes(text: str) -> list[int]:
    """The bytes of parameters and buffers each rank had materialised before sharding."""
    return [int(n) for n in BUILT_LINE.search(text)[1].split(",")]


def _tensor_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _losses(text: str, pattern: re.Pattern = STEP_LINE) -> dict[int, str]:
    return {int(step): loss for step, loss in pattern.findall(text)}


def _dcp_model_weights(state_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The trained weights the sharded state holds, gathered offline by torch's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(state_dir / STATE_DIR_NAME, tmp / "gathered.pt")
    return torch.load(tmp / "gathered.pt", weights_only=True)["model"]


# -- what the engine shards, and the refusals ------------------------------------------------
def test_the_blocks_are_the_decoder_layers_of_a_preset_and_of_a_transformers_model(tmp_path):
    from trainer_low_mem.model import Block, build_model

    preset = build_model("tiny", vocab_size=259)
    assert [type(b) for b in block_modules(preset)] == [Block] * preset.preset.n_layers
    transformers = pytest.importorskip("transformers")
    folder = write_sample_model(tmp_path / "llama")
    llama = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert block_modules(llama) == list(llama.model.layers)


def test_an_encoder_decoders_blocks_are_both_stacks():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=2
    )
    t5 = transformers.T5ForConditionalGeneration(config)
    assert block_modules(t5) == [*t5.encoder.block, *t5.decoder.block]


def _fsdp2_launch(mixed_precision: str) -> Launch:
    return Launch(
        distributed_type="FSDP",
        world_size=2,
        ranks_per_node=2,
        fsdp_version=2,
        mixed_precision=mixed_precision,
    )


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_an_fsdp2_launch_passes(precision):
    launch = _fsdp2_launch(precision)
    assert (launch.sharding_engine, launch.shards_parameters) == ("fsdp2", True)
    assert check_launch(launch) is None


def test_fp16_under_fsdp2_is_refused_in_one_line():
    with pytest.raises(ConfigError) as info:
        check_launch(_fsdp2_launch("fp16"))
    assert str(info.value) == (
        "FSDP2 trains in bf16 or fp32 here (fp16 would need loss scaling): launch with "
        "--mixed_precision bf16, or --mixed_precision no on GPUs without bf16"
    )


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantised_loading_under_fsdp2_is_refused_for_plan_and_train(tmp_path, bits):
    pytest.importorskip("peft")
    folder = write_sample_model(tmp_path / "llama")
    flags = ["--model", str(folder), "--data", str(tmp_path), f"--load_in_{bits}", "True"]
    flags += ["--lora_rank", "4"]
    plan = parse_plan_config([*flags, "--fsdp", "True", "--world_size", "2"])
    for config, launch in (
        (parse_job_config(flags), _fsdp2_launch("no")),
        (plan, Launch.from_flags(plan.launch, "no")),
    ):
        with pytest.raises(ConfigError) as info:
            check_flags(config, launch)
        assert str(info.value) == (
            f"--load_in_{bits} cannot run under FSDP2 (bitsandbytes' quantised weights are not "
            "sharded); launch QLoRA with accelerate_configs/multi_gpu_3.yaml or "
            "zero2_offload_3gpu.yaml, or drop the flag to shard a bf16 LoRA base"
        )


# -- two gloo ranks ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """8 sample documents: 42 rows of 64 tokens per epoch."""
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig
    from pipeline.sample_corpus import write_sample_corpus

    root = tmp_path_factory.mktemp("fsdp2_tokens")
    files = write_sample_corpus(root / "corpus", num_docs=8)
    build_dataset(BuildConfig(inputs=[files["txt"]], out=root / "tokens"), progress=False)
    return root / "tokens"


@pytest.mark.slow
def test_a_preset_trains_evaluates_stops_resumes_and_exports(tokens, tmp_path):
    """Stopped at step 3 and resumed: on 2 ranks the losses are bit-equal; on 3 ranks (the
    sharded checkpoint resharded) they differ only by the order of the sums over ranks."""
    transformers = pytest.importorskip("transformers")
    common = (
        "--data", str(tokens), "--eval_data", str(tokens), "--eval_every", "3",
        "--model_preset", "tiny", "--max_seq_len", "64", "--global_batch", "6",
        "--batch_size_per_gpu", "1", "--grad_checkpointing", "True", "--max_steps", "6",
        "--warmup_steps", "2",
    )  # fmt: skip
    # 6 steps of 6 rows stay in epoch 0 (42 rows), whose rows do not depend on the world size.
    whole = _launch(tmp_path, "fsdp2", *common, "--output_dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    assert "FSDP2: parameters sharded over 2 ranks: " in whole.stdout
    # Rank 0 alone read the weights; rank 1 built the model on the meta device.
    from pipeline.dataset import open_dataset
    from trainer_low_mem.model import build_model

    preset = build_model("tiny", vocab_size=open_dataset(tokens).vocab_size)
    assert _built_bytes(whole.stdout) == [_tensor_bytes(preset), 0]
    losses = _losses(whole.stdout)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert sorted(_losses(whole.stdout, EVAL_LINE)) == [0, 3, 6]

    out = tmp_path / "stopped"
    stopped = _launch(tmp_path, "fsdp2", *common, "--output_dir", str(out), stop_after=3)
    # Every rank exits with 143 after saving; the launcher reports a failed job.
    assert "exiting with code 143" in stopped.stdout, stopped.stdout[-3000:] + stopped.stderr
    manifest = json.loads((out / "train_latest_state" / "manifest.json").read_text())
    assert (manifest["step"], manifest["sharding"], manifest["world_size"]) == (3, "fsdp2", 2)
    shutil.copytree(out, tmp_path / "on3")
    resumed = _launch(
        tmp_path, "fsdp2", *common, "--output_dir", str(out), "--is_keep_training=True"
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 3 " in resumed.stdout
    assert _losses(resumed.stdout) == {s: losses[s] for s in (4, 5, 6)}

    on3 = _launch(
        tmp_path, "fsdp2", *common, "--output_dir", str(tmp_path / "on3"),
        "--is_keep_training=True", processes=3,
    )  # fmt: skip
    assert on3.returncode == 0, on3.stdout[-3000:] + on3.stderr[-3000:]
    assert "resuming a 2-rank state with 3 ranks" in on3.stdout
    assert "FSDP2: parameters sharded over 3 ranks: " in on3.stdout
    assert _built_bytes(on3.stdout) == [_tensor_bytes(preset), 0, 0]
    got = _losses(on3.stdout)
    assert sorted(got) == [4, 5, 6]
    for step, loss in got.items():
        assert float(loss) == pytest.approx(float(losses[step]), abs=2e-4)

    exported = load_file(out / "final" / "model.safetensors")
    assert exported.keys() == load_file(tmp_path / "whole" / "final" / "model.safetensors").keys()
    for name, tensor in load_file(tmp_path / "whole" / "final" / "model.safetensors").items():
        assert torch.equal(exported[name], tensor), name
    # The export is the gathered training weights: those of the sharded state, gathered apart.
    trained = _dcp_model_weights(out / "train_latest_state", tmp_path)
    assert torch.equal(exported["model.embed_tokens.weight"], trained["embed.weight"])
    assert torch.equal(
        exported["model.layers.1.mlp.down_proj.weight"], trained["blocks.1.mlp.proj.weight"]
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.model.embed_tokens.weight is model.lm_head.weight

    # A whole-model launch cannot load sharded states (nor the reverse): one line.
    ddp = _launch(
        tmp_path, "ddp", *common, "--max_steps", "8", "--output_dir", str(out),
        "--is_keep_training=True",
    )  # fmt: skip
    assert ddp.returncode != 0
    assert (
        f"error: {out / 'train_latest_state'} was saved with fsdp2 but this run uses whole-model "
        "ranks; resume with the accelerate config it was saved with"
    ) in ddp.stderr


@pytest.mark.slow
@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_a_transformers_model_trains_as_under_ddp_and_exports_its_weights(
    build_sample_sft, tmp_path, tuning
):
    """LoRA (a frozen base sharded beside its adapters) and full fine-tuning (the tied head
    the chunked loss reads inside the root unit's forward, so gathered whole, and trained):
    FSDP2 computes the losses DDP computes, and its export holds the weights DDP's does."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    inputs = build_sample_sft(tmp_path, write_sample_model(tmp_path / "llama"), 32, 8)
    common = (
        "--model", str(inputs["model"]), "--data", str(inputs["train_data"]),
        "--eval_data", str(inputs["eval_data"]), "--lr", "1e-2" if tuning == "lora" else "1e-3",
        "--grad_checkpointing", "True", "--warmup_steps", "1", "--global_batch", "4",
        "--batch_size_per_gpu", "1", "--max_seq_len", "128", "--max_steps", "4",
        *(("--lora_rank", "4") if tuning == "lora" else ()),
    )  # fmt: skip
    runs = {}
    for engine in ("fsdp2", "ddp"):
        done = _launch(tmp_path, engine, *common, "--output_dir", str(tmp_path / engine))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[engine] = done.stdout
    assert "FSDP2: parameters sharded over 2 ranks: " in runs["fsdp2"]
    # Rank 1 never held the model: built on the meta device, rank 0's weights broadcast to it.
    built = _built_bytes(runs["fsdp2"])
    assert built[1] == 0 and built[0] > 0
    for pattern in (STEP_LINE, EVAL_LINE):
        fsdp2, ddp = _losses(runs["fsdp2"], pattern), _losses(runs["ddp"], pattern)
        assert fsdp2.keys() == ddp.keys() and fsdp2
        # Reduce-scatter and all-reduce sum the ranks' gradients in another order.
        assert [float(v) for v in fsdp2.values()] == pytest.approx(
            [float(v) for v in ddp.values()], abs=2e-4
        )
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp2" / "final")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "final")
    untouched = transformers.AutoModelForCausalLM.from_pretrained(inputs["model"])
    changed = []
    for name, p in tuned.named_parameters():
        torch.testing.assert_close(p, reference.get_parameter(name), rtol=0, atol=1e-4)
        if not torch.equal(p, untouched.get_parameter(name)):
            changed.append(name)
    if tuning == "lora":
        assert changed and all("proj" in name for name in changed)  # the adapters merged
    else:
        assert "model.embed_tokens.weight" in changed
        assert tuned.lm_head.weight is tuned.model.embed_tokens.weight
        assert built[0] == _tensor_bytes(untouched)  # the whole fp32 model, on rank 0 only


@pytest.mark.slow
def test_out_of_memory_on_one_rank_stops_the_job_in_one_line(tokens, tmp_path):
    """DDP's ranks back off together; FSDP2's cannot (the others wait in an all-gather)."""
    done = _launch(
        tmp_path, "fsdp2", "--data", str(tokens), "--model_preset", "tiny", "--max_seq_len", "64",
        "--global_batch", "8", "--max_steps", "3", "--output_dir", str(tmp_path / "out"),
        env={"LOWMEM_INJECT_OOM_AT_STEP": "2", "LOWMEM_INJECT_OOM_RANK": "1"},
    )  # fmt: skip
    assert done.returncode != 0
    assert (
        "error: out of memory in an FSDP2 step (rank 1, micro-batch 0 forward: injected "
        "out-of-memory error at step 2 (LOWMEM_INJECT_OOM_AT_STEP)); its ranks cannot back off "
        "together inside the all-gathers: restart with a smaller --batch_size_per_gpu, "
        "--grad_checkpointing True, or fsdp_offload_params: true in the accelerate config\n"
    ) in done.stderr
    assert sorted(_losses(done.stdout)) == [1]  # step 1 trained, step 2 never ran


@pytest.mark.slow
def test_an_encoder_decoder_with_lora_trains_as_under_ddp(build_sample_sft, tmp_path):
    """T5's encoder and decoder blocks are sharded units; the losses are DDP's."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from trainer_low_mem.seq2seq import write_sample_t5

    inputs = build_sample_sft(tmp_path, write_sample_t5(tmp_path / "t5"), 32, 8)
    common = (
        "--model", str(inputs["model"]), "--data", str(inputs["train_data"]),
        "--eval_data", str(inputs["eval_data"]), "--lora_rank", "4",
        "--grad_checkpointing", "True", "--global_batch", "4", "--max_seq_len", "128",
        "--max_steps", "3",
    )  # fmt: skip
    runs = {}
    for engine in ("fsdp2", "ddp"):
        done = _launch(tmp_path, engine, *common, "--output_dir", str(tmp_path / engine))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[engine] = done.stdout
    for pattern in (STEP_LINE, EVAL_LINE):
        fsdp2, ddp = _losses(runs["fsdp2"], pattern), _losses(runs["ddp"], pattern)
        assert fsdp2.keys() == ddp.keys() and fsdp2
        assert [float(v) for v in fsdp2.values()] == pytest.approx(
            [float(v) for v in ddp.values()], abs=2e-4
        )
    assert (tmp_path / "fsdp2" / "final" / "config.json").is_file()
