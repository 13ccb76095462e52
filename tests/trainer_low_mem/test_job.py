"""`plan` and `train` decide alike: on the same flags, for every model family, both accept with
the same plan or both refuse with the same one-line message (trainer_low_mem/job.py).

`train` runs for real (one optimizer step, one process on the CPU); its plan is the one its
result reports. `plan` gets the same flags but the train-only ones (output folder, step count).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from lowmem_core.errors import LowMemError
from lowmem_core.memory import DEFAULT_HOST_SAFETY_FRAC
from trainer_low_mem.cli import parse_job_config, parse_plan_config, plan_from_config
from trainer_low_mem.loop import train
from trainer_low_mem.planner.arithmetic import DEFAULT_TARGET_FRAC
from trainer_low_mem.sample_model import write_sample_model
from trainer_low_mem.seq2seq import write_sample_t5

COMMON = ["--global_batch", "4", "--num_readers", "1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, build_sample_sft, sample_dataset_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    llama = build_sample_sft(root / "llama", write_sample_model(root / "llama" / "model"), 24, 2)
    t5 = build_sample_sft(root / "t5", write_sample_t5(root / "t5" / "model"), 24, 2)
    long_context = write_sample_model(root / "long" / "model", with_weights=False)
    config = json.loads((long_context / "config.json").read_text())
    (long_context / "config.json").write_text(
        json.dumps({**config, "max_position_embeddings": 8192})
    )
    return {
        "text": sample_dataset_dir,
        "llama": llama["model"],
        "llama_sft": llama["train_data"],
        "t5": t5["model"],
        "t5_sft": t5["train_data"],
        "long": long_context,
    }


def _decide(flags: list[str], tmp_path: Path):
    """(plan's decision, train's decision): a plan's settings, or the refusal's message."""
    try:
        planned = _settings(plan_from_config(parse_plan_config(flags)).to_dict())
    except LowMemError as exc:
        planned = str(exc)
    train_flags = [*flags, "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    # accelerate keeps one state per process: a case with another --mixed_precision needs a
    # fresh one, as a new `train` process would have.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        result = train(parse_job_config([*train_flags, "--progress_bar=False"]))
        trained = _settings(result.plan)
    except LowMemError as exc:
        trained = str(exc)
    return planned, trained


def _settings(plan: dict) -> dict:
    """What a plan decides: every field, and each reason's value (not its timing text)."""
    reasons = {name: r["value"] for name, r in plan["reasons"].items()}
    return {**{k: v for k, v in plan.items() if k != "reasons"}, "reasons": reasons}


# (case id, flags by the fixtures' names, whether it is accepted)
CASES = [
    ("preset", ["--data", "text", "--model_preset", "tiny", "--max_seq_len", "128"], True),
    (
        "preset-too-long",
        ["--data", "text", "--model_preset", "tiny", "--max_seq_len", "1024"],
        False,
    ),
    ("causal", ["--data", "llama_sft", "--model", "llama", "--max_seq_len", "128"], True),
    (
        "causal-lora",
        ["--data", "llama_sft", "--model", "llama", "--max_seq_len", "128", "--lora_rank", "4"],
        True,
    ),
    # The frozen base in bf16 (the adapters in fp32): plan traces what train loads.
    (
        "causal-lora-bf16",
        ["--data", "llama_sft", "--model", "llama", "--max_seq_len", "128", "--lora_rank", "4"]
        + ["--mixed_precision", "bf16"],
        True,
    ),
    (
        "causal-qlora-4bit",
        ["--data", "llama_sft", "--model", "llama", "--max_seq_len", "128", "--lora_rank", "4"]
        + ["--load_in_4bit", "True"],
        True,
    ),
    (
        "causal-lora-8bit",
        ["--data", "llama_sft", "--model", "llama", "--max_seq_len", "128", "--lora_rank", "4"]
        + ["--load_in_8bit", "True"],
        True,
    ),
    (
        "seq2seq-4bit",
        ["--data", "t5_sft", "--model", "t5", "--max_seq_len", "128", "--lora_rank", "4"]
        + ["--load_in_4bit", "True"],
        False,
    ),
    # The folder allows 1024 positions: a preset's limit (2048) must not be what is checked.
    (
        "causal-too-long",
        ["--data", "llama_sft", "--model", "llama", "--max_seq_len", "1536"],
        False,
    ),
    # The folder allows 8192 positions: 4096 is accepted, whatever a preset allows (it has no
    # weights: --from_scratch says to train from its config).
    (
        "causal-long-context",
        ["--data", "llama_sft", "--model", "long", "--max_seq_len", "4096", "--from_scratch"],
        True,
    ),
    (
        "causal-other-tokenizer",
        ["--data", "text", "--model", "llama", "--max_seq_len", "128"],
        False,
    ),
    ("seq2seq", ["--data", "t5_sft", "--model", "t5", "--max_seq_len", "128"], True),
    (
        "seq2seq-lora",
        ["--data", "t5_sft", "--model", "t5", "--max_seq_len", "128", "--lora_rank", "4"],
        True,
    ),
    (
        "seq2seq-lora-bf16",
        ["--data", "t5_sft", "--model", "t5", "--max_seq_len", "128", "--lora_rank", "4"]
        + ["--mixed_precision", "bf16"],
        True,
    ),
    ("seq2seq-plain-text", ["--data", "text", "--model", "t5", "--max_seq_len", "128"], False),
    (
        "adamw-8bit",
        ["--data", "text", "--model_preset", "tiny", "--max_seq_len", "128"]
        + ["--optimizer", "adamw_8bit"],
        True,
    ),
    (
        "offload-activations",
        ["--data", "llama_sft", "--model", "llama", "--max_seq_len", "128"]
        + ["--offload_activations", "on", "--grad_checkpointing=True"],
        True,
    ),
    (
        "batch-split",
        ["--data", "text", "--model_preset", "tiny", "--max_seq_len", "128"]
        + ["--batch_size_per_gpu", "3"],
        False,
    ),
]


@pytest.mark.parametrize(("flags", "accepted"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_and_train_decide_alike(folders, tmp_path, flags, accepted):
    flags = [str(folders.get(f, f)) for f in flags] + COMMON
    planned, trained = _decide(flags, tmp_path)
    assert planned == trained
    assert isinstance(planned, dict) is accepted, planned


def test_plan_and_train_turn_on_8bit_states_alike_when_only_they_fit(folders, tmp_path):
    flags = ["--data", str(folders["text"]), "--model_preset", "tiny", "--max_seq_len", "128"]
    flags += COMMON
    fixed = {
        optimizer: plan_from_config(parse_plan_config([*flags, "--optimizer", optimizer]))
        for optimizer in ("adamw", "adamw_8bit")
    }
    # A host limit whose share puts the band's top between the two peaks at micro-batch 1 once
    # the data path is at its leanest (ultra-low-mem: only the epoch index is shared).
    peak = {k: p.device_fixed_bytes + p.device_bytes_per_sequence for k, p in fixed.items()}
    shared = fixed["adamw"].footprint.index_bytes
    share = math.ceil((peak["adamw"] + peak["adamw_8bit"]) / 2 / DEFAULT_TARGET_FRAC[1])
    limit = math.ceil((share + shared) / (1 - DEFAULT_HOST_SAFETY_FRAC))
    planned, trained = _decide([*flags, "--host_ram_limit", str(limit)], tmp_path)
    assert planned == trained
    assert planned["optimizer"] == "adamw_8bit", planned
    assert (planned["micro_batch_per_rank"], planned["ultra_low_mem"]) == (1, True)


def test_a_refusal_names_the_models_own_limit(folders, tmp_path):
    flags = ["--data", str(folders["llama_sft"]), "--model", str(folders["llama"])]
    planned, _ = _decide([*flags, "--max_seq_len", "1536", *COMMON], tmp_path)
    assert planned == (
        f"--max_seq_len 1536 exceeds --model {folders['llama']}'s max_seq_len 1024; lower "
        "--max_seq_len to at most 1024 or choose a model with a longer context"
    )


@pytest.mark.parametrize(
    ("model", "data", "eval_data", "problem"),
    [
        # A preset takes the training set's vocabulary; larger eval ids would index past it.
        (["--model_preset", "tiny"], "text", "llama_sft", "was built with tokenizer"),
        # Another model's ids, though the training set matches the model.
        (["--model", "llama"], "llama_sft", "text", "ends documents with token 257"),
    ],
    ids=["preset-other-tokenizer", "folder-other-tokenizer"],
)
def test_eval_data_is_checked_as_the_training_data_is(
    folders, tmp_path, model, data, eval_data, problem
):
    flags = [*[str(folders.get(f, f)) for f in model], "--data", str(folders[data])]
    flags += ["--eval_data", str(folders[eval_data]), "--max_seq_len", "128", *COMMON]
    _, trained = _decide(flags, tmp_path)
    assert isinstance(trained, str) and problem in trained
    assert str(folders[eval_data]) in trained and not (tmp_path / "out").exists()
