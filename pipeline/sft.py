"""Prompt/response records -> token ids plus each sample's prompt length (loss on the response).

A record is `{"prompt": ..., "response": ...}` (field names are options), or
`{"messages": [{"role": ..., "content": ...}, ...]}` rendered with the tokenizer's chat template:
everything up to the last assistant message is the prompt (rendered with the generation
prompt), the last assistant message is the response. Prompt and response are tokenised
separately and concatenated, so no token straddles the boundary; the loader appends EOS after
the response and gives the prompt's tokens label -100. Each sample is stored as one document
plus its prompt length, so exactly-once, resume and packing work as for plain text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lowmem_core.errors import PipelineError, require_extra


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
        prompt = self._tok.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True
        )
        full = self._tok.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise PipelineError(
                "the chat template renders the conversation without its prompt as a prefix, so the "
                "response cannot be separated; use prompt/response records instead"
            )
        return prompt, full[len(prompt) :]


def split_records(
    records: list[dict], fields: SftFields, where: str, chat: ChatTemplate | None, first_line: int
) -> tuple[list[str], list[str]]:
    """(prompts, responses) of `records`; a record without them is one error naming its line."""
    prompts, responses = [], []
    for i, record in enumerate(records):
        line = first_line + i
        if isinstance(record, dict) and record.get(fields.messages) is not None:
            prompt, response = _from_messages(record[fields.messages], where, line, chat)
        elif isinstance(record, dict):
            prompt, response = record.get(fields.prompt), record.get(fields.response)
            missing = [f for f, v in ((fields.prompt, prompt), (fields.response, response))
                       if not isinstance(v, str)]
            if missing:
                raise PipelineError(
                    f"{where} record {line} has no text field {' or '.join(map(repr, missing))} "
                    f"(keys: {', '.join(map(str, record)) or 'none'}); name the fields with "
                    "--prompt-field/--response-field or give messages"
                )
        else:
            raise PipelineError(f"{where} record {line} is a {type(record).__name__}, not an object")
        if not response.strip():
            raise PipelineError(
                f"{where} record {line} has an empty response: nothing to learn from; drop the record"
            )
        prompts.append(prompt)
        responses.append(response)
    return prompts, responses


def _from_messages(messages, where: str, line: int, chat: ChatTemplate | None) -> tuple[str, str]:
    if not isinstance(messages, list) or not messages:
        raise PipelineError(f"{where} record {line}: messages must be a non-empty list")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise PipelineError(
            f"{where} record {line}: the last message must be the assistant's (the response), "
            f"found role {last.get('role') if isinstance(last, dict) else None!r}"
        )
    if chat is None:
        raise PipelineError(
            f"{where} record {line} has messages but the tokenizer has no chat template; pass "
            "--tokenizer MODEL_DIR whose tokenizer_config.json holds one"
        )
    return chat.render(messages)


def encode_pairs(tokenizer, prompts: list[str], responses: list[str]) -> SftEncoded:
    """Tokenise prompts and responses separately and lay each pair out back to back."""
    p = tokenizer.encode_arrow(pa.array(prompts, type=pa.large_string()))
    r = tokenizer.encode_arrow(pa.array(responses, type=pa.large_string()))
    lengths = p.lengths + r.lengths
    starts = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    p_starts = np.concatenate(([0], np.cumsum(p.lengths)[:-1])).astype(np.int64)
    r_starts = np.concatenate(([0], np.cumsum(r.lengths)[:-1])).astype(np.int64)
    values = np.empty(int(lengths.sum()), dtype=np.uint32)
    # Token k of prompt i lands at starts[i] + (k - p_starts[i]); responses follow their prompt.
    values[np.arange(p.values.size) + np.repeat(starts - p_starts, p.lengths)] = p.values
    values[np.arange(r.values.size) + np.repeat(starts + p.lengths - r_starts, r.lengths)] = r.values
    return SftEncoded(values=values, lengths=lengths, prompt_lengths=p.lengths.astype(np.int64))
