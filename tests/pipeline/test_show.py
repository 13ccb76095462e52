"""`python -m pipeline show DIR --sample N`: a stored sample decoded with its dataset's tokenizer,
labelled text between « and », the EOS the loader appends after it; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.__main__ import main


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    """Exit code, stdout, stderr."""
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def built(tmp_path, capsys, records: list, *flags) -> Path:
    src = write_jsonl(tmp_path / "in.jsonl", records)
    code, out, err = run(capsys, "build", src, "--out", tmp_path / "ds", *flags)
    assert code == 0, out + err
    return tmp_path / "ds"


def test_a_text_sample_is_labelled_whole_and_followed_by_the_loaders_eos(tmp_path, capsys):
    ds = built(tmp_path, capsys, [{"text": "héllo wörld"}, {"text": "second\ndoc"}])
    code, out, err = run(capsys, "show", ds, "--sample", 1)
    assert (code, err) == (0, "")
    assert out == (
        f"{ds} (text, 2 samples, tokenizer byte)\n\n"
        "sample 1 of 2: 10 tokens, 11 labelled; labelled spans (start, length): (0, 10); "
        'the loader appends EOS "<eos>" (labelled)\n'
        "«second\ndoc»«<eos>»\n"
    )


PAIRS = [
    {"prompt": "Q: 2+2?\n", "response": "A: 4"},
    {"prompt": "", "response": "réponse seule"},
    {"prompt": "Q: spell it\n", "response": "a long answer that will not fit"},
]


def test_prompt_response_samples_label_the_response_and_count_k_samples(tmp_path, capsys):
    ds = built(tmp_path, capsys, PAIRS, "--sft")
    code, out, err = run(capsys, "show", ds, "--sample", 0, "--count", 2)
    assert (code, err) == (0, "")
    assert out == (
        f"{ds} (sft, 3 samples, tokenizer byte)\n\n"
        "sample 0 of 3: 12 tokens, 5 labelled; labelled spans (start, length): (8, 4); "
        'the loader appends EOS "<eos>" (labelled)\n'
        "Q: 2+2?\n«A: 4»«<eos>»\n"
        "\n"
        "sample 1 of 3: 14 tokens, 15 labelled; labelled spans (start, length): (0, 14); "
        'the loader appends EOS "<eos>" (labelled)\n'
        "«réponse seule»«<eos>»\n"
    )


def test_the_eos_after_a_cut_response_is_shown_unlabelled(tmp_path, capsys):
    limit = ["--max-sample-tokens", 16, "--long-samples", "truncate"]
    ds = built(tmp_path, capsys, PAIRS, "--sft", *limit)
    code, out, err = run(capsys, "show", ds, "--sample", 2, "--count", 5)
    assert (code, err) == (0, "")
    assert out == (
        f"{ds} (sft, 3 samples, tokenizer byte)\n\n"
        "sample 2 of 3: 15 tokens, 3 labelled; labelled spans (start, length): (12, 3); "
        'the loader appends EOS "<eos>" (not labelled: its response was cut)\n'
        "Q: spell it\n«a l»<eos>\n"
    )


def test_a_datasets_folder_with_prompt_lengths_shows_its_ids(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "prompt_lengths": [2, 0]})
    data.save_to_disk(str(tmp_path / "hf"))
    capsys.readouterr()  # the progress bar of save_to_disk
    code, out, err = run(capsys, "show", tmp_path / "hf")
    assert (code, err) == (0, "")
    # No tokenizer is recorded: ids are printed, the EOS is a new id past the largest (10).
    assert out == (
        f"{tmp_path / 'hf'} (sft, 2 samples, tokenizer none)\n\n"
        "sample 0 of 2: 3 tokens, 2 labelled; labelled spans (start, length): (2, 1); "
        'the loader appends EOS "10" (labelled)\n'
        "5 6«7»«10»\n"
    )


def test_a_tokenizer_folder_decodes_special_tokens(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([r["prompt"] + r["response"] for r in PAIRS] * 10, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    ds = built(tmp_path, capsys, PAIRS[:1], "--sft", "--tokenizer", tmp_path / "tokenizer.json")
    code, out, err = run(capsys, "show", ds)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"{ds} (sft, 1 samples, tokenizer {tmp_path / 'tokenizer.json'})"
    assert lines[-2:] == ["Q: 2+2?", "«A: 4»«</s>»"]
    moved = tmp_path / "moved.json"
    (tmp_path / "tokenizer.json").rename(moved)
    code, out, err = run(capsys, "show", ds)
    assert (code, out) == (2, "")
    assert err.startswith("error: the dataset's tokenizer ") and "--tokenizer PATH" in err
    assert len(err.splitlines()) == 1
    code, out, err = run(capsys, "show", ds, "--tokenizer", moved)
    assert (code, err, out.splitlines()[-1]) == (0, "", "«A: 4»«</s>»")


@pytest.mark.parametrize(
    "args, said",
    [
        (["--sample", 3], "error: --sample 3 is past the end of {ds}, which holds 3 samples; "),
        (["--sample", -1], "error: --sample must be >= 0"),
        (["--count", 0], "error: --count must be >= 1, got 0"),
    ],
)
def test_a_bad_sample_number_is_one_line(tmp_path, capsys, args, said):
    ds = built(tmp_path, capsys, PAIRS, "--sft")
    code, out, err = run(capsys, "show", ds, *args)
    assert (code, out) == (2, "")
    assert err.startswith(said.format(ds=ds)) and len(err.splitlines()) == 1


def test_a_missing_dataset_is_one_line(tmp_path, capsys):
    code, out, err = run(capsys, "show", tmp_path / "nope")
    assert (code, out) == (2, "")
    assert err == (
        f"error: dataset {tmp_path / 'nope'} does not exist; build it with "
        f"`python -m pipeline build INPUT... --out {tmp_path / 'nope'}`\n"
    )


CHATML = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is Enloka?"},
    {"role": "assistant", "content": "In the western isles."},
    {"role": "user", "content": "And Riarlo?"},
    {"role": "assistant", "content": "North of it."},
]


def test_a_chat_shows_every_assistant_turn_labelled_and_one_end_of_turn(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([m["content"] for m in CHAT] * 10, trainer)
    folder = tmp_path / "tok"
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    ).save_pretrained(folder)
    ds = built(tmp_path, capsys, [{"messages": CHAT}], "--sft", "--tokenizer", folder)
    code, out, err = run(capsys, "show", ds)
    assert (code, err) == (0, "")
    title, sample = out.split("\n\n")
    assert title == f"{ds} (sft, 1 samples, tokenizer {folder.resolve()})"
    head, body = sample.split("\n", 1)
    assert head.startswith("sample 0 of 1: ")
    assert head.endswith('the loader appends EOS "<|im_end|>" (labelled)')
    # The system prompt and the user turns are kept and not labelled; the template's last
    # <|im_end|> is the loader's EOS, so the sample ends one turn once.
    assert body == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhere is Enloka?<|im_end|>\n"
        "<|im_start|>assistant\n«In the western isles.<|im_end|>»\n"
        "<|im_start|>user\nAnd Riarlo?<|im_end|>\n<|im_start|>assistant\n"
        "«North of it.»«<|im_end|>»\n"
    )
