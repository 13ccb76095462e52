"""QLoRA (--load_in_4bit: NF4, double quantisation) and 8-bit loading (--load_in_8bit) with LoRA,
end to end on the CPU: training with eval and gradient checkpointing, bit-equal resume, the merged
export (adapters folded into the dequantised base, an ordinary folder transformers loads) and the
adapter-only export with a note of its base; the one-line refusals. bitsandbytes runs its 4-bit
and 8-bit layers on the CPU, so none of this needs a GPU.

Models are tiny Llama-style (trainer_low_mem/sample_model.py) and Qwen2-style folders written
here; the datasets are built with their tokenizer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowmem_core.errors import CheckpointError, ConfigError
from trainer_low_mem import loop
from trainer_low_mem.cli import parse_job_config
from trainer_low_mem.config import ModelConfig
from trainer_low_mem.export import ADAPTER_BASE_KEY, MANIFEST_NAME, export_model
from trainer_low_mem.models import DataFacts, resolve_model_kind
from trainer_low_mem.sample_model import write_sample_model
from trainer_low_mem.seq2seq import write_sample_t5

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
REPO = Path(__file__).resolve().parents[2]
QUANTISED = {"4bit": "--load_in_4bit", "8bit": "--load_in_8bit"}


def _write_qwen2(out: Path, llama: Path) -> Path:
    """A tiny Qwen2-style folder (biased q/k/v projections, grouped-query attention, tied
    embeddings) sharing the sample Llama folder's tokenizer."""
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory, build_sample_sft) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("qlora")
    llama = build_sample_sft(root / "llama", write_sample_model(root / "llama_model"), 64, 8)
    qwen = _write_qwen2(root / "qwen_model", llama["model"])
    return {"llama": llama, "qwen": {**llama, "model": qwen}}


def _config(inputs: dict[str, Path], out: Path, bits: str, *extra: str):
    return parse_job_config(
        [
            "--model",
            str(inputs["model"]),
            "--data",
            str(inputs["train_data"]),
            "--output_dir",
            str(out),
            QUANTISED[bits],
            "True",
            "--lora_rank",
            "4",
            "--max_seq_len",
            "128",
            "--global_batch",
            "4",
            "--max_steps",
            "4",
            "--lr",
            "1e-2",
            "--warmup_steps",
            "1",
            "--num_readers",
            "1",
            "--progress_bar=False",
            *extra,
        ]
    )


def _state_tensor_names(out: Path) -> list[str]:
    with safe_open(str(out / "train_latest_state" / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.slow
@pytest.mark.parametrize(("family", "bits"), [("llama", "4bit"), ("qwen", "8bit")])
def test_quantised_lora_trains_evaluates_and_resumes_bit_equal(
    folders, tmp_path, monkeypatch, capsys, family, bits, stop_after_step
):
    inputs = folders[family]
    flags = ("--grad_checkpointing", "True", "--eval_data", str(inputs["eval_data"]))
    flags += ("--eval_every", "2")
    straight = loop.train(_config(inputs, tmp_path / "straight", bits, *flags))
    printed = capsys.readouterr().out
    assert straight.final_step == 4 and all(torch.isfinite(torch.tensor(straight.losses)))
    assert len(set(straight.losses)) > 1  # the adapters train: the loss moves
    kind = "4-bit NF4" if bits == "4bit" else "8-bit"
    assert f"{kind} weights computed in float32" in printed
    assert printed.count("eval_loss: ") == 3  # steps 0, 2 and 4
    # The state holds the adapters alone: no frozen weight, no quantisation statistic.
    names = _state_tensor_names(tmp_path / "straight")
    assert names and all("lora_" in name for name in names)
    with monkeypatch.context() as patch:
        stop_after_step(patch, 2)
        first = loop.train(_config(inputs, tmp_path / "run", bits, *flags))
    assert first.final_step == 2
    resumed = loop.train(_config(inputs, tmp_path / "run", bits, *flags, "--is_keep_training=True"))
    assert first.losses + resumed.losses == straight.losses  # exact float equality
    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    tuned = transformers.AutoModelForCausalLM.from_pretrained(final)
    untouched = transformers.AutoModelForCausalLM.from_pretrained(inputs["model"])
    assert type(tuned) is type(untouched)
    assert (final / "tokenizer.json").is_file()


@pytest.mark.slow
def test_resume_with_another_quantisation_is_refused_in_one_line(
    folders, tmp_path, monkeypatch, stop_after_step
):
    inputs = folders["llama"]
    with monkeypatch.context() as patch:
        stop_after_step(patch, 2)
        loop.train(_config(inputs, tmp_path / "run", "4bit"))
    with pytest.raises(CheckpointError, match="was saved with other model") as info:
        loop.train(_config(inputs, tmp_path / "run", "8bit", "--is_keep_training=True"))
    message = str(info.value)
    assert "\n" not in message
    assert "model.quantisation.bits: saved 4, now 8" in message


def _facts(inputs: dict[str, Path]) -> DataFacts:
    return DataFacts(
        path=inputs["train_data"],
        vocab_size=512,
        bos_id=None,
        eos_id=0,
        pad_id=0,
        is_sft=True,
        token_bytes=0,
        index_bytes=None,
        tokenizer_dir=inputs["model"],
    )


def _trained_quantised(folder: Path, bits: str, mixed_precision: str = "no", **settings):
    """A quantised LoRA model whose adapters are not zero (as after training)."""
    cfg = ModelConfig(model=folder, lora_rank=4, **{f"load_in_{bits}": True}, **settings)
    kind = resolve_model_kind(cfg, mixed_precision)
    torch.manual_seed(0)
    model = kind.build(512, document_masking=True, weights=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return kind, model.eval()


@pytest.mark.parametrize(
    ("family", "bits", "precision", "tolerance"),
    [
        ("llama", "4bit", "no", 1e-4),
        ("qwen", "4bit", "no", 1e-4),
        # bf16 compute: the quantised model's matmuls and the export's weights are rounded to
        # bf16 in different places.
        ("llama", "4bit", "bf16", 0.1),
        # LLM.int8 also quantises the activations (row-wise, outliers apart): the exported
        # dequantised weights compute the exact product, the int8 kernel a rounded one.
        ("llama", "8bit", "no", 0.1),
    ],
)
def test_merged_export_computes_the_trained_quantised_models_logits(
    folders, tmp_path, family, bits, precision, tolerance
):
    inputs = folders[family]
    kind, model = _trained_quantised(inputs["model"], bits, precision)
    assert model.loss_path == "chunked"  # no [tokens, vocab] logits in training
    out = export_model(kind, model, tmp_path / "final", _facts(inputs), adapter_only=False)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == {"no": "float32", "bf16": "bfloat16"}[precision]
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]  # no quantisation statistic
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        expected = model(ids).logits.float()
        got = exported.eval()(input_ids=ids).logits.float()
    assert (got - expected).abs().max().item() < tolerance
    if precision == "no":  # the adapters moved the logits: the export folded them in
        plain = transformers.AutoModelForCausalLM.from_pretrained(inputs["model"]).eval()
        with torch.no_grad():
            assert (got - plain(input_ids=ids).logits).abs().max().item() > 10 * tolerance


def test_4bit_eval_computes_what_training_computes(folders, tmp_path):
    # On AVX512-BF16 CPUs bitsandbytes would repack the weights in place for its inference
    # kernel (no backward) at the first pass in eval mode without gradients, and the export
    # would then dequantise the repacked codes.
    inputs = folders["llama"]
    kind, model = _trained_quantised(inputs["model"], "4bit")
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trained = model.train()(ids, labels=ids).loss  # no adapter dropout by default
        scored = model.eval()(ids, labels=ids).loss
    assert scored.item() == trained.item()
    out = export_model(kind, model, tmp_path / "final", _facts(inputs), adapter_only=False)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = model(ids).logits
        assert (exported(input_ids=ids).logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_every_adapter_gets_a_gradient_through_checkpointed_quantised_blocks(folders, bits):
    _, model = _trained_quantised(folders["llama"]["model"], bits, grad_checkpointing=True)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    model.train()(ids, labels=ids).loss.backward()
    adapters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in adapters)


def test_adapter_only_export_notes_its_quantised_base(folders, tmp_path):
    inputs = folders["llama"]
    kind, model = _trained_quantised(inputs["model"], "4bit")
    out = export_model(kind, model, tmp_path / "final", _facts(inputs), adapter_only=True)
    note = {
        "folder": str(inputs["model"]),
        "quantisation": {"bits": 4, "quant_type": "nf4", "double_quant": True},
        "compute_dtype": "float32",
    }
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(inputs["model"])
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest[ADAPTER_BASE_KEY] == note
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {MANIFEST_NAME}
    assert not (out / "model.safetensors").exists()
    # peft reads the folder back without a warning.
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert peft.LoraConfig.from_pretrained(out).r == 4


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantisation_is_part_of_the_identity(folders, bits):
    folder = folders["llama"]["model"]
    quantised = resolve_model_kind(
        ModelConfig(model=folder, lora_rank=4, **{f"load_in_{bits}": True})
    )
    plain = resolve_model_kind(ModelConfig(model=folder, lora_rank=4))
    assert "quantisation" not in plain.identity(512)  # states saved before still match
    assert quantised.identity(512)["quantisation"]["bits"] == int(bits[0])


def test_the_merged_export_is_in_the_compute_dtype_unless_asked(folders):
    folder = folders["llama"]["model"]  # stored in float32
    cfg = ModelConfig(model=folder, lora_rank=4, load_in_4bit=True)
    assert resolve_model_kind(cfg, "bf16").export_dtype == "bfloat16"
    assert resolve_model_kind(cfg, "no").export_dtype == "float32"
    assert resolve_model_kind(cfg, "bf16").with_export_dtype("float16").export_dtype == "float16"
    assert resolve_model_kind(cfg, "bf16").with_export_dtype("auto").export_dtype == "bfloat16"


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_an_encoder_decoder_is_refused(tmp_path, bits):
    t5 = write_sample_t5(tmp_path / "t5")
    flag = QUANTISED[bits]
    with pytest.raises(ConfigError, match=f"^{flag} is for decoder-only models") as info:
        resolve_model_kind(ModelConfig(model=t5, lora_rank=4, **{f"load_in_{bits}": True}))
    assert "\n" not in str(info.value)


def test_from_scratch_is_refused(folders):
    cfg = ModelConfig(model=folders["llama"]["model"], lora_rank=4, load_in_8bit=True)
    kind = resolve_model_kind(ModelConfig(**{**cfg.__dict__, "from_scratch": True}))
    with pytest.raises(ConfigError, match="^--load_in_8bit quantises the folder's own weights"):
        kind.build(512, document_masking=True, weights=True)


def test_missing_bitsandbytes_names_the_extra(folders, monkeypatch):
    # A None entry makes `import bitsandbytes` fail as if it were not installed.
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    from trainer_low_mem.hf_model import Quantisation, load_model_folder

    with pytest.raises(ConfigError) as info:
        load_model_folder(folders["llama"]["model"], quantisation=Quantisation(4, torch.float32))
    assert str(info.value) == (
        "--load_in_4bit needs the `bitsandbytes` package: pip install 'lowmem-pipeline[qlora]'"
    )


_NO_NETWORK = """
import socket, sys
attempts = []
def refuse(self, address):
    attempts.append(address)
    raise OSError("no network in this test")
socket.socket.connect = refuse
from lowmem_core.errors import run_cli
def main(argv):
    from lowmem_core.hub_kernels import require_extra_offline
    require_extra_offline("peft", "lora", "--lora_rank")  # peft imports bitsandbytes
run_cli(main, sys.argv[1:])
print("connections:", attempts, "kernels:", sys.modules.get("kernels"))
"""


@pytest.mark.parametrize("debug", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_bitsandbytes_imports_without_the_network_and_quietly(debug):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("LOWMEM_DEBUG", None)
    argv = [sys.executable, "-c", _NO_NETWORK, *(["--debug"] if debug else [])]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # No hub kernel was looked for, and `kernels` stays importable afterwards.
    assert "connections: [] kernels: None" in done.stdout
    assert ("kernels-community" in done.stderr) is (debug and _has_avx512bf16())


def _has_avx512bf16() -> bool:
    """Whether bitsandbytes' CPU backend looks for the hub's fused 4-bit kernel here."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_train_qlora(folders, tmp_path):
    inputs = folders["llama"]
    out = tmp_path / "model_save"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    argv = [
        accelerate, "launch", "--num_processes", "2", "--main_process_port", str(_free_port()),
        "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no",
        "train_low_mem.py", "train", "--model", str(inputs["model"]),
        "--data", str(inputs["train_data"]), "--eval_data", str(inputs["eval_data"]),
        "--load_in_4bit", "True", "--lora_rank", "4", "--grad_checkpointing", "True",
        "--lr", "1e-2", "--warmup_steps", "1", "--global_batch", "4", "--max_seq_len", "128",
        "--max_steps", "4", "--log_every", "1", "--progress_bar=False",
        "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert "world_size: 2" in text and "4-bit NF4 weights computed in float32" in text
    assert "kernels-community" not in text  # hidden without --debug
    assert "step: 4/4, eval_loss: " in text
    config = json.loads((out / "final" / "config.json").read_text())
    assert "quantization_config" not in config
    transformers.AutoModelForCausalLM.from_pretrained(out / "final")
