"""`pipeline build --sft`: each prompt/response record is one document (prompt tokens, then
response tokens) with its prompt length stored beside it; bad records fail in one line naming the
file and line, and leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from lowmem_core.durable import file_sha256
from pipeline import PipelineError, open_dataset, shards, sources
from pipeline.__main__ import main

RECORDS = [
    {"prompt": "Q: 2+2?\n", "response": "A: 4"},
    {"prompt": "", "response": "a response-only sample"},
    {"prompt": "héllo ", "response": "wörld 🙂"},
    {"prompt": "how are you?", "response": "hello world"},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def build(capsys, *args) -> tuple[int, str]:
    """Exit code and the last line printed (the error line when it fails)."""
    code = main(["build", *map(str, args)])
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).replace("\r", "\n").strip().splitlines()
    if code:
        assert sum(line.startswith("error: ") for line in lines) == 1
    return code, lines[-1] if lines else ""


def documents(ds) -> list[list[int]]:
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("ultra_low_mem", [False, True])
def test_byte_tokenizer_records_become_prompt_then_response(tmp_path, capsys, ultra_low_mem):
    src = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    code, said = build(capsys, src, "--out", tmp_path / "ds", "--sft")
    assert code == 0, said
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    assert index["kind"] == "sft"
    ds = open_dataset(tmp_path / "ds", ultra_low_mem=ultra_low_mem)
    assert ds.kind == "sft" and ds.ultra_low_mem == ultra_low_mem
    assert ds.prompt_lengths.dtype == np.int64
    assert ds.prompt_lengths.tolist() == [len(r["prompt"].encode()) for r in RECORDS]
    assert documents(ds) == [list((r["prompt"] + r["response"]).encode()) for r in RECORDS]


def test_field_names_are_flags_and_prompt_lengths_follow_documents_across_shards(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(shards, "BATCH_TOKENS", 40)  # several record batches per shard
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "é", "漢字"]
    pairs = [
        (" ".join(rng.choice(words, size=int(rng.integers(0, 6)))), f"answer {i}")
        for i in range(60)
    ]
    records = [{"instruction": p, "output": r, "id": i} for i, (p, r) in enumerate(pairs)]
    (tmp_path / "pairs.json").write_text(json.dumps(records, ensure_ascii=False))
    code, said = build(
        capsys,
        *(tmp_path / "pairs.json", "--out", tmp_path / "ds", "--sft", "--num-proc", "2"),
        *("--prompt-field", "instruction", "--response-field", "output"),
        *("--max-shard-tokens", "300"),
    )
    assert code == 0, said
    ds = open_dataset(tmp_path / "ds")
    assert len(json.loads((tmp_path / "ds" / "index.json").read_text())["files"]) > 1
    assert ds.prompt_lengths.tolist() == [len(p.encode()) for p, _ in pairs]
    assert documents(ds) == [list((p + r).encode()) for p, r in pairs]


def bpe_folder(folder: Path, chat_template: str | None = None) -> Path:
    """A tiny byte-level BPE saved as a Hugging Face tokenizer folder; "<s>" starts every text."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([r["prompt"] + r["response"] for r in RECORDS] * 20, trainer)
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=chat_template
    )
    fast.save_pretrained(folder)
    return folder


def test_a_hugging_face_tokenizer_folder_gives_bos_prompt_then_response(tmp_path, capsys):
    folder = bpe_folder(tmp_path / "tok")
    records = [*RECORDS, {"prompt": "Q: 2+2?\n", "response": "A: 4</s>"}]  # its EOS is dropped
    src = write_jsonl(tmp_path / "pairs.jsonl", records)
    code, said = build(capsys, src, "--out", tmp_path / "ds", "--sft", "--tokenizer", folder)
    assert code == 0, said
    tok = pytest.importorskip("tokenizers").Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    prompts = [[bos, *tok.encode(r["prompt"], add_special_tokens=False).ids] for r in records]
    responses = [tok.encode(r["response"], add_special_tokens=False).ids for r in records]
    responses[-1] = responses[-1][:-1]
    assert tok.encode("A: 4</s>", add_special_tokens=False).ids[-1] == tok.token_to_id("</s>")
    ds = open_dataset(tmp_path / "ds", ultra_low_mem=True)
    assert ds.prompt_lengths.tolist() == [len(p) for p in prompts]
    assert documents(ds) == [p + r for p, r in zip(prompts, responses, strict=True)]


def test_messages_are_rendered_with_the_folders_chat_template(tmp_path, capsys):
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    folder = bpe_folder(tmp_path / "tok", template)
    chat = [
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "hello world"},
    ]
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}, RECORDS[0]])
    code, said = build(capsys, src, "--out", tmp_path / "ds", "--sft", "--tokenizer", folder)
    assert code == 0, said
    tok = pytest.importorskip("tokenizers").Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = tok.token_to_id("<s>")

    def ids(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    # The rendered response "hello world</s>" loses its EOS: the loader puts one after it.
    prompts = [[bos, *ids("<user>how are you?</s><assistant>")], [bos, *ids("Q: 2+2?\n")]]
    responses = [ids("hello world"), ids("A: 4")]
    ds = open_dataset(tmp_path / "ds")
    assert ds.prompt_lengths.tolist() == [len(p) for p in prompts]
    assert documents(ds) == [p + r for p, r in zip(prompts, responses, strict=True)]


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"prompt": "q"}, "line 4 has no text field 'response'"),
        ({"prompt": "q", "response": " \n"}, "line 4 has an empty response"),
        ({"prompt": 7, "response": "a"}, "line 4 has 'prompt' = int, expected text"),
        ({"question": "q"}, "line 4 has no text field 'prompt' or 'response'"),
        (["q", "a"], "line 4 is a list, not an object"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "line 4 has messages but the"),
        ({"messages": [{"role": "user", "content": "q"}]}, "line 4: the last message must"),
    ],
)
def test_a_bad_record_is_one_line_naming_file_and_line_and_writes_nothing(
    tmp_path, capsys, monkeypatch, bad, named
):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 16)  # good chunks are written before the bad one
    src = tmp_path / "in" / "pairs.jsonl"
    src.parent.mkdir()
    lines = [json.dumps(r) for r in RECORDS[:2]]
    src.write_text("\n".join([*lines, "", json.dumps(bad), json.dumps(RECORDS[2])]) + "\n")
    code, said = build(capsys, src, "--out", tmp_path / "out" / "ds", "--sft")
    assert code == 2
    assert said.startswith("error: ")
    assert f"{src} {named}" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_bad_record_of_a_json_array_is_named_by_its_place(tmp_path, capsys):
    (tmp_path / "pairs.json").write_text(json.dumps([RECORDS[0], {"prompt": "q"}]))
    code, said = build(capsys, tmp_path / "pairs.json", "--out", tmp_path / "ds", "--sft")
    assert code == 2 and "pairs.json record 2 has no text field 'response'" in said
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    "args, named",
    [
        (["--sft", "--strip"], "--strip applies to text builds"),
        (["--sft", "--text-field", "body"], "--text-field applies to text builds"),
        (["--prompt-field", "q"], "add --sft"),
        (["--max-sample-tokens", "8"], "needs --sft"),
        (["--sft", "--max-sample-tokens", "1"], "at least 2 tokens"),
        (["--sft", "--long-samples", "drop"], "needs --max-sample-tokens N"),
    ],
)
def test_flags_that_do_not_go_together_are_one_line(tmp_path, capsys, args, named):
    src = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    code, said = build(capsys, src, "--out", tmp_path / "ds", *args)
    assert code == 2 and named in said
    assert not (tmp_path / "ds").exists()


def test_plain_text_is_refused_with_sft(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("just text\n")
    code, said = build(capsys, tmp_path / "a.txt", "--out", tmp_path / "ds", "--sft")
    assert code == 2 and "is plain text, but --sft needs records" in said


def test_a_text_dataset_has_kind_text_and_no_prompt_lengths(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    assert build(capsys, src, "--out", tmp_path / "ds")[0] == 0
    index_path = tmp_path / "ds" / "index.json"
    index = json.loads(index_path.read_text())
    assert index["kind"] == "text"
    del index["kind"]  # as written before prompt/response builds existed
    index_path.write_text(json.dumps(index))
    for ultra_low_mem in (False, True):
        ds = open_dataset(tmp_path / "ds", ultra_low_mem=ultra_low_mem)
        assert (ds.kind, ds.prompt_lengths, documents(ds)) == (
            "text",
            None,
            [[111, 110, 101], [116, 119, 111]],
        )


def _rewrite_shard(folder: Path, prompt_lengths: pa.Array | None) -> None:
    """Replace the prompt lengths of the dataset's one shard (None: drop the column)."""
    path = folder / "shard-00000.arrow"
    with pa.OSFile(str(path)) as source:  # read into memory: the file is rewritten below
        table = ipc.open_file(source).read_all()
    table = table.drop_columns(["prompt_lengths"])
    if prompt_lengths is not None:
        table = table.append_column(pa.field("prompt_lengths", pa.uint32(), False), prompt_lengths)
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    index = json.loads((folder / "index.json").read_text())
    index["files"][0].update(bytes=path.stat().st_size, sha256=file_sha256(path))
    (folder / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "prompt_lengths, named",
    [
        ([13, 0, 7, 12], "row 0 has a prompt of 13 tokens but a document of 12"),
        (None, "has no 'prompt_lengths' column"),
    ],
)
def test_prompt_lengths_that_do_not_fit_their_documents_ask_for_a_rebuild(
    tmp_path, capsys, prompt_lengths, named
):
    src = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    assert build(capsys, src, "--out", tmp_path / "ds", "--sft")[0] == 0
    array = None if prompt_lengths is None else pa.array(prompt_lengths, pa.uint32())
    if prompt_lengths is not None:
        assert open_dataset(tmp_path / "ds").doc_lengths[0] == 12
    _rewrite_shard(tmp_path / "ds", array)
    with pytest.raises(PipelineError, match=named) as info:
        open_dataset(tmp_path / "ds")
    assert "pipeline build" in str(info.value) and "\n" not in str(info.value)


def test_a_datasets_folder_with_prompt_lengths_opens_as_sft(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict(
        {"input_ids": [[5, 6, 7], [8, 9]], "prompt_lengths": [2, 0], "note": ["a", "b"]}
    )
    data.save_to_disk(str(tmp_path / "hf"))
    ds = open_dataset(tmp_path / "hf")
    assert (ds.kind, ds.prompt_lengths.tolist(), documents(ds)) == (
        "sft",
        [2, 0],
        [[5, 6, 7], [8, 9]],
    )
    plain = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7]]})
    plain.save_to_disk(str(tmp_path / "plain"))
    assert (
        open_dataset(tmp_path / "plain").kind,
        open_dataset(tmp_path / "plain").prompt_lengths,
    ) == ("text", None)


@pytest.mark.parametrize("mode", ["keep", "truncate", "drop"])
def test_samples_longer_than_the_limit_are_kept_cut_or_dropped_and_counted(tmp_path, capsys, mode):
    # Byte tokenizer: a record's tokens are its UTF-8 bytes; the limit counts the EOS too.
    limit = 16
    records = [
        {"prompt": "Q: 2+2?\n", "response": "A: 4"},  # 12 + EOS: fits
        {"prompt": "Q: spell it\n", "response": "a long answer that will not fit"},  # cut
        {"prompt": "a prompt longer than the limit", "response": "x"},  # no room: dropped
    ]
    src = write_jsonl(tmp_path / "pairs.jsonl", records)
    out = tmp_path / "ds"
    argv = ["build", str(src), "--out", str(out), "--sft", "--max-sample-tokens", str(limit)]
    assert main([*argv, "--long-samples", mode]) == 0
    said = capsys.readouterr().out
    whole = [list((r["prompt"] + r["response"]).encode()) for r in records]
    prompts = [len(r["prompt"].encode()) for r in records]
    ds = open_dataset(out)
    stats = json.loads((out / "index.json").read_text())["build"]["long_samples"]
    if mode == "keep":
        assert documents(ds) == whole and stats["truncated"] == stats["dropped"] == 0
    elif mode == "truncate":
        assert documents(ds) == [whole[0], whole[1][: limit - 1]]
        assert ds.prompt_lengths.tolist() == prompts[:2]
        assert (stats["truncated"], stats["dropped"]) == (1, 1)
        assert "1 truncated (response cut at the end), 1 dropped" in said
    else:
        assert documents(ds) == [whole[0]] and ds.prompt_lengths.tolist() == prompts[:1]
        assert (stats["truncated"], stats["dropped"]) == (0, 2)
