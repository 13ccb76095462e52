"""Training an encoder-decoder (a tiny T5 made here) on prompt/response pairs, end to end: step-0
eval equal to transformers pair by pair, exact resume after SIGTERM, OOM backoff, LoRA, export
that `AutoModelForSeq2SeqLM` loads, and three ranks under `accelerate launch`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_core.errors import ConfigError, MemoryLimitError
from lowmem_core.memory import effective_host_limit_bytes
from pipeline import open_dataset
from pipeline.batch_spec import PairRows
from pipeline.pair_layout import pair_row_lens
from trainer_low_mem import loop, oom, signals
from trainer_low_mem.cli import parse_job_config
from trainer_low_mem.config import ModelConfig
from trainer_low_mem.evaluate import evaluate
from trainer_low_mem.models import resolve_model_kind
from trainer_low_mem.seq2seq import write_sample_t5

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
REPO = Path(__file__).resolve().parents[2]
MAX_LEN = 32


@pytest.fixture(scope="module")
def t5_inputs(tmp_path_factory, build_sample_sft) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq2seq")
    return build_sample_sft(root, write_sample_t5(root / "t5"), num_train=96, num_eval=12)


def _config(inputs, out: Path, *extra: str, steps: int = 6, micro: int = 2, accum: int = 2):
    return parse_job_config(
        [
            "--model", str(inputs["model"]), "--data", str(inputs["train_data"]),
            "--output_dir", str(out), "--max_seq_len", str(MAX_LEN), "--auto_plan=False",
            "--batch_size_per_gpu", str(micro), "--gradient_accumulation_steps", str(accum),
            "--max_steps", str(steps), "--lr", "3e-3", "--warmup_steps", "2", "--log_every", "1",
            "--save_every", "0", "--progress_bar=False", "--num_readers", "1", *extra,
        ]
    )  # fmt: skip


def _pairwise_transformers_loss(model_dir: Path, data: Path) -> tuple[float, int]:
    """The untouched model scored by transformers one pair at a time (truncated as the loader
    truncates): encoder = prompt, labels = response + EOS."""
    ds = open_dataset(data)
    enc_len, dec_len = pair_row_lens(ds, MAX_LEN)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            doc, p = ds[i].astype("int64"), int(ds.prompt_lengths[i])
            src = torch.from_numpy(doc[:p][:enc_len]) if p else torch.tensor([ds.eos_id])
            labels = torch.cat([torch.from_numpy(doc[p:][: dec_len - 1]), torch.tensor([1])])
            loss = model(input_ids=src[None], labels=labels[None]).loss
            total += float(loss.double()) * labels.numel()
            count += labels.numel()
    return total / count, count


def test_packed_eval_equals_transformers_pair_by_pair(t5_inputs):
    expected, expected_count = _pairwise_transformers_loss(
        t5_inputs["model"], t5_inputs["eval_data"]
    )
    ds = open_dataset(t5_inputs["eval_data"])
    kind = resolve_model_kind(ModelConfig(model=t5_inputs["model"]))
    model = kind.build(ds.vocab_size, document_masking=True, weights=True)
    spec = kind.batch_spec(ds, MAX_LEN, True, None)
    assert spec == PairRows(*pair_row_lens(ds, MAX_LEN), start_id=0)
    loader = spec.loader(ds, 3, rank=0, world_size=1, seed=0)
    result = evaluate(model, loader, device=torch.device("cpu"), sum_over_ranks=lambda v: v)
    assert result.label_tokens == expected_count
    assert abs(result.loss - expected) < 1e-5


def _stop_after(monkeypatch, step: int):
    original = loop._Run._train_step

    def train_step(self):
        outcome = original(self)
        if self.progress.step + 1 == step and not isinstance(outcome, str):
            signal.raise_signal(signal.SIGTERM)
        return outcome

    monkeypatch.setattr(loop._Run, "_train_step", train_step)


def test_train_eval_resume_bit_exact_and_export(t5_inputs, tmp_path, monkeypatch, capsys):
    evals = ("--eval_data", str(t5_inputs["eval_data"]), "--eval_every", "3")
    straight = loop.train(_config(t5_inputs, tmp_path / "straight", *evals))
    text = capsys.readouterr().out
    assert straight.exit_code == 0 and len(straight.losses) == 6, text
    enc_len, _ = pair_row_lens(open_dataset(t5_inputs["train_data"]), MAX_LEN)
    assert f"pairs packed by tokens into encoder rows of {enc_len} and decoder rows of 32" in text
    expected, _ = _pairwise_transformers_loss(t5_inputs["model"], t5_inputs["eval_data"])
    assert f"step: 0/6, eval_loss: {expected:.4f}" in text
    with monkeypatch.context() as patch:
        _stop_after(patch, 3)
        first = loop.train(_config(t5_inputs, tmp_path / "resumed", *evals))
    assert (first.exit_code, first.final_step) == (signals.EXIT_CODE_SIGTERM, 3)
    resumed = loop.train(
        _config(t5_inputs, tmp_path / "resumed", *evals, "--is_keep_training=True")
    )
    assert first.losses + resumed.losses == straight.losses  # exact float equality
    assert resumed.loader_state == straight.loader_state
    assert resumed.tokens_seen == straight.tokens_seen
    final = straight.export_dir
    assert (final / "tokenizer.json").is_file()
    tuned = transformers.AutoModelForSeq2SeqLM.from_pretrained(final)
    again = transformers.AutoModelForSeq2SeqLM.from_pretrained(resumed.export_dir)
    untouched = transformers.AutoModelForSeq2SeqLM.from_pretrained(t5_inputs["model"])
    assert type(tuned).__name__ == "T5ForConditionalGeneration"
    for name, p in tuned.named_parameters():
        assert torch.equal(p, again.get_parameter(name)), name
    assert not torch.equal(tuned.shared.weight, untouched.shared.weight)
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    ids = tokenizer("Tell me about x.", return_tensors="pt").input_ids
    assert tuned.generate(ids, max_new_tokens=4, do_sample=False).shape[0] == 1


def test_a_run_laid_out_otherwise_resumes_with_its_own_row_lengths_and_window(
    t5_inputs, tmp_path, monkeypatch, capsys
):
    # As a run started by a release that sized rows proportionally and packed next-fit (both
    # runs under the patch start fresh).
    def old_layout(cls, dataset, max_len, start_id, saved=None):
        return cls(MAX_LEN, MAX_LEN, start_id, pack_window=1)

    with monkeypatch.context() as patch:
        patch.setattr(PairRows, "for_dataset", classmethod(old_layout))
        straight = loop.train(_config(t5_inputs, tmp_path / "straight"))
        _stop_after(patch, 3)
        first = loop.train(_config(t5_inputs, tmp_path / "resumed"))
    assert (first.loader_state["enc_len"], first.loader_state["pack_window"]) == (MAX_LEN, 1)
    capsys.readouterr()
    resumed = loop.train(_config(t5_inputs, tmp_path / "resumed", "--is_keep_training=True"))
    assert f"encoder rows of {MAX_LEN} and decoder rows of {MAX_LEN}" in capsys.readouterr().out
    assert first.losses + resumed.losses == straight.losses
    assert resumed.loader_state == straight.loader_state
    assert pair_row_lens(open_dataset(t5_inputs["train_data"]), MAX_LEN)[0] != MAX_LEN


def test_injected_oom_backs_off_and_keeps_the_data_position(t5_inputs, tmp_path, monkeypatch):
    # Dropout masks depend on how a step is split: without dropout the losses must not.
    folder = tmp_path / "t5"
    shutil.copytree(t5_inputs["model"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.0}))
    inputs = {**t5_inputs, "model": folder}
    reference = loop.train(_config(inputs, tmp_path / "ref", steps=4))
    monkeypatch.setenv(oom.INJECT_OOM_ENV, "2")
    result = loop.train(_config(inputs, tmp_path / "oom", steps=4))
    assert len(result.backoffs) == 1 and "micro-batch 2 -> 1" in result.backoffs[0]
    assert result.loader_state == reference.loader_state
    assert result.tokens_seen == reference.tokens_seen
    assert result.losses[0] == reference.losses[0]
    torch.testing.assert_close(result.losses, reference.losses, rtol=1e-5, atol=0)


def test_host_ram_watchdog_rebuilds_the_pair_loader_without_losing_a_batch(
    t5_inputs, tmp_path, monkeypatch
):
    straight = loop.train(_config(t5_inputs, tmp_path / "straight", steps=14))
    limit = effective_host_limit_bytes(None, safety_frac=0.0)
    # Readings at step 10 (due), then every step above the soft threshold (85%).
    readings = iter([0.90, 0.90, 0.90, 0.97])
    monkeypatch.setattr(
        loop, "job_memory_bytes", lambda gather, ranks_per_node: int(next(readings) * limit)
    )
    result = loop.train(_config(t5_inputs, tmp_path / "run", steps=14))
    assert (result.exit_code, result.final_step) == (MemoryLimitError.exit_code, 13)
    assert result.plan["prefetch_depth"] == 1 and result.plan["ultra_low_mem"] is True
    # Shrunk prefetch, then pread reads: the same batches, the same losses bit for bit.
    assert result.losses == straight.losses[:13]


def test_lora_trains_adapters_only_and_exports_them_as_seq2seq(t5_inputs, tmp_path):
    pytest.importorskip("peft")
    merged = loop.train(_config(t5_inputs, tmp_path / "merged", "--lora_rank", "4", steps=3))
    tuned = transformers.AutoModelForSeq2SeqLM.from_pretrained(merged.export_dir)
    untouched = transformers.AutoModelForSeq2SeqLM.from_pretrained(t5_inputs["model"])
    changed = [
        n for n, p in tuned.named_parameters() if not torch.equal(p, untouched.get_parameter(n))
    ]
    assert changed and all(re.search(r"\.(q|k|v|o|wi|wo)\.weight$", n) for n in changed)
    adapter = loop.train(
        _config(t5_inputs, tmp_path / "adapter", "--lora_rank", "4", "--export_adapter_only=True",
                steps=3)
    )  # fmt: skip
    config = json.loads((adapter.export_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"


def test_plain_text_data_is_refused(t5_inputs, tmp_path, sample_dataset_dir):
    config = _config(t5_inputs, tmp_path / "run")
    config.data.data = sample_dataset_dir
    with pytest.raises(ConfigError, match="is an encoder-decoder .* build it with"):
        loop.train(config)


@pytest.mark.slow
def test_kill_9_then_resume_exports_the_same_weights(t5_inputs, tmp_path):
    """A real process killed with SIGKILL after its step-4 state, resumed: the final weights are
    bit-equal to those of an uninterrupted run."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}

    def argv(out: Path, *extra: str) -> list[str]:
        return [
            sys.executable, "train_low_mem.py", "train", "--model", str(t5_inputs["model"]),
            "--data", str(t5_inputs["train_data"]), "--output_dir", str(out),
            "--max_seq_len", str(MAX_LEN), "--global_batch", "4", "--max_steps", "8",
            "--lr", "3e-3", "--warmup_steps", "2", "--log_every", "1", "--save_every", "4",
            "--progress_bar=False", *extra,
        ]  # fmt: skip

    def run(cmd: list[str]) -> None:
        done = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    run(argv(tmp_path / "straight"))
    proc = subprocess.Popen(
        argv(tmp_path / "killed"), cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    for line in proc.stdout:  # the step-4 state is saved before step 5 runs
        if line.startswith("step: 5/8"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run(argv(tmp_path / "killed", "--is_keep_training=True"))
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_three_ranks_under_accelerate_launch(t5_inputs, tmp_path):
    out = tmp_path / "model_save"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    argv = [
        accelerate, "launch", "--config_file", "accelerate_configs/cpu_3proc.yaml",
        "train_low_mem.py", "train", "--model", str(t5_inputs["model"]),
        "--data", str(t5_inputs["train_data"]), "--eval_data", str(t5_inputs["eval_data"]),
        "--eval_every", "5", "--lr", "3e-3", "--warmup_steps", "2", "--global_batch", "6",
        "--max_seq_len", str(MAX_LEN), "--max_steps", "10", "--log_every", "5",
        "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert "world_size: 3" in text and "prompt/response pairs packed by tokens" in text
    evals = [float(v) for v in re.findall(r"step: (?:0|5|10)/10, eval_loss: ([0-9.]+)", text)]
    assert len(evals) == 3 and evals[-1] < evals[0], text[-3000:]
    tuned = transformers.AutoModelForSeq2SeqLM.from_pretrained(out / "final")
    assert type(tuned).__name__ == "T5ForConditionalGeneration"
