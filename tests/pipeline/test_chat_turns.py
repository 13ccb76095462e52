"""Chat records: every assistant turn (or the last, --train-on-turns last) is labelled, its text
and the end-of-turn token the template writes after it; a sample holds one end of turn; the
spans are stored, read by the loader's kernels, and datasets without them load as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from lowmem_core.durable import file_sha256
from lowmem_core.format import IGNORE_INDEX
from pipeline import Loader, open_dataset
from pipeline.__main__ import main
from pipeline.collate import mask_outside_spans

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

QWEN3 = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "qwen3"
TWO_TURNS = [
    {"role": "system", "content": "你是助手"},
    {"role": "user", "content": "第一问"},
    {"role": "assistant", "content": "第一答"},
    {"role": "user", "content": "第二问"},
    {"role": "assistant", "content": "第二答"},
]


def build(capsys, *args) -> tuple[int, str]:
    code = main(["build", *map(str, args)])
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).strip()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def rows(ds) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each sample, one row each (no packing), padding cut off, in the
    epoch's order."""
    out = []
    for batch in Loader(ds, 1, int(ds.doc_lengths.max()) + 1, packing=False):
        end = int(batch["position_ids"][0].max()) + 1  # the sample and its EOS; then padding
        out.append((batch["input_ids"][0, :end].tolist(), batch["labels"][0, :end].tolist()))
    return out


def labelled(ids: list[int], labels: list[int]) -> list[int]:
    return [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]


# ----------------------------------------------------------------------------- the kernel


def mask_reference(labels, doc_starts, span_starts, spans, src, n, dst, doc):
    labels = labels.copy()
    for i in range(src.size):
        first, last = span_starts[doc[i]], span_starts[doc[i] + 1]
        if first == last:
            continue
        inside = np.zeros(n[i], dtype=bool)
        lo = src[i] - doc_starts[doc[i]]
        for start, length in spans[first:last]:
            t = np.arange(lo, lo + n[i])
            inside |= (t >= start) & (t < start + length)
        labels[dst[i] : dst[i] + n[i]][~inside] = IGNORE_INDEX
    return labels


def test_masking_outside_spans_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    doc_lengths = rng.integers(1, 40, size=30)
    doc_starts = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    span_rows, counts = [], []
    for length in doc_lengths:
        edges = np.sort(rng.choice(np.arange(length + 1), size=min(4, length + 1), replace=False))
        pairs = [(a, b - a) for a, b in zip(edges[::2], edges[1::2], strict=False) if b > a]
        keep = pairs if rng.random() < 0.7 else []  # some documents have no spans
        span_rows += keep
        counts.append(len(keep))
    span_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    spans = np.array(span_rows, dtype=np.int64).reshape(-1, 2)
    # Segments: random pieces of random documents laid back to back.
    doc = rng.integers(0, 30, size=25).astype(np.int64)
    lo = np.array([rng.integers(0, doc_lengths[d]) for d in doc], dtype=np.int64)
    n = np.array(
        [rng.integers(0, doc_lengths[d] - a + 1) for d, a in zip(doc, lo, strict=True)], np.int64
    )
    src = doc_starts[doc] + lo
    dst = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    labels = rng.integers(0, 100, size=int(n.sum()) + 3).astype(np.int64)
    expected = mask_reference(labels, doc_starts, span_starts, spans, src, n, dst, doc)
    got = labels.copy()
    cleared = mask_outside_spans(got, doc_starts, span_starts, spans, src, n, dst, doc, doc.size)
    assert got.tolist() == expected.tolist()
    assert cleared == int((expected == IGNORE_INDEX).sum() - (labels == IGNORE_INDEX).sum())
    assert cleared > 0


# ----------------------------------------------------------------------------- real template


@pytest.mark.skipif(not QWEN3.is_dir(), reason="needs ../shared/tokenizers/qwen3")
@pytest.mark.parametrize("turns", ["all", "last"])
def test_a_qwen3_chat_trains_its_assistant_replies_and_nothing_else(tmp_path, capsys, turns):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TWO_TURNS}])
    args = ("--sft", "--tokenizer", QWEN3, "--train-on-turns", turns)
    kwargs = '{"enable_thinking": false}'
    code, said = build(
        capsys, src, "--out", tmp_path / "ds", *args, "--chat-template-kwargs", kwargs
    )
    assert code == 0, said
    tok = tokenizers.Tokenizer.from_file(str(QWEN3 / "tokenizer.json"))
    ds = open_dataset(tmp_path / "ds")
    [(ids, labels)] = rows(ds)
    replies = ["第一答<|im_end|>", "第二答<|im_end|>"] if turns == "all" else ["第二答<|im_end|>"]
    expected = [i for r in replies for i in tok.encode(r, add_special_tokens=False).ids]
    assert labelled(ids, labels) == expected
    im_end = tok.token_to_id("<|im_end|>")
    assert ids[-2:] == [tok.encode("答", add_special_tokens=False).ids[-1], im_end]  # one end
    build_info = json.loads((tmp_path / "ds" / "index.json").read_text())["build"]["chat"]
    assert build_info["template_kwargs"] == {"enable_thinking": False}
    assert build_info["train_on_turns"] == turns
    assert build_info["turn_ends_with_eos"] is True
    assert (build_info["assistant_turns"], build_info["turns_supervised"]) == (
        2,
        2 if turns == "all" else 1,
    )
    assert f"labelled {2 if turns == 'all' else 1} of 2 assistant turns" in said


@pytest.mark.skipif(not QWEN3.is_dir(), reason="needs ../shared/tokenizers/qwen3")
def test_a_template_keyword_the_template_does_not_read_is_refused(tmp_path, capsys):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TWO_TURNS}])
    args = ("--sft", "--tokenizer", QWEN3, "--chat-template-kwargs", '{"enable_thinkng": false}')
    code, said = build(capsys, src, "--out", tmp_path / "ds", *args)
    assert code != 0 and not (tmp_path / "ds").exists()
    assert "enable_thinkng: the chat template" in said and "enable_thinking" in said


# ----------------------------------------------------------------------------- built templates


def folder_with(tmp_path: Path, template: str) -> Path:
    """A byte-level BPE folder whose post-processor puts "<s>" before a text; "</s>" is EOS."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<|eot|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world, how are you? fine thanks"] * 20, trainer)
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=template
    )
    fast.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


CHAT = [
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "fine thanks"},
    {"role": "user", "content": "and you?"},
    {"role": "assistant", "content": [{"type": "text", "text": "hello world"}]},
]
# Llama-3-style: the template writes BOS itself and ends every turn with "<|eot|>" (not EOS).
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>\n\n"
    "{% if m['content'] is string %}{{ m['content'] | trim }}"
    "{% else %}{% for p in m['content'] %}{{ p['text'] | trim }}{% endfor %}{% endif %}"
    "<|eot|>{% endfor %}"
)
# Generation markers: the template says which characters the assistant writes.
MARKED = (
    "{% for m in messages %}<{{ m['role'] }}>"
    "{% if m['role'] == 'assistant' %}{% generation %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{{ m['content'][0]['text'] }}"
    "{% endif %}</s>{% endgeneration %}\n"
    "{% else %}{{ m['content'] }}</s>\n{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "template, replies, eos_labelled",
    [
        (LLAMA3_STYLE, ["fine thanks<|eot|>", "hello world<|eot|>"], True),
        (MARKED, ["fine thanks</s>", "hello world"], True),
    ],
)
def test_built_templates_label_their_turns_with_one_bos_and_one_end(
    tmp_path, capsys, template, replies, eos_labelled
):
    folder = folder_with(tmp_path, template)
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    code, said = build(capsys, src, "--out", tmp_path / "ds", "--sft", "--tokenizer", folder)
    assert code == 0, said
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    ds = open_dataset(tmp_path / "ds")
    [(ids, labels)] = rows(ds)
    expected = [i for r in replies for i in tok.encode(r, add_special_tokens=False).ids]
    assert labelled(ids, labels) == expected + [eos]  # the EOS the loader appends
    assert ids[0] == bos and ids.count(bos) == 1
    # Llama-3-style: only the loader's; marked: after each user turn, the first reply, the loader's.
    assert ids.count(eos) == (1 if template == LLAMA3_STYLE else 4)
    assert ds.label_spans(0).shape == (2, 2)


def test_a_template_that_renders_an_assistant_text_twice_is_refused_naming_the_record(
    tmp_path, capsys
):
    twice = (
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ m['content'] }}{% endif %}</s>{% endfor %}"
    )
    folder = folder_with(tmp_path, twice)
    good = {"prompt": "how", "response": "fine"}
    src = write_jsonl(tmp_path / "chat.jsonl", [good, {"messages": CHAT[:2]}])
    code, said = build(capsys, src, "--out", tmp_path / "ds", "--sft", "--tokenizer", folder)
    assert code != 0 and not (tmp_path / "ds").exists()
    assert "chat.jsonl line 2: the chat template renders the text of message 2 2 times" in said


# ----------------------------------------------------------------------------- old datasets


def test_a_dataset_with_prompt_lengths_only_loads_and_labels_as_before(tmp_path):
    """The column layout of sft datasets built before spans existed."""
    docs = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    prompts = [2, 0, 1]
    folder = tmp_path / "old"
    folder.mkdir()
    schema = pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.uint16()), False),
            pa.field("prompt_lengths", pa.uint32(), False),
            pa.field("response_cut", pa.uint8(), False),
        ]
    )
    batch = pa.record_batch(
        [
            pa.array(docs, pa.list_(pa.uint16())),
            pa.array(prompts, pa.uint32()),
            pa.array([0, 0, 0], pa.uint8()),
        ],
        schema=schema,
    )
    with (
        pa.OSFile(str(folder / "shard-00000.arrow"), "wb") as sink,
        ipc.new_file(sink, schema) as w,
    ):
        w.write_batch(batch)
    shard = folder / "shard-00000.arrow"
    index = {
        "format": "lowmem-tokens/1",
        "kind": "sft",
        "num_documents": 3,
        "num_tokens": 9,
        "dtype": "uint16",
        "vocab_size": 259,
        "column": "input_ids",
        "tokenizer": {"kind": "byte", "id": "byte-v1", "bos_id": 256, "eos_id": 257, "pad_id": 258},
        "files": [
            {
                "name": shard.name,
                "num_documents": 3,
                "num_tokens": 9,
                "bytes": shard.stat().st_size,
                "sha256": file_sha256(shard),
            }
        ],
    }
    (folder / "index.json").write_text(json.dumps(index))
    ds = open_dataset(folder)
    assert ds.spans is None
    assert [ds.label_spans(i).tolist() for i in range(3)] == [[[2, 2]], [[0, 3]], [[1, 1]]]
    got = [labelled(ids, labels) for ids, labels in rows(ds)]
    assert sorted(got) == [[7, 8, 257], [9, 10, 11, 257], [13, 257]]


# ----------------------------------------------------------------------------- stored spans

REPLIES = ["fine thanks", "hello world", "how are you", "thanks", "fine"]


def conversation(i: int) -> list[dict]:
    """Record i: 1 to 3 exchanges; Gemma's "model" names the assistant in every third."""
    role = "model" if i % 3 == 0 else "assistant"
    messages = []
    for t in range(1 + i % 3):
        messages.append({"role": "user", "content": f"question {i} {t}"})
        messages.append({"role": role, "content": REPLIES[(i + t) % len(REPLIES)]})
    return messages


@pytest.mark.parametrize("ultra_low_mem", [False, True])
@pytest.mark.parametrize("packing", [True, False])
def test_spans_across_shards_and_batches_label_exactly_the_replies_over_an_epoch(
    tmp_path, capsys, monkeypatch, ultra_low_mem, packing
):
    from collections import Counter

    from pipeline import shards

    monkeypatch.setattr(shards, "BATCH_TOKENS", 60)  # several record batches per shard
    folder = folder_with(tmp_path, LLAMA3_STYLE)
    records = [{"messages": conversation(i)} for i in range(40)]
    records.insert(5, {"prompt": "how are you?", "response": "fine"})
    src = write_jsonl(tmp_path / "chat.jsonl", records)
    args = ("--sft", "--tokenizer", folder, "--max-shard-tokens", "400", "--num-proc", "2")
    code, said = build(capsys, src, "--out", tmp_path / "ds", *args)
    assert code == 0, said
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = tok.token_to_id("</s>")

    def ids(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    expected = Counter(ids("fine") + [eos])
    for record in records[:5] + records[6:]:
        for m in record["messages"][1::2]:
            expected.update(ids(m["content"] + "<|eot|>"))
        expected[eos] += 1
    ds = open_dataset(tmp_path / "ds", ultra_low_mem=ultra_low_mem)
    assert len(json.loads((tmp_path / "ds" / "index.json").read_text())["files"]) > 1
    assert [len(ds.label_spans(i)) for i in range(len(ds))] == [
        1 if i == 5 else 1 + (i - (i > 5)) % 3 for i in range(len(ds))
    ]
    got, count = Counter(), 0
    for batch in Loader(ds, 2, 24, packing=packing):
        labels = batch["labels"].flatten()
        got.update(labels[labels != IGNORE_INDEX].tolist())
        count += batch.num_tokens
    assert got == expected
    assert count == sum(expected.values())


def test_an_encoder_decoder_learns_the_last_reply_with_the_earlier_turns_as_its_input(
    tmp_path, capsys
):
    from pipeline.pairs import PairLoader

    folder = folder_with(tmp_path, LLAMA3_STYLE)
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    code, said = build(capsys, src, "--out", tmp_path / "ds", "--sft", "--tokenizer", folder)
    assert code == 0, said
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    ds = open_dataset(tmp_path / "ds")
    [batch] = list(PairLoader(ds, 1, 64, 32, start_id=0))
    labels = batch["labels"][0]
    reply = tok.encode("hello world<|eot|>", add_special_tokens=False).ids
    assert labels[labels != IGNORE_INDEX].tolist() == reply + [tok.token_to_id("</s>")]
    encoder = batch["input_ids"][0][batch["position_ids"][0] >= 0].tolist()
    assert encoder == ds[0].tolist()[: int(ds.prompt_lengths[0])]
    assert tok.encode("fine thanks<|eot|>", add_special_tokens=False).ids[0] in encoder


def test_cutting_a_long_chat_cuts_its_spans_and_ends_at_its_last_labelled_token():
    from pipeline.sft import SftEncoded, limit_samples

    sample = SftEncoded(
        values=np.arange(20, dtype=np.uint32),
        lengths=np.array([20]),
        prompt_lengths=np.array([15]),
        response_cut=np.zeros(1, dtype=bool),
        span_counts=np.array([3]),
        spans=np.array([[2, 3], [8, 4], [15, 5]]),
    )
    cut, truncated, dropped = limit_samples(sample, 12, "truncate")  # 11 tokens + EOS
    assert (truncated, dropped) == (1, 0)
    assert cut.lengths.tolist() == [11] and cut.values.tolist() == list(range(11))
    assert cut.spans.tolist() == [[2, 3], [8, 3]] and cut.prompt_lengths.tolist() == [8]
    assert cut.response_cut.tolist() == [True]
    cut, _, _ = limit_samples(sample, 8, "truncate")  # cut in the gap after the first span
    assert cut.lengths.tolist() == [5] and cut.span_counts.tolist() == [0]
    assert cut.prompt_lengths.tolist() == [2] and cut.label_tokens == 3
    cut, truncated, dropped = limit_samples(sample, 3, "truncate")  # no labelled token fits
    assert (truncated, dropped, cut.lengths.size) == (0, 1, 0)


@pytest.mark.parametrize(
    "flags, named",
    [
        (("--train-on-turns", "last"), "apply to chat records; add --sft"),
        (("--sft", "--chat-template-kwargs", "[1]"), "is not a JSON object"),
        (("--sft", "--chat-template-kwargs", "{enable"), "is not a JSON object"),
    ],
)
def test_chat_flags_are_checked_before_any_work(tmp_path, capsys, flags, named):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    code, said = build(capsys, src, "--out", tmp_path / "ds", *flags)
    assert code != 0 and not (tmp_path / "ds").exists()
    [line] = [s for s in said.splitlines() if s.startswith("error: ")]
    assert named in line


def qwen3_labelled(tmp_path, capsys, messages: list[dict]) -> tuple[str, str]:
    """The rendered text of a one-record Qwen3 build and its labelled text."""
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    code, said = build(capsys, src, "--out", tmp_path / "ds", "--sft", "--tokenizer", QWEN3)
    assert code == 0, said
    tok = tokenizers.Tokenizer.from_file(str(QWEN3 / "tokenizer.json"))
    [(ids, labels)] = rows(open_dataset(tmp_path / "ds"))
    text = tok.decode(ids, skip_special_tokens=False)
    return text, tok.decode(labelled(ids, labels), skip_special_tokens=False)


def with_reasoning(messages: list[dict], form: str, k: int, thought: str, answer: str) -> None:
    """Message `k` given `thought` as a think block in its content or as `reasoning_content`."""
    if form == "content":
        messages[k]["content"] = f"<think>\n{thought}\n</think>\n\n{answer}"
    else:
        messages[k].update(content=answer, reasoning_content=thought)


@pytest.mark.skipif(not QWEN3.is_dir(), reason="needs ../shared/tokenizers/qwen3")
@pytest.mark.parametrize("form", ["content", "reasoning_content"])
def test_qwen3_trains_the_reasoning_it_renders_from_its_think_tag(tmp_path, capsys, form):
    """Qwen3 renders the reasoning of the turns after the last user query, which the model must
    learn to write: labelled from the "<think>" tag; an earlier turn's it drops."""
    messages = [dict(m) for m in TWO_TURNS]
    with_reasoning(messages, form, 2, "想一想", "第一答")
    with_reasoning(messages, form, 4, "Two and two.", "Four.")
    text, trained = qwen3_labelled(tmp_path, capsys, messages)
    assert trained == "第一答<|im_end|><think>\nTwo and two.\n</think>\n\nFour.<|im_end|>"
    assert "想一想" not in text and text.count("<think>") == 1


@pytest.mark.skipif(not QWEN3.is_dir(), reason="needs ../shared/tokenizers/qwen3")
def test_qwen3_trains_the_reasoning_of_each_turn_after_the_last_query(tmp_path, capsys):
    """A tool call and the answer after it both follow the last user query: both reasoning
    blocks are rendered and labelled, the tool's reply is not."""
    messages = [
        {"role": "user", "content": "Weather in Enloka?"},
        {"role": "assistant", "content": "<think>Ask the tool.</think>Let me look it up."},
        {"role": "tool", "content": '{"sky": "grey"}'},
        {"role": "assistant", "content": "Grey.", "reasoning_content": "It says grey."},
    ]
    text, trained = qwen3_labelled(tmp_path, capsys, messages)
    assert trained == (
        "<think>\nAsk the tool.\n</think>\n\nLet me look it up.<|im_end|>"
        "<think>\nIt says grey.\n</think>\n\nGrey.<|im_end|>"
    )
    assert '{"sky": "grey"}' in text


@pytest.mark.skipif(not QWEN3.is_dir(), reason="needs ../shared/tokenizers/qwen3")
@pytest.mark.parametrize("last", ["第二答", "<think>\n\n</think>\n\n第二答"])
def test_the_empty_think_block_qwen3_inserts_stays_unlabelled(tmp_path, capsys, last):
    """With no reasoning given (or a blank one), the empty block before the last answer is the
    template's, as in the enable_thinking=False generation prompt: context, not a target."""
    messages = [dict(m) for m in TWO_TURNS]
    messages[4]["content"] = last
    text, trained = qwen3_labelled(tmp_path, capsys, messages)
    assert trained == "第一答<|im_end|>第二答<|im_end|>"
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n第二答<|im_end|>")


REASONED = [
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "fine thanks", "reasoning_content": "hello world"},
]


def test_reasoning_a_template_renders_without_a_think_tag_is_labelled_from_itself(tmp_path, capsys):
    plain = (
        "{% for m in messages %}<{{ m['role'] }}>{% if m.reasoning_content %}"
        "{{ m.reasoning_content }}\n{% endif %}{{ m['content'] }}<|eot|>{% endfor %}"
    )
    folder = folder_with(tmp_path, plain)
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": REASONED}])
    code, said = build(capsys, src, "--out", tmp_path / "ds", "--sft", "--tokenizer", folder)
    assert code == 0, said
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    [(ids, labels)] = rows(open_dataset(tmp_path / "ds"))
    trained = tok.decode(labelled(ids, labels), skip_special_tokens=False)
    assert trained == "hello world\nfine thanks<|eot|></s>"


@pytest.mark.parametrize(
    "template, said_of_it",
    [
        (  # the reasoning twice: no one place to label
            "{% for m in messages %}{{ m.reasoning_content or '' }}"
            "{{ m.reasoning_content or '' }}{{ m['content'] }}</s>{% endfor %}",
            "renders the text of message 2 2 times",
        ),
        (  # the reasoning after the answer: no one span from its tag to the end of the turn
            "{% for m in messages %}{{ m['content'] }}{% if m.reasoning_content %}<think>"
            "{{ m.reasoning_content }}</think>{% endif %}</s>{% endfor %}",
            "renders message 2 (an assistant turn) differently",
        ),
    ],
)
def test_reasoning_a_template_repeats_or_moves_is_refused_naming_the_record(
    tmp_path, capsys, template, said_of_it
):
    folder = folder_with(tmp_path, template)
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": REASONED}])
    code, said = build(capsys, src, "--out", tmp_path / "ds", "--sft", "--tokenizer", folder)
    assert code != 0 and not (tmp_path / "ds").exists()
    assert f"chat.jsonl line 1: the chat template {said_of_it}" in said
