"""The export never deletes what the user has: final/ is replaced only when it holds nothing but
an export (this release's, or an earlier one's), and --model / --init_from inside --output_dir
are refused; both before any training, and the folder check again at export."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest
import torch

from lowmem_core.errors import ConfigError
from trainer_low_mem.cli import parse_job_config
from trainer_low_mem.config import ModelConfig
from trainer_low_mem.export import MANIFEST_NAME, export_model
from trainer_low_mem.loop import train
from trainer_low_mem.models import DataFacts, resolve_model_kind
from trainer_low_mem.sample_model import write_sample_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
BYTE_DATA = DataFacts(
    path=Path("data"),
    vocab_size=259,
    bos_id=256,
    eos_id=257,
    pad_id=258,
    is_sft=False,
    token_bytes=0,
    index_bytes=None,
    tokenizer_dir=None,
)
TINY = ["--model_preset", "tiny"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory, build_sample_sft) -> dict[str, Path]:
    """A tiny Llama folder with a model card and a licence beside its tokenizer (as a hub
    download has), and SFT data built with its tokenizer (so that folder is the dataset's
    tokenizer folder)."""
    root = tmp_path_factory.mktemp("llama")
    model = write_sample_model(root / "model")
    (model / "README.md").write_text("# sample model\n")
    (model / "LICENSE").write_text("sample licence\n")
    return build_sample_sft(root, model, num_train=24, num_eval=2)


def _flags(data: Path, out: Path, *model: str) -> list[str]:
    return [
        *model, "--data", str(data), "--output_dir", str(out), "--max_seq_len", "128",
        "--auto_plan=False", "--batch_size_per_gpu", "2", "--gradient_accumulation_steps", "1",
        "--max_steps", "1", "--save_every", "0", "--num_readers", "1", "--progress_bar=False",
    ]  # fmt: skip


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links not followed) -> sha256 of its bytes, or the link."""
    out = {}
    for item in sorted(folder.rglob("*")):
        name = str(item.relative_to(folder))
        if item.is_symlink():
            out[name] = f"-> {item.readlink()}"
        elif item.is_file():
            out[name] = hashlib.sha256(item.read_bytes()).hexdigest()
    return out


def _refused(flags: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        train(parse_job_config(flags))
    message = str(info.value)
    assert "\n" not in message
    return message


def _tiny_export(out: Path) -> Path:
    kind = resolve_model_kind(ModelConfig(model_preset="tiny"))
    model = kind.build(259, document_masking=False, weights=True)
    return export_model(kind, model, out, BYTE_DATA, adapter_only=False)


# -- final/ holding the user's files: refused before training -------------------------------
def _notes(final: Path) -> None:
    final.mkdir(parents=True)
    (final / "NOTES.md").write_text("my notes on this run\n")


def _results_folder(final: Path) -> None:
    (final / "eval_results").mkdir(parents=True)
    (final / "eval_results" / "scores.json").write_text("{}")


def _notes_beside_an_export(final: Path) -> None:
    _tiny_export(final)
    (final / "NOTES.md").write_text("my notes on this run\n")


def _edited_export_config(final: Path) -> None:
    _tiny_export(final)
    config = json.loads((final / "config.json").read_text())
    (final / "config.json").write_text(json.dumps({**config, "my_setting": 1}))


def _link_to_the_users_folder(final: Path) -> None:
    mine = final.parent.parent / "my_models"
    _notes(mine)
    final.parent.mkdir(parents=True)
    final.symlink_to(mine, target_is_directory=True)


def _a_file(final: Path) -> None:
    final.parent.mkdir(parents=True)
    final.write_text("a file named final\n")


USERS_FILES = [
    (_notes, "NOTES.md"),
    (_results_folder, "eval_results/"),
    (_notes_beside_an_export, "NOTES.md"),
    (_edited_export_config, "config.json (changed)"),
    (_link_to_the_users_folder, "is a link"),
    (_a_file, "is a file"),
]


@pytest.mark.parametrize(("make", "named"), USERS_FILES, ids=[m.__name__ for m, _ in USERS_FILES])
def test_final_holding_the_users_files_refuses_the_run_before_training(
    sample_dataset_dir, tmp_path, make, named
):
    out = tmp_path / "out"
    make(out / "final")
    before = _tree(tmp_path)
    message = _refused(_flags(sample_dataset_dir, out, *TINY))
    assert str(out / "final") in message and named in message
    assert "move" in message and "choose another --output_dir" in message
    assert _tree(tmp_path) == before  # nothing trained, saved, exported or removed


def test_a_file_put_in_final_during_the_run_is_kept_at_export(tmp_path):
    final = _tiny_export(tmp_path / "final")
    exported = _tree(final)
    (final / "NOTES.md").write_text("written while the run trained\n")
    with pytest.raises(ConfigError, match="NOTES.md"):
        _tiny_export(final)
    assert _tree(final) == {**exported, "NOTES.md": _tree(final)["NOTES.md"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temp folder left


# -- final/ holding only an export: replaced -------------------------------------------------
def test_an_export_replaces_the_previous_one_world_readable(tmp_path):
    torch.manual_seed(0)
    final = _tiny_export(tmp_path / "final")
    first = _tree(final)
    assert MANIFEST_NAME in first
    torch.manual_seed(1)
    _tiny_export(final)
    assert _tree(final)["model.safetensors"] != first["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temp or old folder
    assert {stat.S_IMODE(p.stat().st_mode) for p in final.iterdir()} == {0o644}


def _earlier_release_export(final: Path, tokenizer_dir: Path, adapter: bool) -> None:
    """final/ as earlier releases left it: no manifest, and every file of the dataset's tokenizer
    folder copied in (model card and licence included); or peft's adapter files and card."""
    final.mkdir(parents=True)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, final / item.name)
    if adapter:
        for name in ("config.json", "model.safetensors", "README.md"):
            (final / name).unlink()
        (final / "adapter_config.json").write_text("{}")
        (final / "adapter_model.safetensors").write_bytes(b"adapter")
        (final / "README.md").write_text("---\nbase_model: m\nlibrary_name: peft\n---\n# card\n")


@pytest.mark.parametrize("adapter", [False, True], ids=["merged", "adapter-only"])
def test_an_earlier_releases_export_is_replaced(llama, tmp_path, adapter):
    out = tmp_path / "out"
    _earlier_release_export(out / "final", llama["model"], adapter)
    flags = _flags(llama["train_data"], out, "--model", str(llama["model"]))
    result = train(parse_job_config(flags))
    names = {p.name for p in result.export_dir.iterdir()}
    assert MANIFEST_NAME in names and not {"README.md", "LICENSE"} & names
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "llama"


def test_an_earlier_export_with_a_changed_copy_is_refused(llama, tmp_path):
    out = tmp_path / "out"
    _earlier_release_export(out / "final", llama["model"], adapter=False)
    (out / "final" / "README.md").write_text("# my results on this model\n")
    before = _tree(tmp_path)
    message = _refused(_flags(llama["train_data"], out, "--model", str(llama["model"])))
    assert "(README.md)" in message
    assert _tree(tmp_path) == before


# -- --model / --init_from inside --output_dir ------------------------------------------------
def _inside(llama: Path, root: Path) -> tuple[list[str], Path, Path]:
    """A LoRA run on OUTPUT_DIR/final exporting the adapter alone (the base would be deleted and
    the adapter would name itself as its base): (model flags, output dir, what must stay)."""
    out = root / "out"
    shutil.copytree(llama, out / "final")
    flags = ["--model", str(out / "final"), "--lora_rank", "4", "--export_adapter_only"]
    return flags, out, out / "final"


def _init_from_inside(llama: Path, root: Path):
    out = root / "out"
    _tiny_export(out / "final")
    return [*TINY, "--init_from", str(out / "final")], out, out / "final"


def _model_through_a_link(llama: Path, root: Path):
    flags, out, keep = _inside(llama, root)
    (root / "link").symlink_to(out / "final", target_is_directory=True)
    return ["--model", str(root / "link"), *flags[2:]], out, keep


def _output_dir_through_a_link(llama: Path, root: Path):
    shutil.copytree(llama, root / "work" / "model")
    (root / "out").symlink_to(root / "work", target_is_directory=True)
    return ["--model", str(root / "work" / "model")], root / "out", root / "work" / "model"


INSIDE = [_inside, _init_from_inside, _model_through_a_link, _output_dir_through_a_link]


@pytest.mark.parametrize("make", INSIDE, ids=[m.__name__ for m in INSIDE])
def test_a_model_inside_the_output_dir_is_refused_before_training(
    llama, sample_dataset_dir, tmp_path, make
):
    pytest.importorskip("peft")
    model_flags, out, keep = make(llama["model"], tmp_path)
    data = llama["train_data"] if "--model" in model_flags else sample_dataset_dir
    before = _tree(keep)
    message = _refused(_flags(data, out, *model_flags))
    flag = "--init_from" if "--init_from" in model_flags else "--model"
    assert message.startswith(f"{flag} ") and f"is inside --output_dir {out}" in message
    assert _tree(keep) == before
    assert not (out / "train_latest_state").exists()


def test_a_model_beside_the_output_dir_with_the_same_prefix_trains(llama, tmp_path):
    model = tmp_path / "out-model"
    shutil.copytree(llama["model"], model)
    flags = _flags(llama["train_data"], tmp_path / "out", "--model", str(model))
    assert train(parse_job_config(flags)).export_dir == tmp_path / "out" / "final"


def _tiny_export(out: Path) -> Path:
    kind = resolve_model_kind(ModelConfig(model_preset="tiny")).with_export_dtype("auto")
    model = kind.build(259, document_masking=False, weights=False)
    return export_model(kind, model, out, BYTE_DATA, adapter_only=False)


def test_leftovers_of_a_killed_export_are_cleaned_and_a_moved_aside_export_put_back(tmp_path):
    final = _tiny_export(tmp_path / "final")
    before = _tree(final)
    # A kill -9 between the two renames of an export: final/ moved aside, the new one not in.
    final.rename(tmp_path / ".final.export-old-4194301")
    (tmp_path / ".final.export-tmp-4194301").mkdir()
    (tmp_path / ".final.export-tmp-4194301" / "model.safetensors").write_bytes(b"half")
    from trainer_low_mem.export import recover_interrupted_export

    recover_interrupted_export(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert _tree(final) == before  # the export that was moved aside is back
    _tiny_export(final)  # and the next export replaces it as usual
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_disk_filling_during_the_export_is_one_line_and_keeps_the_last_export(
    tmp_path, monkeypatch
):
    from safetensors import SafetensorError

    from lowmem_core.errors import CheckpointError
    from trainer_low_mem import export

    final = _tiny_export(tmp_path / "final")
    before = _tree(final)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(export, "save_file", full)
    with pytest.raises(CheckpointError, match=r"cannot write the export to .*No space left"):
        _tiny_export(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert _tree(final) == before
