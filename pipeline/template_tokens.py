"""What a chat template reads from a Hugging Face tokenizer folder (the template, the named
special tokens, the added tokens), read from the folder's JSON files instead of loading the
tokenizer through `transformers.AutoTokenizer`.

Loading the tokenizer class imports most of `transformers` and parses tokenizer.json again:
about 7 s and 300 MB of a 3,000-record chat build with Qwen3, where rendering itself needs only
`transformers.utils.chat_template_utils`. The files are read as transformers reads them in the
usual cases, but a tokenizer class may add defaults of its own, so a folder is read this way
only once `transformers` has been seen to give the same values for it: the first build with a
folder compares the two and keeps the outcome in the user's cache, keyed by a digest of the
folder's tokenizer files; where they differ, `transformers`' tokenizer is used, every time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lowmem_core.durable import atomic_file
from pipeline.index_cache import user_cache_root

# transformers' named special tokens (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_FILES += ("chat_template.json", "tokenizer.json")


@dataclass(frozen=True)
class AddedToken:
    content: str
    special: bool


class TemplateTokens:
    """The attributes of a `transformers` tokenizer that rendering a chat reads, from the files:
    `chat_template` (text, or {name: text} for named templates), `special_tokens_map`,
    `eos_token`, `added_tokens_decoder` and `convert_ids_to_tokens(id)`."""

    def __init__(self, folder: Path):
        config = _json(folder / "tokenizer_config.json")
        named = {**_json(folder / "special_tokens_map.json"), **config}
        self.special_tokens_map = {
            key: _content(named[key]) for key in NAMED if named.get(key) is not None
        }
        self.eos_token = self.special_tokens_map.get("eos_token")
        self.chat_template = _chat_template(folder, config)
        added = _json(folder / "tokenizer.json").get("added_tokens", [])
        self.added_tokens_decoder = {
            int(t["id"]): AddedToken(t["content"], bool(t.get("special"))) for t in added
        }

    def convert_ids_to_tokens(self, token_id: int) -> str | None:
        added = self.added_tokens_decoder.get(token_id)
        return added.content if added is not None else None


def template_tokens(folder: Path):
    """`TemplateTokens` of `folder` where `transformers` was seen to read the same from it,
    else `transformers`' own tokenizer (which has the same attributes)."""
    path = _verdict_path(folder)
    try:
        same = json.loads(path.read_text())["same"]
    except (OSError, ValueError, KeyError, TypeError):
        same = None
    light = TemplateTokens(folder)
    if same is True:
        return light
    tok = _transformers_tokenizer(folder)
    same = same_for_templates(light, tok)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            f.write(json.dumps({"same": same}).encode())
    except OSError:
        pass  # an unwritable cache only means comparing again next time
    return light if same else tok


def same_for_templates(light: TemplateTokens, tok) -> bool:
    """Whether `light` gives every value a chat template or its caller reads as `tok` does."""
    theirs = {i: (t.content, bool(t.special)) for i, t in tok.added_tokens_decoder.items()}
    ours = {i: (t.content, t.special) for i, t in light.added_tokens_decoder.items()}
    return (
        light.chat_template == tok.chat_template
        and light.special_tokens_map == tok.special_tokens_map
        and light.eos_token == tok.eos_token
        and ours == theirs
    )


def _transformers_tokenizer(folder: Path):
    from lowmem_core.errors import require_extra

    transformers = require_extra("transformers", "hf", "rendering records with messages")
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _verdict_path(folder: Path) -> Path:
    import transformers

    digest = hashlib.sha256(transformers.__version__.encode())
    for name in _FILES:
        path = folder / name
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b"\0absent"))
    for name, template in sorted(_named_templates(folder).items()):
        digest.update(f"\0{name}\0{template}".encode())
    return user_cache_root() / "chat-template" / f"{digest.hexdigest()[:24]}.json"


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}  # transformers' own loading then says what is wrong
    return loaded if isinstance(loaded, dict) else {}


def _content(token) -> str:
    return token.get("content") if isinstance(token, dict) else str(token)


def _chat_template(folder: Path, config: dict):
    """The template as transformers 5 reads it: chat_template.jinja (with the named templates of
    additional_chat_templates/ beside it: {"default": ..., name: ...}) over chat_template.json
    over tokenizer_config.json's; a list of named templates becomes {name: template}."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        default = jinja.read_text(encoding="utf-8")
        named = _named_templates(folder)
        return {"default": default, **named} if named else default
    template = _json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    return template


def _named_templates(folder: Path) -> dict[str, str]:
    extra = folder / "additional_chat_templates"
    if not extra.is_dir():
        return {}
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(extra.glob("*.jinja"))}
