"""The `plan` subcommand: the trainer's flag vocabulary, the same from both entry points."""

from __future__ import annotations

import json

import pytest

from lowmem_core.errors import ConfigError
from pipeline.__main__ import main as pipeline_main
from pipeline.dataset import open_dataset
from trainer_low_mem.cli import main as trainer_main

GiB = 1 << 30
FLAGS = [
    "--model_preset",
    "tiny",
    "--max_seq_len",
    "256",
    "--global_batch",
    "48",
    "--world_size",
    "3",
    "--device_budget",
    "2GiB",
    "--host_ram_limit",
    "8GiB",
    "--zero_stage",
    "2",
    "--offload_optimizer=True",
    "--num_cores",
    "8",
    "--json=True",
]


def plan_json(main, argv, capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_both_entry_points_take_the_trainer_flags_and_print_the_same_plan(capsys):
    ours = plan_json(trainer_main, ["plan", *FLAGS], capsys)
    theirs = plan_json(pipeline_main, ["plan", *FLAGS], capsys)
    assert ours == theirs
    assert ours["micro_batch_per_rank"] * ours["grad_accum_steps"] * 3 == 48
    assert (ours["device"], ours["pin_memory"], ours["seq_len"]) == ("cuda", True, 256)
    assert ours["device_budget_bytes"] == 2 * GiB  # GiB is 2^30
    assert ours["host_limit_bytes"] <= int(8 * GiB * 0.9)


@pytest.mark.parametrize("main", [trainer_main, pipeline_main])
@pytest.mark.parametrize(
    "form, is_json",
    [
        (["--json"], True),
        (["--no_json"], False),
        (["--json=true"], True),
        (["--json", "False"], False),
    ],
)
def test_json_is_a_flag_or_takes_a_value_from_both_entry_points(capsys, main, form, is_json):
    argv = ["plan", "--model_preset", "tiny", *form, "--max_seq_len", "128", "--global_batch", "16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("{") is is_json and ('"seq_len": 128' in out) is is_json


def test_byte_sizes_take_decimal_and_binary_units(capsys):
    flags = ["2GB" if f == "2GiB" else f for f in FLAGS]
    d = plan_json(trainer_main, ["plan", *flags], capsys)
    assert d["device_budget_bytes"] == 2 * 10**9


def test_a_given_batch_size_per_gpu_is_the_micro_batch(capsys):
    d = plan_json(trainer_main, ["plan", *FLAGS, "--batch_size_per_gpu", "4"], capsys)
    assert (d["micro_batch_per_rank"], d["grad_accum_steps"]) == (4, 4)


def test_the_dataset_gives_the_vocabulary_and_its_size(capsys, sample_dataset_dir):
    argv = [
        "plan",
        "--model_preset",
        "tiny",
        "--max_seq_len",
        "128",
        "--global_batch",
        "8",
        "--data",
        str(sample_dataset_dir),
        "--json=True",
    ]
    d = plan_json(trainer_main, argv, capsys)
    with open_dataset(sample_dataset_dir) as ds:
        assert d["reasons"]["ultra_low_mem"]["numbers"]["dataset_bytes"] == ds.token_bytes
        assert d["footprint"]["dataset_bytes"] == ds.token_bytes


def test_the_table_and_one_line_errors(capsys):
    argv = ["plan", "--model_preset", "tiny", "--max_seq_len", "128", "--global_batch", "16"]
    assert trainer_main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: global batch 16")
    assert "micro_batch_per_rank" in out and "device_peak_bytes_planned" in out
    assert trainer_main([*argv, "--world_size", "3"]) == ConfigError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "global batch 16 is not divisible by world size 3" in err


def test_a_length_beyond_the_preset_is_refused_in_one_line(capsys):
    argv = ["plan", "--model_preset", "tiny", "--max_seq_len", "4096"]
    assert trainer_main(argv) == ConfigError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max_seq_len 4096 exceeds preset 'tiny'" in err


@pytest.fixture
def llama_dir(tmp_path):
    """A tiny Llama folder (config only), as `--model DIR` gives it."""
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


MODEL_FLAGS = ["--max_seq_len", "128", "--global_batch", "8", "--host_ram_limit", "4GiB"]


def test_plan_of_a_model_folder_with_lora_names_its_traced_estimate(capsys, llama_dir):
    pytest.importorskip("peft")
    argv = ["plan", "--model", str(llama_dir), "--lora_rank", "8", *MODEL_FLAGS]
    assert pipeline_main(argv) == 0
    out = capsys.readouterr().out
    estimate = next(line for line in out.splitlines() if "model_estimate:" in line)
    assert "model_estimate: trace: one optimizer step on fake" in estimate
    # Rank 8 on the 7 linear layers of 2 blocks (q, o 64->64; k, v 64->32; gate, up 64->128;
    # down 128->64): 16,384 adapter parameters, the only ones with optimizer states.
    assert "16,384 trainable" in estimate and "B/token" in estimate and "static " in estimate
    d = plan_json(trainer_main, [*argv, "--json=True"], capsys)
    numbers = d["reasons"]["model_estimate"]["numbers"]
    assert d["reasons"]["model_estimate"]["value"] == "trace"
    assert numbers["static_bytes"] > 0 and int(numbers["per_token"].replace(",", "")) > 0


def test_plan_refuses_a_dataset_the_model_folder_cannot_read(capsys, llama_dir, make_dataset):
    data = make_dataset(50)  # byte tokenizer: EOS 257, the folder's config says otherwise
    argv = ["plan", "--model", str(llama_dir), "--data", str(data), *MODEL_FLAGS]
    assert trainer_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: dataset {data} ends documents with"), err


def test_a_folder_that_cannot_be_traced_is_planned_analytically_with_the_cause(
    capsys, monkeypatch, llama_dir
):
    from trainer_low_mem.hf_model import HFCausalLM

    def reads_token_values(self, input_ids, position_ids=None, labels=None):
        return input_ids[: int(input_ids.sum().item()) + 1]  # fake tensors have no values

    monkeypatch.setattr(HFCausalLM, "forward", reads_token_values)
    argv = ["plan", "--model", str(llama_dir), *MODEL_FLAGS, "--json=True"]
    reason = plan_json(trainer_main, argv, capsys)["reasons"]["model_estimate"]
    assert reason["value"] == "analytic" and "\n" not in reason["text"]
    assert reason["text"].startswith("analytic: the trace failed (cannot trace the model's")
    assert "training step on fake tensors (" in reason["text"]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--device_budget", "1MiB"], "no plan fits (GPU at micro-batch 1"),
        (["--max_seq_len", "512"], "--max_seq_len 512 exceeds --model"),
    ],
)
def test_what_a_model_folder_cannot_run_is_one_line_with_the_remedy(
    capsys, llama_dir, flags, named
):
    argv = ["plan", "--model", str(llama_dir), *MODEL_FLAGS, *flags]
    assert trainer_main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err
    assert "Try:" in err or "lower --max_seq_len" in err


def test_plan_of_an_encoder_decoder_traces_the_rows_its_pairs_take(
    capsys, tmp_path, build_sample_sft
):
    from pipeline.pair_layout import pair_row_lens
    from trainer_low_mem.seq2seq import write_sample_t5

    inputs = build_sample_sft(tmp_path, write_sample_t5(tmp_path / "t5"), 40, 2)
    capsys.readouterr()  # what making the folder printed
    argv = ["plan", "--model", str(inputs["model"]), *MODEL_FLAGS, "--json=True"]

    def per_token(*extra: str) -> int:
        d = plan_json(trainer_main, [*argv, *extra], capsys)
        assert d["reasons"]["model_estimate"]["value"] == "trace"
        return int(d["reasons"]["model_estimate"]["numbers"]["per_token"].replace(",", ""))

    enc_len, dec_len = pair_row_lens(open_dataset(inputs["train_data"]), 128)
    assert enc_len < 128 == dec_len  # short prompts: the encoder rows are shorter
    # Without data both sides are traced at --max_seq_len; with the pairs, at their rows.
    assert per_token("--data", str(inputs["train_data"])) < per_token()


def test_plan_takes_a_host_limit_larger_than_this_machine_as_the_targets(capsys):
    from lowmem_core.memory import host_memory
    from trainer_low_mem.cli import main as trainer_main

    argv = ["plan", "--model_preset", "tiny", "--max_seq_len", "128", "--global_batch", "8"]
    assert trainer_main([*argv, "--json", "--host_ram_limit", "2TiB", "--num_cores", "32"]) == 0
    plan = json.loads(capsys.readouterr().out)
    tib = 1 << 40
    assert host_memory().total_bytes < 2 * tib
    assert plan["host_limit_bytes"] == int(2 * tib * 0.9)
    assert "of the target machine" in plan["reasons"]["host_limit_bytes"]["text"]
    assert "32 core(s) (--num_cores)" in plan["reasons"]["num_readers"]["text"]
