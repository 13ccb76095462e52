"""Prompt/response records become one document each with the prompt's token count."""

from __future__ import annotations

import json

import pytest

from lowmem_core.errors import PipelineError
from pipeline.sft import ChatTemplate, SftFields, encode_pairs, split_records
from pipeline.tokenizer import ByteTokenizer

RECORDS = [
    {"prompt": "Q: 2+2?\n", "response": "A: 4"},
    {"prompt": "", "response": "just text"},
    {"prompt": "héllo ", "response": "wörld 🙂"},
]


def test_pairs_are_laid_out_prompt_then_response_with_the_prompt_length():
    parsed = split_records(RECORDS, SftFields(), "in.jsonl", None, 1)
    enc = encode_pairs(ByteTokenizer(), parsed.prompts, parsed.responses)
    offset = 0
    for record, length, prompt_len in zip(RECORDS, enc.lengths, enc.prompt_lengths, strict=True):
        doc = bytes(enc.values[offset : offset + length].astype("uint8"))
        assert doc == (record["prompt"] + record["response"]).encode()
        assert prompt_len == len(record["prompt"].encode())
        offset += int(length)
    assert offset == enc.values.size


def test_field_names_can_be_changed():
    records = [{"instruction": "do", "output": "done"}]
    parsed = split_records(records, SftFields("instruction", "output"), "x", None, 1)
    assert (parsed.prompts, parsed.responses) == (["do"], ["done"])


@pytest.mark.parametrize(
    "record, named",
    [
        ({"prompt": "q"}, "record 7 has no text field 'response'"),
        ({"question": "q", "answer": "a"}, "'prompt' or 'response'"),
        ({"prompt": "q", "response": "  "}, "record 7 has an empty response"),
        ({"prompt": "q", "response": None}, "no text field 'response'"),
        ("just a string", "record 7 is a str"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "has no chat template"),
    ],
)
def test_bad_records_are_named_by_file_and_line(record, named):
    with pytest.raises(PipelineError, match=named) as info:
        split_records([record], SftFields(), "data.jsonl", None, 7)
    assert "data.jsonl" in str(info.value)


def test_messages_are_rendered_with_the_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world, how are you?"] * 10, trainer)
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", bos_token="<s>", chat_template=template
    )
    fast.save_pretrained(tmp_path / "tok")
    chat = ChatTemplate(tmp_path / "tok")
    record = {
        "messages": [
            {"role": "user", "content": "how are you?"},
            {"role": "assistant", "content": "hello world"},
        ]
    }
    parsed = split_records([record], SftFields(), "chat.jsonl", chat, 1)
    # Rendered once; the supervised turn is its text and the "</s>" the template ends it with,
    # and the final EOS is dropped (the loader appends one).
    [rendered] = parsed.chats
    assert rendered.text == "<user>how are you?</s><assistant>hello world"
    assert rendered.spans == [(len("<user>how are you?</s><assistant>"), len(rendered.text))]


def test_sample_summaries_have_whole_articles_as_prompts_and_their_first_sentence_as_response(
    tmp_path,
):
    from pipeline.sample_corpus import generate_documents, write_sample_sft

    paths = write_sample_sft(tmp_path, num_train=50, num_eval=2, seed=7, task="summarise")
    records = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    docs = generate_documents(52, 7)[:50]
    for record, doc in zip(records, docs, strict=True):
        title, _, body = doc.partition("\n")
        assert record["prompt"] == f"Summarise: {title}\n{body}\n"
        assert body.startswith(record["response"].rstrip("."))
    lengths = sorted(len(r["prompt"]) for r in records)
    assert lengths[-1] > 3 * lengths[0]  # prompts of varied length
    with pytest.raises(ValueError, match="task must be one of"):
        write_sample_sft(tmp_path, task="chat")
