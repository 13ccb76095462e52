"""What an sft dataset teaches: each sample is stored as the tokenizer encodes the whole of it
and split after its prompt's own ids (SentencePiece-style tokenizers start no response with a
word-start marker of its own), the EOS after a response cut to fit is no target, and chat
messages that a template would drop or render empty are refused. The SentencePiece-style
tokenizers are trained here on the sample corpus (no downloads)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from lowmem_core.durable import file_sha256
from lowmem_core.format import RESPONSE_CUT_COLUMN
from pipeline import Loader, PipelineError, open_dataset
from pipeline.__main__ import main
from pipeline.pairs import PairLoader
from pipeline.sample_corpus import generate_documents
from pipeline.sft import ChatTemplate, SftFields, split_records

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

QWEN3 = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "qwen3"
SPECIALS = ["<unk>", "<s>", "</s>"]
# Llama 2 / Mistral tokenizer.json: "▁" put before the text and for every space, no
# pre-tokenizer: a text alone always starts a word, so " harbour" alone is "▁", "▁harbour".
LEGACY_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ],
}


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_documents(300, seed=7)


def llama2_style(corpus):
    """A BPE with byte fallback trained on Metaspace words, saved as Llama 2's tokenizer.json is."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=800, special_tokens=SPECIALS, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    spec = json.loads(tok.to_str())
    spec["normalizer"], spec["pre_tokenizer"] = LEGACY_NORMALIZER, None
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def unigram_style(corpus):
    """A Unigram with a Metaspace pre-tokenizer that marks the text's first word (T5, newer
    Llama conversions): "harbour)" alone is "▁harbour", ")"."""
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = tokenizers.trainers.UnigramTrainer(
        vocab_size=800, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def save_folder(tok, folder: Path, chat_template: str | None = None) -> Path:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=chat_template
    ).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def build(capsys, *args) -> tuple[int, str]:
    """Exit code and everything printed."""
    code = main(["build", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def documents(ds) -> list[list[int]]:
    return [ds[i].tolist() for i in range(len(ds))]


# ----------------------------------------------------------------------------- token boundary

RECORDS = [
    # The Llama 2 report: " harbour" alone is "▁", "▁harbour"; in the sample, "▁harbour".
    {"prompt": "The name comes from an old word for a quiet", "response": " harbour."},
    # No space at the boundary: a "first" Metaspace marks "harbour)" alone as a word start.
    {"prompt": "Riarlo (", "response": "harbour)"},
    {"prompt": "", "response": "Enloka is a cold harbour in the western isles."},
    # The prompt ends with the space of the response's first word: a token spans the boundary.
    {"prompt": "Visitors describe the village as ", "response": "ancient and cold."},
    {"prompt": "Q: where is Enloka?\n", "response": "A: in the western isles"},
]


@pytest.mark.parametrize("style", [llama2_style, unigram_style], ids=["llama2", "unigram"])
def test_samples_are_stored_as_the_tokenizer_encodes_them_whole(tmp_path, capsys, corpus, style):
    tok = style(corpus)
    folder = save_folder(tok, tmp_path / "tok")

    def ids(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    bos = tok.token_to_id("<s>")
    src = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    code, said = build(capsys, src, "--out", tmp_path / "ds", "--sft", "--tokenizer", folder)
    assert code == 0, said
    ds = open_dataset(tmp_path / "ds")
    stored, apart = [], 0
    for r in RECORDS:
        prompt, whole = ids(r["prompt"]), ids(r["prompt"] + r["response"])
        if whole[: len(prompt)] == prompt:
            stored.append(([bos, *prompt], whole[len(prompt) :]))
        else:  # a token spans the boundary: prompt and response apart
            stored.append(([bos, *prompt], ids(r["response"])))
            apart += 1
    assert documents(ds) == [p + r for p, r in stored]
    assert ds.prompt_lengths.tolist() == [len(p) for p, _ in stored]
    # The reported case and its sibling: joined, and not what the response gives alone.
    first, second = ids(RECORDS[0]["response"]), ids(RECORDS[1]["response"])
    if style is llama2_style:
        assert tok.id_to_token(first[0]) == "\u2581" and stored[0][1] != first
    else:
        assert tok.id_to_token(second[0]).startswith("\u2581") and stored[1][1] != second
    assert stored[3][1] == ids(RECORDS[3]["response"])  # the spanning case, apart
    assert apart >= 1
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    assert index["build"]["tokenised_apart"] == apart
    assert f"{apart} samples have a token spanning the end of the prompt" in said


def test_the_byte_tokenizer_never_tokenises_apart(tmp_path, capsys):
    src = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    code, said = build(capsys, src, "--out", tmp_path / "ds", "--sft")
    assert code == 0, said
    ds = open_dataset(tmp_path / "ds")
    assert documents(ds) == [list((r["prompt"] + r["response"]).encode()) for r in RECORDS]
    assert json.loads((tmp_path / "ds" / "index.json").read_text())["build"]["tokenised_apart"] == 0
    assert "spanning" not in said


@pytest.mark.skipif(not QWEN3.is_dir(), reason="needs ../shared/tokenizers/qwen3")
def test_a_qwen3_chat_is_stored_as_the_tokenizer_encodes_its_render(tmp_path, capsys):
    chat = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Where is Enloka?"},
        {"role": "assistant", "content": " In the western isles."},
    ]
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    code, said = build(capsys, src, "--out", tmp_path / "ds", "--sft", "--tokenizer", QWEN3)
    assert code == 0, said
    hf = transformers.AutoTokenizer.from_pretrained(QWEN3, local_files_only=True)
    full = hf.apply_chat_template(chat, tokenize=False)
    # The template ends the turn with its EOS and a newline: dropped, the loader appends EOS.
    assert full.endswith(" In the western isles.<|im_end|>\n")
    kept = full.removesuffix("<|im_end|>\n")
    before = kept.removesuffix(" In the western isles.")
    ds = open_dataset(tmp_path / "ds")
    assert ds[0].tolist() == hf(kept, add_special_tokens=False)["input_ids"]
    assert ds.prompt_lengths.tolist() == [len(hf(before, add_special_tokens=False)["input_ids"])]


# ----------------------------------------------------------------------------- cut responses

LIMIT = 16
CUT_RECORDS = [
    {"prompt": "Q: 2+2?\n", "response": "A: 4"},  # 12 + EOS: fits, its EOS trains
    {"prompt": "Q: spell it\n", "response": "a long answer that will not fit"},  # cut
    {"prompt": "Q: 3+3?\n", "response": "A: 6"},
    {"prompt": "Q: and now?\n", "response": "another answer far too long"},  # cut
]


@pytest.fixture
def cut_dataset(tmp_path, capsys):
    src = write_jsonl(tmp_path / "pairs.jsonl", CUT_RECORDS)
    out = tmp_path / "ds"
    argv = ["--out", out, "--sft", "--max-sample-tokens", LIMIT, "--long-samples", "truncate"]
    code, said = build(capsys, src, *argv)
    assert code == 0, said
    return out


def labelled(batches) -> Counter:
    return Counter(np.concatenate([b["labels"].numpy().ravel() for b in batches]).tolist())


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("ultra_low_mem", [False, True])
def test_the_eos_after_a_cut_response_is_no_target(cut_dataset, packing, ultra_low_mem):
    ds = open_dataset(cut_dataset, ultra_low_mem=ultra_low_mem)
    assert ds.response_cut.tolist() == [0, 1, 0, 1]
    loaders = [Loader(ds, 2, LIMIT, rank=r, world_size=2, packing=packing) for r in range(2)]
    batches = [b.clone() for group in zip(*loaders, strict=True) for b in group]
    counts = labelled(batches)
    assert counts[ds.eos_id] == 2  # one per sample that ends where its response ends
    responses = Counter(
        t for i in range(len(ds)) for t in ds[i][int(ds.prompt_lengths[i]) :].tolist()
    )
    del counts[-100], counts[ds.eos_id]
    assert counts == responses
    assert sum(b.num_tokens for b in batches) == sum(responses.values()) + 2
    assert all(b.num_loss_tokens == int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def test_an_encoder_decoder_batch_has_no_eos_label_after_a_cut_response(cut_dataset):
    ds = open_dataset(cut_dataset)
    loader = PairLoader(ds, 4, 32, 32, start_id=0)
    batches = [b.clone() for b in loader]
    counts = labelled(batches)
    assert counts[ds.eos_id] == 2
    assert (
        sum(b.num_tokens for b in batches)
        == sum(len(ds[i]) - int(ds.prompt_lengths[i]) for i in range(len(ds))) + 2
    )


def test_a_shard_written_before_the_cut_flags_trains_every_eos(cut_dataset):
    """Compatibility: an sft shard without RESPONSE_CUT_COLUMN opens with no response cut."""
    shard = cut_dataset / "shard-00000.arrow"
    with pa.OSFile(str(shard)) as source:  # read into memory: the file is rewritten below
        table = ipc.open_file(source).read_all().drop_columns([RESPONSE_CUT_COLUMN])
    with pa.OSFile(str(shard), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    index = json.loads((cut_dataset / "index.json").read_text())
    index["files"][0].update(bytes=shard.stat().st_size, sha256=file_sha256(shard))
    (cut_dataset / "index.json").write_text(json.dumps(index))
    ds = open_dataset(cut_dataset)
    assert ds.response_cut.tolist() == [0, 0, 0, 0]
    assert labelled(Loader(ds, 4, LIMIT))[ds.eos_id] == 4


# ----------------------------------------------------------------------------- chat messages

TEMPLATE = (  # renders only the roles it knows, as real templates do
    "{% for m in messages %}{% if m['role'] in ['system', 'user', 'assistant'] %}"
    "<{{ m['role'] }}>{{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
ANSWER = {"role": "assistant", "content": "in the western isles"}


@pytest.fixture(scope="module")
def chat(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("chat") / "tok"
    return ChatTemplate(save_folder(llama2_style(corpus[:50]), folder, TEMPLATE))


@pytest.mark.parametrize(
    "first, named",
    [
        ({"content": "where is Enloka?"}, "message 1 has no role"),
        ({"role": "user"}, r"message 1 \(user\) has no content"),
        ({"role": "user", "content": None}, r"message 1 \(user\) has no content"),
        ({"role": "", "content": "where is Enloka?"}, "message 1 has role ''"),
        ({"role": "user", "content": ["where", "is"]}, "has content of type list"),
        ("where is Enloka?", "message 1 is a str, not an object"),
        ({"role": "human", "content": "where is Enloka?"}, "template leaves out message 1"),
    ],
)
def test_a_message_the_template_would_drop_or_leave_empty_is_refused(chat, first, named):
    record = {"messages": [first, ANSWER]}
    with pytest.raises(PipelineError, match=named) as info:
        split_records([record], SftFields(), "chat.jsonl", chat, 12, "line")
    assert str(info.value).startswith("chat.jsonl line 12")
    assert "\n" not in str(info.value)


def test_a_message_without_a_role_fails_the_build_in_one_line(tmp_path, capsys, corpus):
    folder = save_folder(llama2_style(corpus[:50]), tmp_path / "tok", TEMPLATE)
    good = {"messages": [{"role": "user", "content": "where is Enloka?"}, ANSWER]}
    bad = {"messages": [{"content": "where is Enloka?"}, ANSWER]}
    src = write_jsonl(tmp_path / "chat.jsonl", [good, good, bad])
    code, said = build(capsys, src, "--out", tmp_path / "ds", "--sft", "--tokenizer", folder)
    assert code != 0 and not (tmp_path / "ds").exists()
    [line] = [s for s in said.splitlines() if s.startswith("error: ")]
    assert "chat.jsonl line 3: message 1 has no role" in line


@pytest.mark.skipif(not QWEN3.is_dir(), reason="needs ../shared/tokenizers/qwen3")
@pytest.mark.parametrize(
    "first, named",
    [
        ({"content": "where is Enloka?"}, "message 1 has no role"),
        ({"role": "human", "content": "where is Enloka?"}, "template leaves out message 1"),
    ],
)
def test_qwen3s_template_would_drop_these_messages(first, named):
    record = {"messages": [first, ANSWER]}
    with pytest.raises(PipelineError, match=named):
        split_records([record], SftFields(), "chat.jsonl", ChatTemplate(QWEN3), 1, "line")
