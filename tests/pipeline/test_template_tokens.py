"""A chat template's tokens read from a tokenizer folder's files equal what `transformers` reads,
and are used without loading `transformers`' tokenizer only once that has been seen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import template_tokens as tt
from pipeline.template_tokens import TemplateTokens, same_for_templates, template_tokens

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

QWEN3 = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "qwen3"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content }}<|eot_id|>{% endfor %}"
)


def folder_with(tmp_path: Path, name: str, template, **specials) -> Path:
    """A tokenizer folder saved by transformers (a word-level vocabulary: what is read here does
    not depend on the model) with `template` and the named special tokens."""
    words = ["hi", "there", *(v for v in specials.values() if v)]
    words += ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="hi"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        **specials,
    )
    fast.chat_template = template
    folder = tmp_path / name
    fast.save_pretrained(folder)
    return folder


def case_folders(tmp_path: Path) -> list[Path]:
    folders = [
        folder_with(tmp_path, "chatml", CHATML, eos_token="<|im_end|>", pad_token="<pad>"),
        folder_with(tmp_path, "llama3", LLAMA3, bos_token="<s>", eos_token="<|eot_id|>"),
        folder_with(tmp_path, "named", {"default": CHATML, "tool_use": LLAMA3}, eos_token="</s>"),
    ]
    # A template kept in tokenizer_config.json rather than chat_template.jinja.
    moved = folder_with(tmp_path, "in-config", CHATML, eos_token="</s>", unk_token="hi")
    config = json.loads((moved / "tokenizer_config.json").read_text())
    jinja = moved / "chat_template.jinja"
    if jinja.is_file():
        config["chat_template"] = jinja.read_text()
        jinja.unlink()
    (moved / "tokenizer_config.json").write_text(json.dumps(config))
    folders.append(moved)
    if QWEN3.is_dir():
        folders.append(QWEN3)
    return folders


def test_the_files_give_what_transformers_reads(tmp_path):
    for folder in case_folders(tmp_path):
        light = TemplateTokens(folder)
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        assert same_for_templates(light, tok), folder.name
        assert light.chat_template and light.eos_token == tok.eos_token
        eos_id = tok.convert_tokens_to_ids(tok.eos_token)
        if eos_id in light.added_tokens_decoder:
            assert light.convert_ids_to_tokens(eos_id) == tok.convert_ids_to_tokens(eos_id)


def test_a_folder_is_read_from_its_files_once_transformers_was_seen_to_agree(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = folder_with(tmp_path, "chatml", CHATML, eos_token="<|im_end|>")
    assert isinstance(template_tokens(folder), TemplateTokens)
    kept = list((tmp_path / "cache" / "lowmem-pipeline" / "chat-template").iterdir())
    assert [json.loads(p.read_text()) for p in kept] == [{"same": True}]
    monkeypatch.setattr(tt, "_transformers_tokenizer", lambda f: pytest.fail("loaded again"))
    assert isinstance(template_tokens(folder), TemplateTokens)
    # Another template is another folder: compared afresh.
    (folder / "chat_template.jinja").write_text(LLAMA3)
    with pytest.raises(pytest.fail.Exception, match="loaded again"):
        template_tokens(folder)


def test_where_the_files_read_otherwise_transformers_tokenizer_is_used_every_time(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = folder_with(tmp_path, "chatml", CHATML, eos_token="<|im_end|>")
    monkeypatch.setattr(tt, "same_for_templates", lambda light, tok: False)
    first = template_tokens(folder)
    assert isinstance(first, transformers.PreTrainedTokenizerBase)
    assert isinstance(template_tokens(folder), transformers.PreTrainedTokenizerBase)
