"""Fine-tuning a user's Hugging Face folder on prompt/response records, end to end.

The model is a tiny Llama-style folder made here (trainer_low_mem/sample_model.py: a BPE
tokenizer trained on the sample corpus, seeded weights), the records come from the sample corpus,
and the datasets are built with `pipeline build --sft` using the model's own tokenizer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import Loader, open_dataset
from trainer_low_mem.evaluate import evaluate
from trainer_low_mem.hf_model import load_model_folder
from trainer_low_mem.sample_model import write_sample_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def finetune_inputs(tmp_path_factory, build_sample_sft) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    return build_sample_sft(root, write_sample_model(root / "model"), num_train=240, num_eval=24)


def _transformers_mean_loss(model_dir: Path, records: Path) -> tuple[float, int]:
    """The untouched model scored by transformers itself, one sample at a time: prompt tokens
    (with the tokenizer's BOS), response tokens, EOS; loss on the response and the EOS only."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in records.read_text().splitlines():
            record = json.loads(line)
            prompt = tokenizer(record["prompt"]).input_ids
            response = tokenizer(record["response"], add_special_tokens=False).input_ids
            ids = torch.tensor([prompt + response + [tokenizer.eos_token_id]])
            labels = ids.clone()
            labels[0, : len(prompt)] = -100
            n = int((labels[0, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss.double()) * n
            count += n
    return total / count, count


@pytest.mark.parametrize("packing", [True, False])
def test_step_zero_eval_equals_transformers_sample_by_sample(finetune_inputs, packing):
    expected, expected_count = _transformers_mean_loss(
        finetune_inputs["model"], finetune_inputs["eval"]
    )
    ds = open_dataset(finetune_inputs["eval_data"])
    assert ds.kind == "sft" and int(ds.doc_lengths.max()) + 1 <= 256
    model = load_model_folder(finetune_inputs["model"])
    loader = Loader(ds, batch_size=4, seq_len=256, packing=packing)
    result = evaluate(model, loader, device=torch.device("cpu"), sum_over_ranks=lambda v: v)
    # Packed rows hold several samples that must not see each other: same loss as one by one.
    assert result.label_tokens == expected_count
    assert abs(result.loss - expected) < 1e-5


def _run(argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
def test_three_rank_lora_finetune_with_eval_exports_a_model_transformers_loads(
    finetune_inputs, tmp_path
):
    out = tmp_path / "model_save"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    argv = [
        accelerate, "launch", "--config_file", "accelerate_configs/cpu_3proc.yaml",
        "train_low_mem.py", "train", "--model", str(finetune_inputs["model"]),
        "--data", str(finetune_inputs["train_data"]),
        "--eval_data", str(finetune_inputs["eval_data"]), "--eval_every", "10",
        "--lora_rank", "8", "--lr", "3e-3", "--warmup_steps", "2", "--global_batch", "12",
        "--max_seq_len", "128", "--max_steps", "20", "--log_every", "10",
        "--output_dir", str(out),
    ]  # fmt: skip
    done = _run(argv, timeout=600)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert "world_size: 3" in text
    assert "prompt/response samples, whole samples packed into rows" in text
    evals = [float(v) for v in re.findall(r"step: (?:0|10|20)/20, eval_loss: ([0-9.]+)", text)]
    assert len(evals) == 3 and evals[-1] < evals[0], text[-3000:]
    final = out / "final"
    assert (final / "tokenizer.json").is_file() and not (final / "adapter_config.json").exists()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(final)
    untouched = transformers.AutoModelForCausalLM.from_pretrained(finetune_inputs["model"])
    assert type(tuned).__name__ == "LlamaForCausalLM"
    changed = [
        name
        for name, p in tuned.named_parameters()
        if not torch.equal(p, untouched.get_parameter(name))
    ]
    # LoRA merged: only the adapted projections moved, embeddings and norms did not.
    assert changed and all("proj" in name for name in changed)
    answer = (
        _run(
            [
                sys.executable,
                "-m",
                "trainer_low_mem.sample_model",
                str(tmp_path),
                "--generate",
                str(final),
            ],
            timeout=120,
        )
        if (tmp_path / "eval.jsonl").write_text(finetune_inputs["eval"].read_text())
        else None
    )
    assert answer.returncode == 0 and "answer:" in answer.stdout, answer.stderr[-2000:]
