"""Prompt/response records -> token ids plus each sample's prompt length (loss on the response).

A record is `{"prompt": ..., "response": ...}` (field names are options), or
`{"messages": [{"role": ..., "content": ...}, ...]}` rendered with the tokenizer's chat template:
everything up to the last assistant message is the prompt (rendered with the generation
prompt), the last assistant message is the response. A sample is tokenised whole and split
after its prompt's own tokens (`encode_pairs` says when it cannot be); the loader appends EOS
after the response and gives the prompt's tokens label -100. Each sample is stored as one
document plus its prompt length, so exactly-once, resume and packing work as for plain text.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lowmem_core.errors import PipelineError, require_extra
from pipeline.records import lone_surrogates
from pipeline.tokenizer import Encoded, interleave, with_prefix


@dataclass(frozen=True)
class SftFields:
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"


@dataclass(frozen=True)
class SftEncoded:
    values: np.ndarray  # (sum(lengths),) uint32: each sample's prompt then response tokens
    lengths: np.ndarray  # (num_samples,) int64 tokens per sample
    prompt_lengths: np.ndarray  # (num_samples,) int64 prompt tokens at the start of each sample
    response_cut: np.ndarray  # (num_samples,) bool: response cut to fit, so its EOS is no target
    tokenised_apart: int = 0  # samples whose prompt and response were tokenised apart


class ChatTemplate:
    """The chat template of a Hugging Face tokenizer folder, via `transformers`."""

    def __init__(self, folder: Path):
        transformers = require_extra("transformers", "hf", "rendering records with messages")
        self._tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if not getattr(self._tok, "chat_template", None):
            raise PipelineError(
                f"{folder} has no chat template, so records with messages cannot be rendered; "
                "use prompt/response records or a tokenizer folder with a chat_template"
            )

    def render(self, messages: list[dict]) -> tuple[str, str]:
        """(prompt text, response text) of a conversation ending with an assistant message."""
        try:
            prompt = self._tok.apply_chat_template(
                messages[:-1], tokenize=False, add_generation_prompt=True
            )
            full = self._tok.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # a template raises jinja2 errors, TypeError or KeyError alike
            raise PipelineError(
                f"the chat template fails on these messages ({exc}); give each message a role "
                "and a text content"
            ) from None
        if not full.startswith(prompt):
            raise PipelineError(
                "the chat template renders the conversation without its prompt as a prefix, so "
                "the response cannot be separated; use prompt/response records instead"
            )
        _check_rendered(messages, full)
        return prompt, full[len(prompt) :]


def _check_rendered(messages: list[dict], full: str) -> None:
    """Fail when the template left a message's text out (templates skip roles they do not know:
    a "human" turn renders as nothing). A reasoning block of an earlier turn may be dropped by
    design, so only the text after a message's last "</think>" is looked for."""
    for i, message in enumerate(messages):
        text = message["content"].rpartition("</think>")[2].strip()
        if text and text not in full:
            raise PipelineError(
                f"the chat template leaves out message {i + 1} (role {message['role']!r}): its "
                "text is not in what the template renders; give it a role the template knows "
                "(usually system, user or assistant)"
            )


class LazyChat:
    """The chat template of a tokenizer folder, loaded when the first record with messages
    needs it (so prompt/response builds never import `transformers`); thread-safe."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._chat: ChatTemplate | None = None
        self._lock = threading.Lock()

    def render(self, messages: list[dict]) -> tuple[str, str]:
        with self._lock:
            if self._chat is None:
                self._chat = ChatTemplate(self.folder)
        return self._chat.render(messages)


def split_records(
    records: list,
    fields: SftFields,
    where: str,
    chat: ChatTemplate | LazyChat | None,
    first: int,
    unit: str = "record",
) -> tuple[list[str], list[str]]:
    """(prompts, responses) of `records`, the first of which is `unit` ("line" or "record")
    `first` of the file `where`; a bad record is one error naming its place and the fix.

    An empty prompt is allowed (a response-only sample); an empty response is not."""
    prompts, responses = [], []
    for i, record in enumerate(records):
        at = f"{where} {unit} {first + i}"
        if isinstance(record, dict) and record.get(fields.messages) is not None:
            prompt, response = _from_messages(record[fields.messages], at, chat)
        elif isinstance(record, dict):
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
        prompts.append(prompt)
        responses.append(response)
    return prompts, responses


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


def _from_messages(messages, at: str, chat: ChatTemplate | LazyChat | None) -> tuple[str, str]:
    if not isinstance(messages, list) or not messages:
        raise PipelineError(f"{at}: messages must be a non-empty list of {{role, content}}")
    for i, message in enumerate(messages, start=1):
        _check_message(message, i, at)
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise PipelineError(
            f"{at}: the last message must be the assistant's (the response), "
            f"found role {last.get('role') if isinstance(last, dict) else None!r}; fix the record"
        )
    content = last.get("content")
    if not isinstance(content, str) or not content.strip():
        raise PipelineError(
            f"{at} has an empty response (the last message's content): nothing to learn from; "
            "drop the record or fill it"
        )
    if chat is None:
        raise PipelineError(
            f"{at} has messages but the tokenizer has no chat template; pass "
            "--tokenizer MODEL_DIR whose tokenizer_config.json holds one"
        )
    try:
        return chat.render(messages)
    except PipelineError as exc:
        raise PipelineError(f"{at}: {exc}") from None


def _check_message(message, number: int, at: str) -> None:
    """A message is {role: non-empty text, content: text}: a template drops a message without a
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
    if not isinstance(content, str):
        found = "no content" if content is None else f"content of type {type(content).__name__}"
        raise PipelineError(
            f"{at}: message {number} ({role}) has {found}, expected text; give it its text or "
            "drop the message"
        )


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


def limit_samples(pairs: SftEncoded, max_tokens: int, mode: str) -> tuple[SftEncoded, int, int]:
    """Samples whose tokens + EOS exceed `max_tokens`: kept ("keep"), their response cut at the
    end to fit ("truncate": flagged in `response_cut`, so the EOS after the cut is no target; a
    prompt that leaves no room for one response token drops the sample), or dropped ("drop").
    Returns (samples, truncated, dropped)."""
    over = pairs.lengths + 1 > max_tokens
    if mode == "keep" or not over.any():
        return pairs, 0, 0
    new_lengths = pairs.lengths.copy()
    drop = over.copy() if mode == "drop" else over & (pairs.prompt_lengths + 2 > max_tokens)
    cut = over & ~drop
    new_lengths[cut] = max_tokens - 1
    new_lengths[drop] = 0
    # Keep token k of sample i when k < new_lengths[i].
    within = np.arange(pairs.values.size) - np.repeat(_starts(pairs.lengths), pairs.lengths)
    keep = within < np.repeat(new_lengths, pairs.lengths)
    kept = ~drop
    limited = SftEncoded(
        values=pairs.values[keep],
        lengths=new_lengths[kept],
        prompt_lengths=pairs.prompt_lengths[kept],
        response_cut=(pairs.response_cut | cut)[kept],
        tokenised_apart=pairs.tokenised_apart,
    )
    return limited, int(cut.sum()), int(drop.sum())
