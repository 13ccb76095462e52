"""Optional features without their extra installed: one ConfigError line naming the extra."""

from __future__ import annotations

import sys

import pytest

from lowmem_core.errors import ConfigError, require_extra


def test_require_extra_returns_the_module_when_installed():
    assert require_extra("json.decoder", "none", "reading JSON").__name__ == "json.decoder"


def test_require_extra_names_purpose_package_and_install_command(monkeypatch):
    # What an environment without it looks like, even after an earlier test imported it.
    for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(ConfigError) as info:
        require_extra("deepspeed.ops.adam", "deepspeed", "ZeRO CPU optimizer offload")
    message = str(info.value)
    assert message.startswith("ZeRO CPU optimizer offload needs the `deepspeed` package")
    assert "pip install 'lowmem-pipeline[deepspeed]'" in message and "\n" not in message


def test_a_broken_dependency_of_an_installed_package_is_not_hidden(monkeypatch, tmp_path):
    (tmp_path / "fake_installed_pkg.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        require_extra("fake_installed_pkg", "hf", "anything")


def _tokenizer_json(tmp_path):
    from pipeline.tokenizer import load_tokenizer

    load_tokenizer(str(tmp_path / "tokenizer.json"))


def _datasets_folder(tmp_path):
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text("{}")
    build_dataset(BuildConfig(inputs=[folder], out=tmp_path / "out"), progress=False)


def _bench_plot(tmp_path):
    from bench.report import plot

    plot(None, tmp_path / "bench.png", "title")


def _lora(tmp_path):
    from trainer_low_mem.config import ModelConfig
    from trainer_low_mem.models import resolve_model_kind

    kind = resolve_model_kind(ModelConfig(model_preset="tiny", lora_rank=4))
    kind.build(259, document_masking=False, weights=True)


@pytest.mark.parametrize(
    "use, blocked, extra",
    [
        (_tokenizer_json, "tokenizers", "tokenizers"),
        (_datasets_folder, "datasets", "hf"),
        (_bench_plot, "matplotlib", "plot"),
        (_lora, "peft", "lora"),
    ],
)
def test_each_optional_feature_names_its_extra(use, blocked, extra, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, blocked, None)
    with pytest.raises(ConfigError, match=rf"pip install 'lowmem-pipeline\[{extra}\]'"):
        use(tmp_path)
