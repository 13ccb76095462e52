"""Real chat templates through `pipeline build --sft` and the loader's padding rows: the labelled
tokens of every sample equal a reference computed here, apart from the build.

Where a template has no generation markers, the reference is the rendering written out by hand
(checked against transformers' own rendering) as pieces, each labelled or not: an assistant
turn's content and the end-of-turn token the template writes after it are labelled; its header,
any block the template adds before the content, the whitespace after the end of turn and every
other message are not. The ids are the tokenizer's ids of the rendering up to the end of the
last labelled turn, and a token is labelled where its characters lie in a labelled piece. Where
the template has `{% generation %}` markers, the reference is transformers' assistant mask. A row
holds one end of turn per sample: after it, the EOS the loader appends (labelled) only where the
template's end of turn is not the EOS, then nothing labelled. BOS appears once. The tokenizers
other than Qwen3's are trained here on the sample corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import Loader, open_dataset
from pipeline.__main__ import main
from pipeline.sample_corpus import generate_documents

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

QWEN3 = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "qwen3"
IGNORE = -100

Pieces = list[tuple[str, bool]]  # (text, labelled) in rendering order


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def build(tmp_path: Path, capsys, folder: Path, records: list, *flags) -> tuple[int, str, Path]:
    """Exit code, everything printed, and the dataset folder of `records` built with --sft."""
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in records])
    out = tmp_path / "ds"
    code = main(["build", str(src), "--out", str(out), "--sft", "--tokenizer", str(folder), *flags])
    captured = capsys.readouterr()
    return code, captured.out + captured.err, out


def built_rows(tmp_path, capsys, folder, records, *flags) -> list[tuple[list[int], list[int]]]:
    """Per record, in order: the (ids, labels) of its padding row from
    `Loader(ds, ..., packing=False)`, two positions longer than the longest sample."""
    code, said, out = build(tmp_path, capsys, folder, records, *flags)
    assert code == 0, said
    with open_dataset(out) as ds:
        docs = [ds[i].tolist() for i in range(len(ds))]
        seq_len = max(map(len, docs)) + 2
        loader = Loader(ds, batch_size=1, seq_len=seq_len, packing=False)
        rows = [(b["input_ids"][0].tolist(), b["labels"][0].tolist()) for b in loader]
    assert len(docs) == len(records) == len(rows)
    return [next(r for r in rows if r[0][: len(doc)] == doc) for doc in docs]


def reference(tok, pieces: Pieces) -> tuple[list[int], list[int]]:
    """(ids, labels) of the text `pieces` make: the ids of the whole text, each labelled (its
    own id) where its characters lie in a labelled piece."""
    text = "".join(t for t, _ in pieces)
    encoding = tok.encode(text, add_special_tokens=False)
    labelled, at = [], 0
    for piece, flag in pieces:
        labelled.append((at, at + len(piece), flag))
        at += len(piece)
    labels = []
    for token, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
        flags = {flag for lo, hi, flag in labelled if start < hi and lo < max(end, start + 1)}
        assert len(flags) == 1, f"token {token} at {start}:{end} spans a labelled edge"
        labels.append(token if flags.pop() else IGNORE)
    return encoding.ids, labels


def assert_sample(row, ref, appended_eos: int | None) -> None:
    """The row starts with the reference's ids and labels; then comes the loader's EOS,
    labelled, where the template's end of turn is not the EOS; no label follows."""
    (ids, labels), (ref_ids, ref_labels) = row, ref
    n = len(ref_ids)
    assert ids[:n] == ref_ids
    assert labels[:n] == ref_labels
    if appended_eos is not None:
        assert (ids[n], labels[n]) == (appended_eos, appended_eos)
        n += 1
    assert labels[n:] == [IGNORE] * (len(labels) - n)


def assert_renders(folder: Path, messages: list[dict], pieces: Pieces, tail: str) -> None:
    """transformers renders `messages` as the pieces, then `tail` (what follows the last end of
    turn, which the sample does not hold)."""
    assert rendered(folder, messages) == "".join(t for t, _ in pieces) + tail


def labelled_text(tok, row) -> str:
    ids, labels = row
    return tok.decode(
        [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE], skip_special_tokens=False
    )


def only_last_turn(pieces: Pieces) -> Pieces:
    """The pieces with only the last labelled one (the last assistant turn) labelled."""
    last = max(i for i, (_, flag) in enumerate(pieces) if flag)
    return [(text, i == last) for i, (text, _) in enumerate(pieces)]


def trained_tokenizer(specials: list[str], texts: list[str]):
    """A byte-level BPE trained on the sample corpus and `texts`, with `specials` as added
    special tokens (ids 0, 1, ...)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=specials,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(generate_documents(200, seed=3) + texts * 5, trainer)
    return tok


def save_folder(tok, folder: Path, template: str, bos: str | None, eos: str, pad: str) -> Path:
    """A Hugging Face tokenizer folder; with `bos`, its post-processor puts BOS before a text."""
    if bos is not None:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template
    ).save_pretrained(folder)
    return folder


def rendered(folder: Path, messages: list[dict]) -> str:
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return hf.apply_chat_template(messages, tokenize=False)


# ----------------------------------------------------------------------------- Qwen3

QWEN3_TWO_TURNS = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "第一问"},
    {"role": "assistant", "content": "第一答"},
    {"role": "user", "content": "第二问"},
    {"role": "assistant", "content": "第二答"},
]
# Only the turn after the last user query gets an (empty) <think> block: the template's, not
# the reply's, so it is not labelled.
QWEN3_TWO_TURNS_PIECES: Pieces = [
    (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n第一问<|im_end|>\n"
        "<|im_start|>assistant\n",
        False,
    ),
    ("第一答<|im_end|>", True),
    ("\n<|im_start|>user\n第二问<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
    ("第二答<|im_end|>", True),
]
QWEN3_TOOL = [
    {"role": "user", "content": "Weather in Enloka?"},
    {"role": "assistant", "content": "Let me look it up."},
    {"role": "tool", "content": '{"sky": "grey", "wind_kmh": 40}'},
    {"role": "assistant", "content": "Grey and windy, 40 km/h."},
]
QWEN3_TOOL_PIECES: Pieces = [
    ("<|im_start|>user\nWeather in Enloka?<|im_end|>\n<|im_start|>assistant\n", False),
    ("Let me look it up.<|im_end|>", True),
    (
        '\n<|im_start|>user\n<tool_response>\n{"sky": "grey", "wind_kmh": 40}\n</tool_response>'
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        False,
    ),
    ("Grey and windy, 40 km/h.<|im_end|>", True),
]
QWEN3_RECORDS = [(QWEN3_TWO_TURNS, QWEN3_TWO_TURNS_PIECES), (QWEN3_TOOL, QWEN3_TOOL_PIECES)]


@pytest.fixture(scope="module")
def qwen3():
    if not QWEN3.is_dir():
        pytest.skip(f"needs the shared Qwen3 tokenizer at {QWEN3}")
    return tokenizers.Tokenizer.from_file(str(QWEN3 / "tokenizer.json"))


@pytest.mark.parametrize("turns", ["all", "last"])
def test_qwen3_trains_every_assistant_reply_and_nothing_else(tmp_path, capsys, qwen3, turns):
    records = [messages for messages, _ in QWEN3_RECORDS]
    for messages, pieces in QWEN3_RECORDS:
        assert_renders(QWEN3, messages, pieces, "\n")
    flags = () if turns == "all" else ("--train-on-turns", "last")
    rows = built_rows(tmp_path, capsys, QWEN3, records, *flags)
    for row, (_, pieces) in zip(rows, QWEN3_RECORDS, strict=True):
        # <|im_end|> is Qwen3's EOS and ends every turn: no second one follows the last.
        expected = pieces if turns == "all" else only_last_turn(pieces)
        assert_sample(row, reference(qwen3, expected), appended_eos=None)
    two_turns = labelled_text(qwen3, rows[0])
    assert two_turns == (
        "第一答<|im_end|>第二答<|im_end|>" if turns == "all" else "第二答<|im_end|>"
    )


def _call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


QWEN3_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Enloka"}}\n</tool_call>'
ASK = {"role": "user", "content": "Weather in Enloka?"}
ASKED = "<|im_start|>user\nWeather in Enloka?<|im_end|>\n<|im_start|>assistant\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"  # the template's, before the last turn: unlabelled


def _calling(content: str) -> dict:
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [_call("get_weather", city="Enloka")],
    }


# A tool call is what the model generates: from where generation starts (after the header and
# an empty <think> block the template inserts, as before a text) to the end of turn.
QWEN3_CALLS: list[tuple[list[dict], Pieces]] = [
    (
        [
            ASK,
            _calling(""),
            {"role": "tool", "content": '{"sky": "grey"}'},
            {"role": "assistant", "content": "Grey."},
        ],
        [
            (ASKED, False),
            (QWEN3_CALL + "<|im_end|>", True),
            (
                '\n<|im_start|>user\n<tool_response>\n{"sky": "grey"}\n</tool_response><|im_end|>'
                "\n<|im_start|>assistant\n" + EMPTY_THINK,
                False,
            ),
            ("Grey.<|im_end|>", True),
        ],
    ),
    (
        [ASK, _calling("Let me check.")],
        [(ASKED + EMPTY_THINK, False), ("Let me check.\n" + QWEN3_CALL + "<|im_end|>", True)],
    ),
    ([ASK, _calling("")], [(ASKED + EMPTY_THINK, False), (QWEN3_CALL + "<|im_end|>", True)]),
]


def test_qwen3_trains_tool_calls_as_assistant_turns(tmp_path, capsys, qwen3):
    for messages, pieces in QWEN3_CALLS:
        assert_renders(QWEN3, messages, pieces, "\n")
    rows = built_rows(tmp_path, capsys, QWEN3, [messages for messages, _ in QWEN3_CALLS])
    for row, (_, pieces) in zip(rows, QWEN3_CALLS, strict=True):
        assert_sample(row, reference(qwen3, pieces), appended_eos=None)
    assert labelled_text(qwen3, rows[0]) == QWEN3_CALL + "<|im_end|>Grey.<|im_end|>"


def test_a_tool_call_the_template_does_not_write_leaves_its_turn_unlabelled(tmp_path, capsys):
    # A template that ignores tool_calls: the call is not in the sample, so nothing of it is
    # labelled; a record whose only assistant turn is such a call has nothing to learn from.
    template = (
        "{%- for m in messages %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
    )
    tok = trained_tokenizer(CHATML_SPECIALS, ["Weather?", "Grey."])
    folder = save_folder(tok, tmp_path / "tok", template, None, "<|im_end|>", "<|endoftext|>")
    calling = {"role": "assistant", "content": "", "tool_calls": [_call("get_weather")]}
    user = {"role": "user", "content": "Weather?"}
    rows = built_rows(
        tmp_path, capsys, folder, [[user, calling, {"role": "assistant", "content": "Grey."}]]
    )
    assert labelled_text(tok, rows[0]) == "Grey.<|im_end|>"
    (tmp_path / "only").mkdir()
    code, said, _ = build(tmp_path / "only", capsys, folder, [[user, calling]])
    assert code != 0
    assert "renders nothing of the assistant's turns" in said


# ----------------------------------------------------------------------------- Llama 3

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# Llama 3's template: it writes bos_token itself, trims contents, and ends each turn with
# <|eot_id|>; multi-part contents are their text parts in order.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if m['content'] is string %}{{- m['content'] | trim }}"
    "{%- else %}{%- for part in m['content'] %}{{- part['text'] | trim }}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Where is Enloka?"}]},
    {"role": "assistant", "content": "In the western isles."},
    {"role": "ipython", "content": '{"distance_km": 412}'},
    {"role": "assistant", "content": "About 412 km north."},
]


def llama3_pieces() -> Pieces:
    def head(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    return [
        (
            "<|begin_of_text|>" + head("system") + "Be brief.<|eot_id|>" + head("user")
            + "Where is Enloka?<|eot_id|>" + head("assistant"),
            False,
        ),
        ("In the western isles.<|eot_id|>", True),
        (head("ipython") + '{"distance_km": 412}<|eot_id|>' + head("assistant"), False),
        ("About 412 km north.<|eot_id|>", True),
    ]  # fmt: skip


@pytest.mark.parametrize("eos", ["<|eot_id|>", "<|end_of_text|>"])
def test_a_llama3_template_that_writes_bos_gives_one_bos_and_ends_turns_once(tmp_path, capsys, eos):
    texts = [str(m["content"]) for m in LLAMA3_CHAT]
    tok = trained_tokenizer(LLAMA3_SPECIALS, texts)
    folder = save_folder(tok, tmp_path / "tok", LLAMA3_TEMPLATE, "<|begin_of_text|>", eos, eos)
    pieces = llama3_pieces()
    assert_renders(folder, LLAMA3_CHAT, pieces, "")
    [row] = built_rows(tmp_path, capsys, folder, [LLAMA3_CHAT])
    bos = tok.token_to_id("<|begin_of_text|>")
    assert row[0].count(bos) == 1 and row[0][0] == bos
    # The instruct tokenizer's EOS is <|eot_id|>, which ends the turn: none is appended. The
    # base tokenizer's is <|end_of_text|>: the loader appends it after the last turn, labelled.
    appended = None if eos == "<|eot_id|>" else tok.token_to_id(eos)
    assert_sample(row, reference(tok, pieces), appended_eos=appended)


# ----------------------------------------------------------------------------- Gemma 3

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
# Gemma 3's template: a system prompt goes into the first user turn, the assistant's role is
# `model`, and roles that do not alternate raise.
GEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim }}{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
GEMMA_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is Enloka?"},
    {"role": "assistant", "content": "In the western isles."},
    {"role": "user", "content": "And Riarlo?"},
    {"role": "assistant", "content": "North of it."},
]
GEMMA_PIECES: Pieces = [
    (
        "<bos><start_of_turn>user\nBe brief.\n\nWhere is Enloka?<end_of_turn>\n"
        "<start_of_turn>model\n",
        False,
    ),
    ("In the western isles.<end_of_turn>", True),
    ("\n<start_of_turn>user\nAnd Riarlo?<end_of_turn>\n<start_of_turn>model\n", False),
    ("North of it.<end_of_turn>", True),
]


@pytest.fixture
def gemma(tmp_path):
    tok = trained_tokenizer(GEMMA_SPECIALS, [m["content"] for m in GEMMA_CHAT])
    return tok, save_folder(tok, tmp_path / "tok", GEMMA_TEMPLATE, "<bos>", "<eos>", "<pad>")


@pytest.mark.parametrize("role", ["assistant", "model"])
def test_a_gemma_template_keeps_the_system_prompt_unlabelled_in_the_first_user_turn(
    tmp_path, capsys, gemma, role
):
    tok, folder = gemma
    chat = [dict(m, role=role) if m["role"] == "assistant" else m for m in GEMMA_CHAT]
    assert_renders(folder, chat, GEMMA_PIECES, "\n")
    [row] = built_rows(tmp_path, capsys, folder, [chat])
    assert row[0].count(tok.token_to_id("<bos>")) == 1
    # <end_of_turn> is not the EOS: the loader appends <eos> after the last turn, labelled.
    assert_sample(row, reference(tok, GEMMA_PIECES), appended_eos=tok.token_to_id("<eos>"))


def test_a_gemma_record_whose_roles_do_not_alternate_is_refused_by_number(tmp_path, capsys, gemma):
    _, folder = gemma
    twice = [GEMMA_CHAT[1], GEMMA_CHAT[1], GEMMA_CHAT[2]]
    code, said, out = build(tmp_path, capsys, folder, [GEMMA_CHAT, twice])
    errors = [line for line in said.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1
    assert "chat.jsonl line 2" in errors[0]
    assert "Conversation roles must alternate" in errors[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- markers

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML whose assistant turns are marked for transformers' assistant mask: the content and its
# <|im_end|> are generated, the newline after it is not.
MARKED_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['content'] is string %}{%- set text = m['content'] %}"
    "{%- else %}{%- set text = m['content'] | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if m['role'] == 'assistant' %}"
    "{%- generation %}{{- text + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- text + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MARKED_CHATS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Weather in Enloka?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me "},
                {"type": "text", "text": "look it up."},
            ],
        },
        {"role": "tool", "content": '{"sky": "grey"}'},
        {"role": "assistant", "content": "Grey."},
    ],
    [
        {"role": "user", "content": "Where is Enloka?"},
        {"role": "assistant", "content": "In the western isles."},
    ],
]


@pytest.mark.parametrize("turns", ["all", "last"])
def test_a_template_with_generation_markers_labels_what_it_marks(tmp_path, capsys, turns):
    texts = ["Let me look it up.", "Grey.", "Where is Enloka?", "In the western isles."]
    tok = trained_tokenizer(CHATML_SPECIALS, texts)
    folder = save_folder(
        tok, tmp_path / "tok", MARKED_TEMPLATE, None, "<|im_end|>", "<|endoftext|>"
    )
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    flags = () if turns == "all" else ("--train-on-turns", "last")
    rows = built_rows(tmp_path, capsys, folder, MARKED_CHATS, *flags)
    for messages, row in zip(MARKED_CHATS, rows, strict=True):
        out = hf.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = out["input_ids"], out["assistant_masks"]
        last = max(i for i, m in enumerate(mask) if m)
        assert tok.decode(ids[last + 1 :]) == "\n"  # after the last turn: not in the sample
        ids, mask = ids[: last + 1], mask[: last + 1]
        if turns == "last":  # the marked run that ends last
            first = max(i for i in range(last + 1) if not mask[i]) + 1
            mask = [int(i >= first) for i in range(last + 1)]
        labels = [i if m else IGNORE for i, m in zip(ids, mask, strict=True)]
        assert_sample(row, (ids, labels), appended_eos=None)
    assert labelled_text(tok, rows[0]) == (
        "Let me look it up.<|im_end|>Grey.<|im_end|>" if turns == "all" else "Grey.<|im_end|>"
    )
