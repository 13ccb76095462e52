"""A model folder trains from all of its weights or is refused in one line (trainer_low_mem/
hf_model.py): shards with or without their index, consolidated.safetensors and PyTorch shards
load; a weight missing from the files, a tensor the model does not take or one of another shape,
a truncated file, a folder without weights (unless --from_scratch), a broken config.json and a
LoRA target the export could not merge are each one ConfigError naming the file and the fix,
through `train` and `plan` alike."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowmem_core.errors import ConfigError
from trainer_low_mem.cli import main, parse_plan_config, plan_from_config
from trainer_low_mem.config import ModelConfig
from trainer_low_mem.export import export_model
from trainer_low_mem.hf_model import load_model_folder, read_folder_config
from trainer_low_mem.models import DataFacts, resolve_model_kind
from trainer_low_mem.models.init_weights import load_initial_weights
from trainer_low_mem.sample_model import write_sample_model
from trainer_low_mem.seq2seq import load_seq2seq_folder

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[3]
VOCAB = 96
SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _llama(tie: bool) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=tie,
    )


def _t5() -> transformers.T5Config:
    return transformers.T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def _saved(out: Path, config, auto_class: str = "AutoModelForCausalLM") -> Path:
    torch.manual_seed(0)
    getattr(transformers, auto_class).from_config(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Folders as save_pretrained writes them: Llama with its head untied and tied, T5."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "llama": _saved(root / "llama", _llama(tie=False)),
        "tied": _saved(root / "tied", _llama(tie=True)),
        "t5": _saved(root / "t5", _t5(), "AutoModelForSeq2SeqLM"),
    }


def _tensors(source: Path) -> dict[str, torch.Tensor]:
    return load_file(source / "model.safetensors")


def _rewritten(source: Path, out: Path, files: dict[str, dict | bytes]) -> Path:
    """`source` without its weights file, and `files` (tensors or raw bytes) in its place."""
    out.mkdir(parents=True)
    for f in source.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    for name, content in files.items():
        if isinstance(content, bytes):
            (out / name).write_bytes(content)
        elif name.endswith(".bin"):
            torch.save(content, out / name)
        else:
            save_file(content, out / name, metadata={"format": "pt"})
    return out


def _halves(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    keys = sorted(tensors)
    cut = len(keys) // 2
    return {k: tensors[k] for k in keys[:cut]}, {k: tensors[k] for k in keys[cut:]}


def _assert_weights_equal(hf_model, tensors: dict[str, torch.Tensor]) -> None:
    own = hf_model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in tensors.items())


# -- weights files -------------------------------------------------------------------------


def _unindexed_layouts(tensors) -> dict[str, dict]:
    first, second = _halves(tensors)
    return {
        "shards-without-index": {SHARD_1: first, SHARD_2: second},
        "consolidated": {"consolidated.safetensors": tensors},
        "pytorch-shards-without-index": {
            "pytorch_model-00001-of-00002.bin": first,
            "pytorch_model-00002-of-00002.bin": second,
        },
    }


@pytest.mark.parametrize(
    "layout", ["shards-without-index", "consolidated", "pytorch-shards-without-index"]
)
def test_weights_from_pretrained_would_not_find_load_every_tensor(sources, tmp_path, layout):
    tensors = _tensors(sources["llama"])
    folder = _rewritten(sources["llama"], tmp_path / layout, _unindexed_layouts(tensors)[layout])
    kind = resolve_model_kind(ModelConfig(model=folder))
    module = kind.build(VOCAB, document_masking=True, weights=True)
    _assert_weights_equal(module.hf_model, tensors)
    assert kind.describe(module).startswith(f"{folder} (llama, its weights; ")
    assert module.hf_model.name_or_path == str(folder)  # not the temporary folder it loaded from
    ids = torch.arange(3, 19)[None]
    reference = transformers.AutoModelForCausalLM.from_pretrained(sources["llama"])
    torch.testing.assert_close(
        module(ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss
    )


def test_an_encoder_decoder_loads_its_shards_without_their_index(sources, tmp_path):
    tensors = _tensors(sources["t5"])
    first, second = _halves(tensors)
    folder = _rewritten(sources["t5"], tmp_path / "t5", {SHARD_1: first, SHARD_2: second})
    _assert_weights_equal(load_seq2seq_folder(folder).hf_model, tensors)


def test_one_shard_alone_is_refused_naming_the_missing_weights_and_shard(sources, tmp_path):
    first, second = _halves(_tensors(sources["llama"]))
    folder = _rewritten(sources["llama"], tmp_path / "half", {SHARD_1: first})
    with pytest.raises(ConfigError) as info:
        load_model_folder(folder)
    message = str(info.value)
    assert message.startswith(
        f"--model {folder}: the weights in {SHARD_1} do not fit its config.json: missing "
        f"{len(second)} weights the model expects ({min(second)}, "
    )
    assert f"; {SHARD_2} is absent; " in message
    assert message.endswith("or pass --from_scratch to train from random weights")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("source", "change", "expected"),
    [
        (
            "llama",
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            r"missing 1 weight the model expects \(model\.layers\.1\.mlp\.up_proj\.weight\)",
        ),
        (
            "llama",
            lambda t: t.update({"model.extra.weight": torch.zeros(3)}),
            r"1 tensor the model does not take \(model\.extra\.weight\)",
        ),
        (
            "llama",
            lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(5, 5)}),
            r"1 tensor of another shape \(e\.g\. model\.layers\.0\.mlp\.up_proj\.weight: "
            r"\(5, 5\) in the files, \(64, 32\) in the model\)",
        ),
        (
            "t5",
            lambda t: t.pop("decoder.block.0.layer.2.DenseReluDense.wo.weight"),
            r"missing 1 weight the model expects \(decoder\.block\.0\.layer\.2\.DenseReluDense",
        ),
    ],
    ids=["missing", "unexpected", "reshaped", "t5-missing"],
)
def test_weights_that_do_not_fit_the_config_are_refused(
    sources, tmp_path, source, change, expected
):
    tensors = _tensors(sources[source])
    change(tensors)
    folder = _rewritten(sources[source], tmp_path / "f", {"model.safetensors": tensors})
    with pytest.raises(ConfigError, match=expected) as info:
        resolve_model_kind(ModelConfig(model=folder)).build(
            VOCAB, document_masking=True, weights=True
        )
    assert str(info.value).startswith(f"--model {folder}: the weights in model.safetensors ")


def test_a_tied_head_and_recomputed_buffers_are_not_missing(sources, tmp_path):
    tensors = _tensors(sources["tied"])
    assert "lm_head.weight" not in tensors  # save_pretrained writes a tied weight once
    _assert_weights_equal(load_model_folder(sources["tied"]).hf_model, tensors)
    # Checkpoints of older transformers versions hold the rotary inverse frequencies.
    with_buffers = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    folder = _rewritten(sources["tied"], tmp_path / "old", {"model.safetensors": with_buffers})
    _assert_weights_equal(load_model_folder(folder).hf_model, tensors)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (lambda whole: whole[: len(whole) // 2], "incomplete metadata, file not fully covered"),
        (lambda whole: os.urandom(4096), "header too large"),
        (lambda whole: b"", "header too small"),
    ],
    ids=["truncated", "random-bytes", "empty"],
)
def test_an_unreadable_weights_file_is_named(sources, tmp_path, content, expected):
    whole = (sources["llama"] / "model.safetensors").read_bytes()
    folder = _rewritten(sources["llama"], tmp_path / "f", {"model.safetensors": content(whole)})
    with pytest.raises(ConfigError) as info:
        load_model_folder(folder)
    assert str(info.value) == (
        f"{folder / 'model.safetensors'} is not a readable weights file (Error while "
        f"deserializing header: {expected}): it is truncated or corrupt; download it again"
    )


def test_an_unreadable_pytorch_file_or_shard_is_refused_in_one_line(sources, tmp_path):
    folder = _rewritten(sources["llama"], tmp_path / "bin", {"pytorch_model.bin": b"\0" * 512})
    with pytest.raises(ConfigError, match=rf"^cannot load the weights in {folder} \("):
        load_model_folder(folder)
    first, _ = _halves(_tensors(sources["llama"]))
    garbage = {"pytorch_model-00001-of-00002.bin": os.urandom(512)}
    folder = _rewritten(sources["llama"], tmp_path / "shard", garbage)
    with pytest.raises(ConfigError, match="pytorch_model-00001-of-00002.bin is not a readable"):
        load_model_folder(folder)


def test_an_index_that_lists_absent_shards_or_is_not_an_index_is_refused(sources, tmp_path):
    first, second = _halves(_tensors(sources["llama"]))
    folder = _rewritten(sources["llama"], tmp_path / "f", {SHARD_1: first})
    weight_map = {**dict.fromkeys(first, SHARD_1), **dict.fromkeys(second, SHARD_2)}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ConfigError) as info:
        load_model_folder(folder)
    assert str(info.value) == (
        f"{index} lists 2 weight files but 1 of them are absent ({SHARD_2}); download them "
        f"into {folder}"
    )
    index.write_text("[]")
    with pytest.raises(ConfigError, match="is not a weights index .* delete it to load"):
        load_model_folder(folder)


# -- a folder without weights ----------------------------------------------------------------


@pytest.mark.parametrize("source", ["llama", "t5"])
def test_a_folder_without_weights_trains_only_from_scratch_and_still_plans(
    sources, tmp_path, source
):
    folder = _rewritten(sources[source], tmp_path / "config-only", {})
    kind = resolve_model_kind(ModelConfig(model=folder))
    with pytest.raises(ConfigError) as info:
        kind.build(VOCAB, document_masking=True, weights=True)
    assert str(info.value) == (
        f"--model {folder} holds no weights (no model.safetensors, model-*.safetensors or "
        "pytorch_model*.bin); put the weights in it, or pass --from_scratch to train from "
        "random weights with its config.json"
    )
    assert kind.shape(VOCAB).param_count() > 0  # the planner's meta build reads no weights
    scratch = resolve_model_kind(ModelConfig(model=folder, from_scratch=True))
    module = scratch.build(VOCAB, document_masking=True, weights=True)
    assert "random init from its config" in scratch.describe(module)


def test_plan_takes_a_folder_without_weights(sources, tmp_path):
    folder = _rewritten(sources["llama"], tmp_path / "config-only", {})
    flags = ["--model", str(folder), "--max_seq_len", "32", "--global_batch", "4"]
    assert plan_from_config(parse_plan_config(flags)).micro_batch_per_rank >= 1


def test_init_from_gives_a_folder_without_weights_its_weights(sources, tmp_path):
    folder = _rewritten(sources["llama"], tmp_path / "config-only", {})
    kind = resolve_model_kind(ModelConfig(model=folder, init_from=sources["llama"]))
    module = kind.build(VOCAB, document_masking=True, weights=True)
    load_initial_weights(kind, module, sources["llama"])
    _assert_weights_equal(module.hf_model, _tensors(sources["llama"]))


# -- --init_from ---------------------------------------------------------------------------


def test_init_from_without_an_untied_head_is_refused(sources, tmp_path):
    tensors = _tensors(sources["llama"])
    del tensors["lm_head.weight"]  # untied: the head is a weight of its own
    source = _rewritten(sources["llama"], tmp_path / "headless", {"model.safetensors": tensors})
    kind = resolve_model_kind(ModelConfig(model=sources["llama"]))
    module = kind.build(VOCAB, document_masking=True, weights=True)
    with pytest.raises(ConfigError, match=r"\(1 missing, 0 unexpected tensors, e\.g\. lm_head"):
        load_initial_weights(kind, module, source)
    # A tied head is the embedding: an export without it fits.
    tied = resolve_model_kind(ModelConfig(model=sources["tied"]))
    load_initial_weights(tied, tied.build(VOCAB, document_masking=True, weights=True), source)


def test_init_from_an_unreadable_file_or_config_is_one_line(sources, tmp_path):
    kind = resolve_model_kind(ModelConfig(model=sources["llama"]))
    module = kind.build(VOCAB, document_masking=True, weights=True)
    whole = (sources["llama"] / "model.safetensors").read_bytes()
    cut = _rewritten(sources["llama"], tmp_path / "cut", {"model.safetensors": whole[:1000]})
    with pytest.raises(ConfigError, match=r"model\.safetensors is not a readable safetensors"):
        load_initial_weights(kind, module, cut)
    number = _rewritten(sources["llama"], tmp_path / "number", {"model.safetensors": whole})
    (number / "config.json").write_text("5")  # not an export's config: a state's names
    with pytest.raises(ConfigError, match="does not fit this model"):
        load_initial_weights(kind, module, number)


# -- config.json ---------------------------------------------------------------------------

BROKEN_CONFIGS = {
    "unknown-model-type": (
        lambda c: {**c, "model_type": "llamazz"},
        r"model_type 'llamazz' is not an architecture transformers .* upgrade transformers",
    ),
    "not-json": (lambda c: "{not json", r"\(not JSON: .*\); fix the file"),
    "json-list": (lambda c: [c], r"\(it holds a JSON list, not an object of settings\)"),
    "json-number": (lambda c: 5, r"\(it holds a JSON int, not an object of settings\)"),
    "pad-beyond-vocab": (
        lambda c: {**c, "pad_token_id": VOCAB + 4},
        rf"pad_token_id {VOCAB + 4} is not below vocab_size {VOCAB}, so the embedding has no "
        r"row for it; set vocab_size to the tokenizer's size",
    ),
    "vocab-zero": (lambda c: {**c, "vocab_size": 0}, r"vocab_size is 0; set it"),
    "heads-do-not-divide": (
        lambda c: {**c, "num_attention_heads": 5},
        r"\(ValueError: The hidden size \(32\) is not a multiple of the number of attention "
        r"heads \(5\)",
    ),
    "vocab-not-a-number": (lambda c: {**c, "vocab_size": "many"}, r"vocab_size"),
}


def _broken_config(source: Path, out: Path, change) -> Path:
    shutil.copytree(source, out)
    config = change(json.loads((source / "config.json").read_text()))
    (out / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return out


@pytest.mark.parametrize("case", BROKEN_CONFIGS, ids=list(BROKEN_CONFIGS))
def test_a_broken_config_json_is_one_line_naming_it(sources, tmp_path, case):
    change, expected = BROKEN_CONFIGS[case]
    folder = _broken_config(sources["llama"], tmp_path / case, change)
    with pytest.raises(ConfigError, match=expected) as info:
        resolve_model_kind(ModelConfig(model=folder))
    assert str(info.value).startswith(str(folder / "config.json"))
    assert "\n" not in str(info.value)


def test_a_decoder_start_beyond_the_vocabulary_is_refused(sources, tmp_path):
    folder = _broken_config(
        sources["t5"], tmp_path / "t5", lambda c: {**c, "decoder_start_token_id": VOCAB}
    )
    with pytest.raises(ConfigError, match=f"decoder_start_token_id {VOCAB} is not below"):
        resolve_model_kind(ModelConfig(model=folder))


def test_a_model_that_is_not_a_language_model_is_refused(tmp_path):
    transformers.ViTConfig(hidden_size=16, num_hidden_layers=1).save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError) as info:
        resolve_model_kind(ModelConfig(model=tmp_path / "vit")).shape(VOCAB)
    assert str(info.value) == (
        f"--model {tmp_path / 'vit'} is a vit model, which transformers does not build as a "
        "causal language model (AutoModelForCausalLM); pass the folder of a causal language model"
    )


def test_the_unknown_model_type_message_keeps_its_prefix(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ConfigError) as info:
        read_folder_config(tmp_path)
    assert str(info.value).startswith(
        f"{tmp_path / 'config.json'} cannot be read by transformers ("
    )


# -- LoRA targets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "targets", "expected"),
    [
        ("tied", ["lm_head"], r"lm_head is --model .*'s output head, which takes no adapter"),
        ("llama", ["q_proj", "lm_head"], r"lm_head is --model .*'s output head"),
        ("tied", ["embed_tokens"], r"model\.embed_tokens shares its weight with lm_head"),
        ("t5", ["lm_head"], r"lm_head is --model .*'s output head"),
        ("t5", ["embed_tokens"], r"encoder\.embed_tokens shares its weight with"),
    ],
    ids=["tied-head", "untied-head", "tied-embedding", "t5-head", "t5-embedding"],
)
def test_lora_on_the_head_or_a_tied_weight_is_refused_in_plan_and_train(
    sources, source, targets, expected
):
    pytest.importorskip("peft")
    cfg = ModelConfig(model=sources[source], lora_rank=2, lora_target_modules=targets)
    with pytest.raises(ConfigError, match=rf"^--lora_target_modules \w+: {expected}"):
        resolve_model_kind(cfg).shape(VOCAB)  # the planner's build
    with pytest.raises(ConfigError, match=expected):
        resolve_model_kind(cfg).build(VOCAB, document_masking=True, weights=True)


def test_lora_on_an_untied_embedding_trains_and_exports(sources, tmp_path):
    pytest.importorskip("peft")
    cfg = ModelConfig(model=sources["llama"], lora_rank=2, lora_target_modules=["embed_tokens"])
    kind = resolve_model_kind(cfg)
    module = kind.build(VOCAB, document_masking=True, weights=True)
    ids = torch.arange(3, 19)[None]
    module(ids, labels=ids).loss.backward()
    trained = [n for n, p in module.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
    data = DataFacts(
        path=Path("data"),
        vocab_size=VOCAB,
        bos_id=None,
        eos_id=1,
        pad_id=2,
        is_sft=False,
        token_bytes=0,
        index_bytes=None,
        tokenizer_dir=None,
    )
    export_model(kind, module, tmp_path / "final", data, adapter_only=False)
    assert (tmp_path / "final" / "model.safetensors").is_file()


# -- through the command line ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory, build_sample_sft) -> dict[str, Path]:
    """The sample Llama folder (tied head) and a prompt/response dataset built with it."""
    root = tmp_path_factory.mktemp("sample")
    return build_sample_sft(root, write_sample_model(root / "model"), 24, 2)


def _flags(data: Path, model: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(data),
        "--model",
        str(model),
        "--max_seq_len",
        "128",
        "--global_batch",
        "4",
        "--num_readers",
        "1",
        *extra,
    ]


def _train_flags(out: Path) -> list[str]:
    return ["--output_dir", str(out), "--max_steps", "1", "--progress_bar=False"]


CLI_CASES = {
    "unknown-model-type": (BROKEN_CONFIGS["unknown-model-type"][0], (), "is not an architecture"),
    "json-list": (BROKEN_CONFIGS["json-list"][0], (), "not an object of settings"),
    "pad-beyond-vocab": (lambda c: {**c, "pad_token_id": 600}, (), "pad_token_id 600 is not"),
    "pad-beyond-vocab-init-from": (
        lambda c: {**c, "pad_token_id": 600},
        ("--init_from", "SAMPLE_MODEL"),
        "pad_token_id 600 is not",
    ),
    "lora-head": (
        None,
        ("--lora_rank", "2", "--lora_target_modules", "lm_head"),
        "lm_head is --model",
    ),
}


@pytest.mark.parametrize("case", CLI_CASES, ids=list(CLI_CASES))
def test_plan_and_train_refuse_in_the_same_one_line(sample, tmp_path, capsys, case):
    change, extra, expected = CLI_CASES[case]
    model = sample["model"]
    if change is not None:
        model = _broken_config(model, tmp_path / "model", change)
    extra = [str(sample["model"]) if e == "SAMPLE_MODEL" else e for e in extra]
    flags = _flags(sample["train_data"], model, *extra)
    lines = {}
    for command in ("plan", "train"):
        more = _train_flags(tmp_path / "out") if command == "train" else []
        assert main([command, *flags, *more]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("error: ")
        lines[command] = errors[0]
    assert lines["plan"] == lines["train"]
    assert expected in lines["train"]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LOWMEM_DEBUG"}
    return subprocess.run(
        [sys.executable, str(REPO / "train_low_mem.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )


def _the_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], proc.stderr
    return lines[-1]


def test_train_names_a_truncated_weights_file_and_plan_still_plans(sample, tmp_path):
    model = shutil.copytree(sample["model"], tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    flags = _flags(sample["train_data"], model)
    error = _the_error(_run(["train", *flags, *_train_flags(tmp_path / "out")]))
    assert error == (
        f"error: {weights} is not a readable weights file (Error while deserializing header: "
        "incomplete metadata, file not fully covered): it is truncated or corrupt; download it "
        "again"
    )
    assert _run(["plan", *flags]).returncode == 0  # the plan reads no weights


def test_plan_refuses_a_pad_token_beyond_the_vocabulary(sample, tmp_path):
    model = _broken_config(sample["model"], tmp_path / "model", lambda c: {**c, "vocab_size": 3})
    error = _the_error(_run(["plan", *_flags(sample["train_data"], model)]))
    assert error.startswith(f"error: {model / 'config.json'}: pad_token_id ")
    assert error.endswith(
        "is not below vocab_size 3, so the embedding has no row for it; set "
        "vocab_size to the tokenizer's size (len(tokenizer)) or pad_token_id "
        "to an id below it"
    )
