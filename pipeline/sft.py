"""Prompt/response and chat records -> token ids plus each sample's labelled token spans.

A record is `{"prompt": ..., "response": ...}` (field names are options), or
`{"messages": [{"role": ..., "content": ...}, ...]}` rendered once, whole, with the tokenizer's
chat template. A prompt/response sample is tokenised whole and split after its prompt's own
tokens (`encode_pairs` says when it cannot be): one labelled span, the response. In a chat every
assistant turn ("assistant" or "model"; `last_only`: the last one) is a labelled span: its text
and the end-of-turn token the template writes after it, from the "<think>" tag before its
reasoning where the template renders that, found in the rendering by rendering the conversation
again with each assistant text (and reasoning) replaced by a marker (or by the template's
`{% generation %}` blocks), and mapped to tokens by encoding the rendering's pieces between the
span edges, which must give the whole rendering's ids (else the record is refused: no token may
span an edge). The rendering ends with the last turn's end-of-turn token, less a final EOS: the
loader appends EOS after every sample (labelled), so a sample holds one end of turn. Each
sample is stored as one document plus its prompt length (the start of its last span) and, for a
chat with several spans, the spans, so exactly-once, resume and packing work as for plain text.
"""

from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from lowmem_core.errors import PipelineError, require_extra
from pipeline.records import lone_surrogates
from pipeline.template_tokens import template_tokens
from pipeline.tokenizer import Encoded, interleave, with_prefix

ASSISTANT_ROLES = ("assistant", "model")  # "model": Gemma's name for the assistant
_MARK = "\ue000{}\ue001"  # private-use characters around a number: no template rewrites them
_MARK_RE = re.compile("\ue000(\\d+)\ue001")
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_THINK, _THINK_END = "<think>", "</think>"  # a reasoning block, as Qwen3 and R1 write it
_BLANK_THINK_RE = re.compile(r"\s*<think>\s*</think>\s*")


@dataclass(frozen=True)
class SftFields:
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"


@dataclass(frozen=True)
class SftEncoded:
    values: np.ndarray  # (sum(lengths),) uint32: each sample's tokens
    lengths: np.ndarray  # (num_samples,) int64 tokens per sample
    prompt_lengths: (
        np.ndarray
    )  # (num_samples,) int64: where each sample's last labelled span starts
    response_cut: np.ndarray  # (num_samples,) bool: response cut to fit, so its EOS is no target
    tokenised_apart: int = 0  # samples whose prompt and response were tokenised apart
    # (num_samples,) int64 labelled spans listed per sample: 0 where the one span runs from the
    # prompt length to the end (prompt/response samples, chats with one supervised turn).
    span_counts: np.ndarray | None = None
    spans: np.ndarray | None = None  # (sum(span_counts), 2) int64 (start, length) in the sample
    turns: int = 0  # assistant turns in the chats
    turns_supervised: int = 0  # of them labelled

    def __post_init__(self) -> None:
        if self.span_counts is None:
            object.__setattr__(self, "span_counts", np.zeros(self.lengths.size, np.int64))
            object.__setattr__(self, "spans", np.zeros((0, 2), np.int64))

    @property
    def label_tokens(self) -> int:
        """Tokens of the samples that carry labels (the EOS the loader appends not counted)."""
        plain = self.span_counts == 0
        return int((self.lengths - self.prompt_lengths)[plain].sum() + self.spans[:, 1].sum())


@dataclass(frozen=True)
class Chat:
    """A conversation rendered: its text (cut after the last supervised turn, less a final EOS)
    and the (start, end) characters of each supervised turn, in order."""

    text: str
    spans: list[tuple[int, int]]
    turns: int  # assistant turns in the conversation


@dataclass
class Parsed:
    """A chunk's records, each a prompt/response pair or a rendered chat, with its place."""

    places: list[str] = field(default_factory=list)  # "FILE line N", per record
    is_chat: list[bool] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # of the pairs, in order
    responses: list[str] = field(default_factory=list)
    chats: list[Chat] = field(default_factory=list)  # of the chats, in order


class ChatTemplate:
    """The chat template of a Hugging Face tokenizer folder, rendered through `transformers`.

    `kwargs` go to the template (`enable_thinking=False`); each must be a variable the template
    reads. `eos_id`: the build's EOS, dropped where it ends a rendering."""

    def __init__(self, folder: Path, kwargs: dict | None = None, eos_id: int | None = None):
        require_extra("transformers", "hf", "rendering records with messages")
        # The folder's files as transformers reads them (checked once per folder), without
        # loading its tokenizer class: pipeline/template_tokens.py.
        self._tok = template_tokens(folder)
        template = getattr(self._tok, "chat_template", None)
        if not template:
            raise PipelineError(
                f"{folder} has no chat template, so records with messages cannot be rendered; "
                "use prompt/response records or a tokenizer folder with a chat_template"
            )
        if not isinstance(template, str):
            template = template.get("default") if isinstance(template, dict) else None
        self.template: str = template
        self.kwargs = dict(kwargs or {})
        _check_kwargs(self.template, self.kwargs, folder)
        utils = import_module("transformers.utils.chat_template_utils")
        self._render_fn = utils.render_jinja_template
        self.markers = bool(_GENERATION_RE.search(self.template))
        eos = self._tok.convert_ids_to_tokens(eos_id) if eos_id is not None else None
        self.eos_text: str | None = eos or self._tok.eos_token
        # Tokens that end a turn when the template writes one right after a text.
        specials = {t.content for t in self._tok.added_tokens_decoder.values() if t.special}
        self._turn_ends = sorted(specials, key=len, reverse=True)
        self.turn_end = self._probe_turn_end()

    def _render(self, messages: list[dict], marks: bool = False, generation_prompt: bool = False):
        try:
            texts, blocks = self._render_fn(
                conversations=[messages],
                chat_template=self.template,
                return_assistant_tokens_mask=marks,
                add_generation_prompt=generation_prompt,
                **{**self._tok.special_tokens_map, **self.kwargs},
            )
        except Exception as exc:  # a template raises jinja2 errors, TypeError or KeyError alike
            raise PipelineError(
                f"the chat template fails on these messages ({str(exc).splitlines()[0]}); give "
                "each message a role the template knows and a text content"
            ) from None
        return texts[0], (blocks[0] if marks else None)

    def _probe_turn_end(self) -> str | None:
        """What the template writes after an assistant text that ends a conversation (such as
        "<|im_end|>\\n"); None where it fails on a two-message conversation."""
        mark = _MARK.format(0)
        try:
            text, _ = self._render(
                [{"role": "user", "content": "?"}, {"role": "assistant", "content": mark}]
            )
        except PipelineError:
            return None
        return text.rpartition(mark)[2] if mark in text else None

    @property
    def turn_ends_with_eos(self) -> bool | None:
        """Whether the template ends an assistant turn with the EOS (and whitespace): the
        build drops it, the loader appending one. None where the probe failed."""
        if self.turn_end is None:
            return None
        return bool(self.eos_text) and self.turn_end.rstrip().endswith(self.eos_text)

    def render(self, messages: list[dict], last_only: bool = False) -> Chat:
        """The conversation rendered once, with its supervised turns' character spans."""
        full, blocks = self._render(messages, marks=self.markers)
        texts = [_texts(m) for m in messages]
        assistants = [
            i
            for i, m in enumerate(messages)
            if m["role"] in ASSISTANT_ROLES and ("".join(texts[i]) or _tool_calls(m))
        ]
        _check_rendered(messages, texts, full)
        if self.markers:
            spans = self._from_blocks(full, blocks, messages, assistants, texts)
        else:
            spans = self._locate(full, messages, assistants, texts)
        turns = sum(m["role"] in ASSISTANT_ROLES for m in messages)
        if not spans:
            raise PipelineError(
                "the chat template renders nothing of the assistant's turns (tool calls it does "
                "not write out): nothing to learn from; use a template that renders tool calls"
            )
        if last_only:
            spans = spans[-1:]
        end = spans[-1][1]
        text = full[:end]
        if self.eos_text and text.rstrip().endswith(self.eos_text):
            text = text.rstrip()[: -len(self.eos_text)]
        spans[-1] = (spans[-1][0], min(spans[-1][1], len(text)))
        return Chat(text, spans, turns)

    def _from_blocks(self, full, blocks, messages, assistants, texts) -> list[tuple[int, int]]:
        """The template's `{% generation %}` blocks, one per assistant turn with text."""
        counted = sum(m["role"] in ASSISTANT_ROLES for m in messages)
        if len(blocks) != counted:
            raise PipelineError(
                f"the chat template marks {len(blocks)} generation blocks for {counted} "
                "assistant messages, so its turns cannot be told apart; fix the template"
            )
        roles = [i for i, m in enumerate(messages) if m["role"] in ASSISTANT_ROLES]
        spans = []
        for i, (start, end) in zip(roles, blocks, strict=True):
            if i not in assistants:
                continue
            if any(part.strip() not in full[start:end] for part in texts[i]):
                raise PipelineError(
                    f"the chat template's generation block of message {i + 1} does not hold its "
                    "text; fix the template's {% generation %} markers"
                )
            spans.append((start, end))
        return spans

    def _locate(self, full, messages, assistants, texts) -> list[tuple[int, int]]:
        """Each assistant turn's text in `full`, found by rendering the conversation with its
        text parts replaced by numbered marks: `full` must be that rendering with each mark
        replaced by its text (ends trimmed of whitespace, as templates may do), so every
        position is exact. Reasoning (`reasoning_content`, or a text's head up to "</think>" for
        a template that rewrites it) has a mark of its own: where the template renders it, the
        turn is labelled from the "<think>" tag written before it; where it drops it, from the
        answer."""
        for split_think in (False, True):
            probe, parts = _marked(messages, assistants, texts, split_think)
            found = _walk(full, self._render(probe)[0], parts)
            if isinstance(found, list):
                break
            if not any(_THINK_END in t for i in assistants for t in texts[i]):
                break
        if isinstance(found, str):
            raise PipelineError(found)
        spans = []
        for i in assistants:
            owned = [
                (p, span) for p, span in zip(parts, found, strict=True) if p.owner == i and span
            ]
            if not owned:  # tool calls only, which the template does not render
                continue
            (first, (start, _)), (last, (_, end)) = owned[0], owned[-1]
            if first.reasoning:
                before = max((span[1] for span in found if span and span[1] <= start), default=0)
                start = _think_tag_at(full, before, start)
            elif first.call:  # no text before the calls: the turn starts where generation does
                start = self._generation_start(full, messages, i, start)
            if last.call:  # the call's arguments and closing syntax run on to the end of turn
                later = min((span[0] for span in found if span and span[0] >= end), default=None)
                end = self._call_turn_end(full, end, later, i)
            else:
                end = self._turn_end_at(full, end)
            spans.append((start, end))
        return spans

    def _generation_start(self, full: str, messages: list[dict], i: int, call_at: int) -> int:
        """Where assistant message `i`, which opens with a tool call, starts: after the
        rendering of the messages before it with the generation prompt (checked to be where
        `full` starts), past an empty reasoning block the template inserts (left unlabelled, as
        before a text)."""
        prompt, _ = self._render(messages[:i], generation_prompt=True)
        if not full.startswith(prompt) or len(prompt) > call_at:
            raise PipelineError(
                f"the chat template renders the conversation before message {i + 1} (a tool "
                "call) differently inside the whole conversation, so where the call starts "
                "cannot be placed exactly; fix the record or use prompt/response records"
            )
        blank = _BLANK_THINK_RE.match(full, len(prompt))
        return blank.end() if blank and blank.end() <= call_at else len(prompt)

    def _call_turn_end(self, full: str, call_end: int, later: int | None, i: int) -> int:
        """The end of the end-of-turn token that closes assistant message `i`'s last tool
        call (whose name ends at `call_end`), before any later message's marked text."""
        token = (self.turn_end or "").strip()
        at = full.find(token, call_end) if token else -1
        if at < 0 or (later is not None and at + len(token) > later):
            raise PipelineError(
                f"the chat template writes no end of turn after the tool calls of message "
                f"{i + 1}, so where they end cannot be placed exactly; fix the record or use "
                "prompt/response records"
            )
        return at + len(token)

    def _turn_end_at(self, full: str, end: int) -> int:
        """`end` moved past the whitespace and end-of-turn token the template writes right after
        a text (such as "<|im_end|>"), when it writes one."""
        rest = full[end:]
        gap = len(rest) - len(rest.lstrip())
        for token in self._turn_ends:
            if rest.startswith(token, gap):
                return end + gap + len(token)
        return end


def _check_kwargs(template: str, kwargs: dict, folder: Path) -> None:
    """A keyword the template never reads is a typo: refuse it, naming those it reads."""
    if not kwargs:
        return
    import jinja2.meta
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    try:
        reads = jinja2.meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateSyntaxError:
        return  # rendering says what is wrong with it
    unknown = sorted(set(kwargs) - reads)
    if unknown:
        raise PipelineError(
            f"--chat-template-kwargs {', '.join(unknown)}: the chat template of {folder} does "
            f"not read {'it' if len(unknown) == 1 else 'them'} (it reads: "
            f"{', '.join(sorted(reads - {'messages'})) or 'nothing else'}); fix the name"
        )


def _texts(message: dict) -> list[str]:
    """A message's text parts: its content, or the text of each {"type": "text"} part."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [part["text"] for part in content if part.get("type") == "text"]
    return []


class _Part(NamedTuple):
    """A marked text: its message, the text, and whether it is reasoning (which a template may
    drop, as Qwen3 does in the turns before the last user query)."""

    owner: int
    text: str
    reasoning: bool
    call: bool = False  # a tool call's function name


def _marked(messages, assistants, texts, split_think: bool):
    """A copy of `messages` with each text part of the assistant turns replaced by a numbered
    mark, and the `_Part` of each mark. A `reasoning_content` is marked as reasoning; with
    `split_think`, so is a text part's head up to its first "</think>" (after its "<think>"),
    the text after its last "</think>" being the answer, as templates that rewrite it read it."""
    probe = copy.deepcopy(messages)
    parts: list[_Part] = []

    def mark(owner: int, text: str, reasoning: bool = False, call: bool = False) -> str:
        parts.append(_Part(owner, text, reasoning, call))
        return _MARK.format(len(parts) - 1)

    for i in assistants:
        reasoning = probe[i].get("reasoning_content")
        given = isinstance(reasoning, str) and bool(reasoning.strip())
        if given:  # rendered before the content, so marked first
            probe[i]["reasoning_content"] = mark(i, reasoning, True)
        content = probe[i].get("content")
        pieces = [content] if isinstance(content, str) else content or []
        for j, piece in enumerate(pieces):
            text = piece if isinstance(piece, str) else piece.get("text")
            if not isinstance(text, str) or (
                not isinstance(piece, str) and piece["type"] != "text"
            ):
                continue
            if not text:  # the empty content of a tool call: a mark would be a truthy text
                continue
            split = split_think and not given and _THINK_END in text
            marked = _mark_think(i, text, mark) if split else mark(i, text)
            if isinstance(content, str):
                probe[i]["content"] = marked
            else:
                content[j] = dict(piece, text=marked)
        for call in _tool_calls(probe[i]):  # rendered after the content
            named = call["function"] if isinstance(call.get("function"), dict) else call
            if isinstance(named.get("name"), str) and named["name"]:
                named["name"] = mark(i, named["name"], call=True)
    return probe, parts


def _tool_calls(message: dict) -> list[dict]:
    """An assistant message's tool calls ({"function": {"name", "arguments"}} or
    {"name", "arguments"}); [] where it has none."""
    calls = message.get("tool_calls")
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


def _mark_think(owner: int, text: str, mark) -> str:
    """`text` with its reasoning (between its "<think>" and first "</think>") and its answer
    (after its last "</think>") marked; a blank reasoning is left as it is, unlabelled, as the
    empty block a template inserts."""
    close = text.index(_THINK_END)
    opened = text.rfind(_THINK, 0, close)
    start = opened + len(_THINK) if opened >= 0 else 0
    answer_at = text.rindex(_THINK_END) + len(_THINK_END)
    thought = text[start:close]
    if not thought.strip():
        return text[:answer_at] + mark(owner, text[answer_at:])
    head = text[:start] + mark(owner, thought, True) + text[close:answer_at]
    return head + mark(owner, text[answer_at:])


def _think_tag_at(full: str, before: int, start: int) -> int:
    """Where the reasoning rendered at `start` is labelled from: the "<think>" tag that ends,
    but for whitespace, the template's text since `before` (the previous marked text's end),
    or the reasoning itself where the template writes no such tag."""
    lead = full[before:start].rstrip()
    return before + len(lead) - len(_THINK) if lead.endswith(_THINK) else start


def _walk(full: str, probe: str, parts: list[_Part]) -> list[tuple[int, int] | None] | str:
    """The (start, end) of each marked text in `full` (None for reasoning or a tool call the
    template dropped), or why `full` is not `probe` with its marks replaced by their texts."""
    pieces = _MARK_RE.split(probe)  # literal, mark number, literal, ...
    numbers = [int(n) for n in pieces[1::2]]
    for k, part in enumerate(parts):
        times = numbers.count(k)
        if times > 1 or (times == 0 and not (part.reasoning or part.call)):
            return (
                f"the chat template renders the text of message {part.owner + 1} {times} times, "
                "not once, so its labels cannot be placed; fix the record or use prompt/response "
                "records"
            )
    if numbers != sorted(numbers):
        back = next(k for a, k in zip(numbers, numbers[1:], strict=False) if k < a)
        return _moved(parts[back].owner)
    literals = pieces[0::2]
    spans: list[tuple[int, int] | None] = [None] * len(parts)
    pos = 0
    for at, k in enumerate(numbers):
        owner, text = parts[k].owner, parts[k].text
        if not full.startswith(literals[at], pos):
            return _moved(owner)
        pos += len(literals[at])
        nxt = literals[at + 1]
        kept = next((v for v in _trims(text) if full.startswith(v + nxt, pos)), None)
        if kept is None:
            return _moved(owner)
        spans[k] = (pos, pos + len(kept))
        pos += len(kept)
    if pos + len(literals[-1]) != len(full) or not full.endswith(literals[-1]):
        return _moved(parts[numbers[-1]].owner if numbers else 0)
    return spans


def _moved(owner: int) -> str:
    return (
        f"the chat template renders message {owner + 1} (an assistant turn) differently from "
        "its text (it rewrites or moves it), so its labels cannot be placed exactly; fix the "
        "record or use prompt/response records"
    )


def _trims(text: str) -> list[str]:
    """`text` and its forms with whitespace trimmed at either end, as templates trim."""
    forms = [text, text.strip(), text.lstrip(), text.rstrip(), text.strip("\n")]
    return list(dict.fromkeys(forms))


def _check_rendered(messages: list[dict], texts: list[list[str]], full: str) -> None:
    """Fail when the template left a message's text out (templates skip roles they do not know:
    a "human" turn renders as nothing). A reasoning block of an earlier turn may be dropped by
    design, so only the text after a message's last "</think>" is looked for."""
    for i, message in enumerate(messages):
        for part in texts[i]:
            text = part.rpartition("</think>")[2].strip()
            if text and text not in full:
                raise PipelineError(
                    f"the chat template leaves out message {i + 1} (role {message['role']!r}): "
                    "its text is not in what the template renders; give it a role the template "
                    "knows (usually system, user or assistant)"
                )


class LazyChat:
    """The chat template of a tokenizer folder, loaded when the first record with messages
    needs it (so prompt/response builds never import `transformers`); thread-safe."""

    def __init__(self, folder: Path, kwargs: dict | None = None, eos_id: int | None = None):
        self.folder, self.kwargs, self.eos_id = folder, kwargs, eos_id
        self._chat: ChatTemplate | None = None
        self._lock = threading.Lock()

    @property
    def template(self) -> ChatTemplate:
        with self._lock:
            if self._chat is None:
                self._chat = ChatTemplate(self.folder, self.kwargs, self.eos_id)
        return self._chat

    @property
    def loaded(self) -> ChatTemplate | None:
        return self._chat

    def render(self, messages: list[dict], last_only: bool = False) -> Chat:
        return self.template.render(messages, last_only)


def split_records(
    records: list,
    fields: SftFields,
    where: str,
    chat: ChatTemplate | LazyChat | None,
    first: int,
    unit: str = "record",
    last_only: bool = False,
) -> Parsed:
    """The pairs and rendered chats of `records`, the first of which is `unit` ("line" or
    "record") `first` of the file `where`; a bad record is one error naming its place and the
    fix. `last_only`: supervise only each chat's last assistant turn.

    An empty prompt is allowed (a response-only sample); an empty response is not."""
    parsed = Parsed()
    for i, record in enumerate(records):
        at = f"{where} {unit} {first + i}"
        parsed.places.append(at)
        if isinstance(record, dict) and record.get(fields.messages) is not None:
            rendered = _from_messages(record[fields.messages], at, chat, last_only)
            parsed.is_chat.append(True)
            parsed.chats.append(rendered)
            continue
        if isinstance(record, dict):
            _check_texts(record, fields, at)
            prompt, response = record[fields.prompt], record[fields.response]
        else:
            raise PipelineError(
                f"{at} is a {type(record).__name__}, not an object with {fields.prompt!r} and "
                f"{fields.response!r} (or {fields.messages!r}); fix the record"
            )
        if not response.strip():
            raise PipelineError(
                f"{at} has an empty response: nothing to learn from; drop the record or fill it"
            )
        _check_unicode(at, prompt, response)
        parsed.is_chat.append(False)
        parsed.prompts.append(prompt)
        parsed.responses.append(response)
    return parsed


def _check_unicode(at: str, prompt: str, response: str) -> None:
    """JSON's \\u escapes can write half of a UTF-16 surrogate pair, which is not text."""
    for name, text in (("prompt", prompt), ("response", response)):
        bad = lone_surrogates(text)
        if bad:
            raise PipelineError(
                f"{at} has a {name} holding {bad[0].encode('unicode_escape').decode()}, half of a "
                "UTF-16 surrogate pair and not text; write the whole pair (such as "
                "\\ud83d\\ude00) or drop the record"
            )


def _check_texts(record: dict, fields: SftFields, at: str) -> None:
    names = (fields.prompt, fields.response)
    missing = [n for n in names if record.get(n) is None]
    if missing:
        raise PipelineError(
            f"{at} has no text field {' or '.join(map(repr, missing))} (keys: "
            f"{', '.join(map(str, record)) or 'none'}); name the fields with "
            f"--prompt-field/--response-field or give {fields.messages!r}"
        )
    wrong = next((n for n in names if not isinstance(record[n], str)), None)
    if wrong is not None:
        raise PipelineError(
            f"{at} has {wrong!r} = {type(record[wrong]).__name__}, expected text; write it as a "
            "string or name another field with --prompt-field/--response-field"
        )


def _from_messages(messages, at: str, chat, last_only: bool) -> Chat:
    if not isinstance(messages, list) or not messages:
        raise PipelineError(f"{at}: messages must be a non-empty list of {{role, content}}")
    for i, message in enumerate(messages, start=1):
        _check_message(message, i, at)
    last = messages[-1]
    if last["role"] not in ASSISTANT_ROLES:
        raise PipelineError(
            f"{at}: the last message must be the assistant's (the response), "
            f"found role {last['role']!r}; fix the record"
        )
    if not "".join(_texts(last)).strip() and not _tool_calls(last):
        raise PipelineError(
            f"{at} has an empty response (the last message's content): nothing to learn from; "
            "drop the record or fill it"
        )
    if chat is None:
        raise PipelineError(
            f"{at} has messages but the tokenizer has no chat template; pass "
            "--tokenizer MODEL_DIR whose tokenizer_config.json holds one"
        )
    for message in messages:
        reasoning = message.get("reasoning_content")
        for text in _texts(message) + ([reasoning] if isinstance(reasoning, str) else []):
            if _MARK_RE.search(text) or "\ue000" in text:
                raise PipelineError(
                    f"{at}: a message holds U+E000, the private-use character the build marks "
                    "turns with; remove it from the record"
                )
            _check_unicode(at, text, "")
    try:
        return chat.render(messages, last_only)
    except PipelineError as exc:
        raise PipelineError(f"{at}: {exc}") from None


def _check_message(message, number: int, at: str) -> None:
    """A message is {role: non-empty text, content: text or a list of {"type": "text", "text"}
    parts (other parts, such as images, are the template's)}; an assistant message may have no
    content when it holds tool calls (supervised like a text). A template drops a message without a
    role and renders one without content as an empty turn, so both are refused here."""
    if not isinstance(message, dict):
        raise PipelineError(
            f"{at}: message {number} is a {type(message).__name__}, not an object with a role "
            "and a content; fix the record"
        )
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role.strip():
        found = "no role" if role is None else f"role {role!r}"
        raise PipelineError(
            f"{at}: message {number} has {found}; give every message a role (system, user, "
            "assistant) or drop the record"
        )
    if content is None and message.get("tool_calls") and role in ASSISTANT_ROLES:
        return
    if isinstance(content, list) and all(_is_part(p) for p in content):
        return
    if not isinstance(content, str):
        found = "no content" if content is None else f"content of type {type(content).__name__}"
        raise PipelineError(
            f"{at}: message {number} ({role}) has {found}, expected text or a list of "
            '{"type": "text", "text": ...} parts; give it its text or drop the message'
        )


def _is_part(part) -> bool:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        return False
    return part["type"] != "text" or isinstance(part.get("text"), str)


def encode_pairs(
    tokenizer,
    prompts: list[str],
    responses: list[str],
    prefix: tuple[int, ...] = (),
    eos_id: int | None = None,
) -> SftEncoded:
    """Tokenise each sample whole (prompt + response) and split it after its prompt's own ids.

    Where the whole sample's ids start with the ids of its prompt alone, the rest are the
    response's: the sample is stored as the tokenizer encodes it, and its prompt as it is encoded
    at inference (a SentencePiece response " chat" is "▁chat", not "▁", "▁chat" as alone). Where
    they do not (a token spans the boundary: "héllo " + "wörld" holds " wörld"), prompt and
    response are tokenised apart, so no prompt text is trained and no response text masked;
    `tokenised_apart` counts them. `prefix` (the BOS the tokenizer puts before a text) starts
    each prompt that does not already start with it (a chat template may write it); an `eos_id`
    ending a response is dropped, since the loader puts EOS after every sample.
    """
    p = tokenizer.encode_arrow(pa.array(prompts, type=pa.large_string()))
    whole = tokenizer.encode_arrow(
        pa.array([a + b for a, b in zip(prompts, responses, strict=True)], pa.large_string())
    )
    joins = _starts_with(whole, p)
    r = _tails(whole, p.lengths, joins)
    if not joins.all():
        apart = np.flatnonzero(~joins)
        alone = tokenizer.encode_arrow(pa.array([responses[i] for i in apart], pa.large_string()))
        r = interleave((np.flatnonzero(joins), r), (apart, alone))
    if prefix:
        p_starts = _starts(p.lengths)
        has = p.lengths >= len(prefix)
        for j, token in enumerate(prefix):
            idx = np.minimum(p_starts + j, max(p.values.size - 1, 0))
            has &= (p.values[idx] == token) if p.values.size else False
        p = with_prefix(p, prefix, ~has)
    if eos_id is not None and r.values.size:
        last = np.cumsum(r.lengths) - 1
        ends_eos = (r.lengths > 0) & (r.values[np.maximum(last, 0)] == eos_id)
        keep = np.ones(r.values.size, dtype=bool)
        keep[last[ends_eos]] = False
        r = Encoded(r.values[keep], r.lengths - ends_eos)
    lengths = p.lengths + r.lengths
    starts = _starts(lengths)
    p_starts, r_starts = _starts(p.lengths), _starts(r.lengths)
    values = np.empty(int(lengths.sum()), dtype=np.uint32)
    # Token k of prompt i lands at starts[i] + (k - p_starts[i]); responses follow their prompt.
    values[np.arange(p.values.size) + np.repeat(starts - p_starts, p.lengths)] = p.values
    values[np.arange(r.values.size) + np.repeat(starts + p.lengths - r_starts, r.lengths)] = (
        r.values
    )
    return SftEncoded(
        values=values,
        lengths=lengths,
        prompt_lengths=p.lengths.astype(np.int64),
        response_cut=np.zeros(lengths.size, dtype=bool),
        tokenised_apart=int(joins.size - joins.sum()),
    )


def _starts(lengths: np.ndarray) -> np.ndarray:
    """(n,) int64 offset of each of n runs of `lengths` laid back to back."""
    starts = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _starts_with(whole: Encoded, head: Encoded) -> np.ndarray:
    """(n,) bool: text i of `whole` starts with the ids of text i of `head`."""
    n = np.where(whole.lengths >= head.lengths, head.lengths, 0)
    sample = np.repeat(np.arange(n.size), n)  # for each compared id, its text
    k = np.arange(sample.size) - np.repeat(_starts(n), n)  # and its place in the text
    same = (
        whole.values[_starts(whole.lengths)[sample] + k]
        == head.values[_starts(head.lengths)[sample] + k]
    )
    mismatches = np.bincount(sample[~same], minlength=n.size)
    return (whole.lengths >= head.lengths) & (mismatches == 0)


def _tails(whole: Encoded, heads: np.ndarray, where: np.ndarray) -> Encoded:
    """The ids of the texts `where` (bool) is set after their first `heads` ids."""
    skip = np.where(where, heads, whole.lengths)
    within = np.arange(whole.values.size) - np.repeat(_starts(whole.lengths), whole.lengths)
    keep = within >= np.repeat(skip, whole.lengths)
    return Encoded(whole.values[keep], (whole.lengths - skip)[where])


def encode_records(
    tokenizer, parsed: Parsed, prefix: tuple[int, ...] = (), eos_id: int | None = None
) -> SftEncoded:
    """The samples of a chunk's records in their order: pairs through `encode_pairs`, chats
    through `encode_chats`."""
    pairs = encode_pairs(tokenizer, parsed.prompts, parsed.responses, prefix, eos_id)
    if not parsed.chats:
        return pairs
    chats = encode_chats(
        tokenizer,
        parsed.chats,
        [p for p, c in zip(parsed.places, parsed.is_chat, strict=True) if c],
        prefix,
    )
    if not parsed.prompts:
        return chats
    is_chat = np.array(parsed.is_chat)
    where_pair, where_chat = np.flatnonzero(~is_chat), np.flatnonzero(is_chat)
    merged = interleave(
        (where_pair, Encoded(pairs.values, pairs.lengths)),
        (where_chat, Encoded(chats.values, chats.lengths)),
    )
    n = is_chat.size
    prompt_lengths = np.empty(n, np.int64)
    prompt_lengths[where_pair], prompt_lengths[where_chat] = (
        pairs.prompt_lengths,
        chats.prompt_lengths,
    )
    span_counts = np.zeros(n, np.int64)
    span_counts[where_chat] = chats.span_counts
    return SftEncoded(
        values=merged.values,
        lengths=merged.lengths,
        prompt_lengths=prompt_lengths,
        response_cut=np.zeros(n, dtype=bool),
        tokenised_apart=pairs.tokenised_apart,
        span_counts=span_counts,
        spans=chats.spans,  # only chats list spans, and they keep their order
        turns=chats.turns,
        turns_supervised=chats.turns_supervised,
    )


def encode_chats(
    tokenizer, chats: list[Chat], places: list[str], prefix: tuple[int, ...] = ()
) -> SftEncoded:
    """Each rendered chat tokenised whole, its supervised turns mapped to token spans: the
    rendering is also tokenised in pieces cut at every span edge, and the pieces' ids joined
    must be the whole's (a token spanning an edge refuses the record, naming it), so each
    piece's ids are exactly its share of the whole. `prefix` (the BOS the tokenizer puts before
    a text) starts each sample whose rendering does not already start with it."""
    texts, pieces, cuts_per_chat = [], [], []
    for c in chats:
        cuts = [0, *(edge for span in c.spans for edge in span), len(c.text)]
        texts.append(c.text)
        pieces += [c.text[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        cuts_per_chat.append(len(cuts) - 1)
    whole = tokenizer.encode_arrow(pa.array(texts, pa.large_string()))
    split = tokenizer.encode_arrow(pa.array(pieces, pa.large_string()))
    per_chat = np.array(cuts_per_chat, dtype=np.int64)
    piece_chat = np.repeat(np.arange(len(chats)), per_chat)
    joined = np.bincount(piece_chat, weights=split.lengths, minlength=len(chats)).astype(np.int64)
    same = joined == whole.lengths
    if same.all():
        same &= (
            np.bincount(
                np.repeat(np.arange(len(chats)), whole.lengths)[split.values != whole.values],
                minlength=len(chats),
            )
            == 0
        )
    if not same.all():
        k = int(np.flatnonzero(~same)[0])
        raise PipelineError(
            f"{places[k]}: a token of the rendered chat spans the edge of an assistant turn "
            "(the tokenizer joins a turn's first or last characters with the template's text "
            "around them), so its labels cannot be placed exactly; trim the turn's text or "
            "use prompt/response records"
        )
    head = Encoded(
        np.tile(np.array(prefix, dtype=np.uint32), len(chats)),
        np.full(len(chats), len(prefix), dtype=np.int64),
    )
    has = _starts_with(whole, head) if prefix else np.ones(len(chats), dtype=bool)
    shift = np.where(has, 0, len(prefix))  # a BOS put before the sample moves its spans
    encoded = with_prefix(whole, prefix, ~has)
    # Piece p starts at token piece_at[p] of its chat's ids; a chat's odd pieces are its spans.
    piece_at = _starts(split.lengths) - _starts(whole.lengths)[piece_chat]
    within = np.arange(split.lengths.size) - _starts(per_chat)[piece_chat]
    odd = np.flatnonzero(within % 2 == 1)
    spans = np.stack([piece_at[odd] + shift[piece_chat[odd]], split.lengths[odd]], axis=1).astype(
        np.int64
    )
    counts = (per_chat - 1) // 2
    last = _starts(counts) + counts - 1
    prompt_lengths = spans[last, 0]
    # A chat with one span (it runs to the end) is stored as a prompt length alone.
    many = counts > 1
    keep = np.repeat(many, counts)
    return SftEncoded(
        values=encoded.values,
        lengths=encoded.lengths,
        prompt_lengths=prompt_lengths,
        response_cut=np.zeros(len(chats), dtype=bool),
        span_counts=np.where(many, counts, 0),
        spans=spans[keep],
        turns=sum(c.turns for c in chats),
        turns_supervised=int(counts.sum()),
    )


def limit_samples(pairs: SftEncoded, max_tokens: int, mode: str) -> tuple[SftEncoded, int, int]:
    """Samples whose tokens + EOS exceed `max_tokens`: kept ("keep"), cut at the end to fit
    ("truncate": flagged in `response_cut`, so the EOS after the cut is no target; a sample
    whose first labelled token does not fit is dropped; a chat cut between two turns ends at
    the last labelled one, and its spans are cut with it), or dropped ("drop").
    Returns (samples, truncated, dropped)."""
    over = pairs.lengths + 1 > max_tokens
    if mode == "keep" or not over.any():
        return pairs, 0, 0
    new_lengths = pairs.lengths.copy()
    prompt_lengths = pairs.prompt_lengths.copy()
    counts = pairs.span_counts.copy()
    span_lists = np.split(pairs.spans, np.cumsum(pairs.span_counts)[:-1])
    first_labelled = prompt_lengths.copy()
    many = counts > 0
    first_labelled[many] = [int(span_lists[i][0, 0]) for i in np.flatnonzero(many)]
    drop = over.copy() if mode == "drop" else over & (first_labelled + 2 > max_tokens)
    cut = over & ~drop
    new_lengths[cut] = max_tokens - 1
    for i in np.flatnonzero(cut & many):
        spans = span_lists[i]
        spans = spans[spans[:, 0] < max_tokens - 1].copy()
        spans[-1, 1] = min(spans[-1, 1], max_tokens - 1 - spans[-1, 0])
        new_lengths[i] = spans[-1].sum()  # nothing after the last labelled token is learnt from
        prompt_lengths[i] = spans[-1, 0]
        counts[i] = spans.shape[0] if spans.shape[0] > 1 else 0
        span_lists[i] = spans[: counts[i]]
    new_lengths[drop] = 0
    # Keep token k of sample i when k < new_lengths[i].
    within = np.arange(pairs.values.size) - np.repeat(_starts(pairs.lengths), pairs.lengths)
    keep = within < np.repeat(new_lengths, pairs.lengths)
    kept = ~drop
    spans = [span_lists[i] for i in np.flatnonzero(kept)]
    limited = SftEncoded(
        values=pairs.values[keep],
        lengths=new_lengths[kept],
        prompt_lengths=prompt_lengths[kept],
        response_cut=(pairs.response_cut | cut)[kept],
        tokenised_apart=pairs.tokenised_apart,
        span_counts=counts[kept],
        spans=np.concatenate(spans).reshape(-1, 2) if spans else np.zeros((0, 2), np.int64),
        turns=pairs.turns,
        turns_supervised=pairs.turns_supervised,
    )
    return limited, int(cut.sum()), int(drop.sum())
