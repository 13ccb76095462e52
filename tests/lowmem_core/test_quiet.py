"""Library noise stays off the console unless --debug: deprecation notices, progress bars and
the start-up chatter of accelerate and DeepSpeed; errors still show."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lowmem_core.errors import run_cli
from lowmem_core.quiet import NOISE_ENV, library_noise_hidden

REPO = Path(__file__).resolve().parents[2]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def records():
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("DeepSpeed", "accelerate")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def _chatter() -> None:
    warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU.")
    logging.getLogger("accelerate.utils.other").warning("Detected kernel version 5.4.0")
    logging.getLogger("DeepSpeed").error("a DeepSpeed error")
    logging.getLogger("accelerate.state").error("an accelerate error")


def test_notices_are_hidden_inside_and_back_after(records, monkeypatch):
    for name in NOISE_ENV:
        monkeypatch.delenv(name, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with library_noise_hidden():
            assert all(os.environ[name] == value for name, value in NOISE_ENV.items())
            _chatter()
        assert not caught
        assert records.messages == ["a DeepSpeed error", "an accelerate error"]
        assert all(name not in os.environ for name in NOISE_ENV)
        _chatter()
    assert [str(w.message) for w in caught] == ["`is_gradient_checkpointing` is deprecated"]
    assert len(records.messages) == 2 + 4


def test_a_users_own_setting_is_kept(monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    with library_noise_hidden():
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"


@pytest.mark.parametrize("argv, shown", [([], False), (["--debug"], True)])
def test_run_cli_hides_them_and_debug_shows_them(records, argv, shown):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli(lambda args: _chatter(), argv) == 0
    assert bool(caught) is shown
    assert ("Setting accelerator to CPU." in records.messages) is shown


@pytest.mark.slow
def test_plan_of_a_lora_model_folder_opens_without_library_warnings(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ).save_pretrained(tmp_path / "llama")
    argv = [sys.executable, "train_low_mem.py", "plan", "--model", str(tmp_path / "llama")]
    argv += ["--lora_rank", "8", "--max_seq_len", "128", "--global_batch", "8"]
    env = {k: v for k, v in os.environ.items() if k not in NOISE_ENV and k != "LOWMEM_DEBUG"}

    def stderr(*extra: str) -> str:
        done = subprocess.run(
            [*argv, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("plan: global batch 8")
        return done.stderr

    assert stderr() == ""
    assert "FutureWarning" in stderr("--debug")  # peft asks transformers a deprecated question
