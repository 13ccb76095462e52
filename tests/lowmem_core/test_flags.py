"""Command-line flags: a boolean is taken bare or with a value on every command, and a bad
flag is one `error:` line naming the flag and where help is, exit 2."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.__main__ import parse_args as bench_args
from lowmem_core.errors import ConfigError
from lowmem_core.flags import one_line
from pipeline.__main__ import parse_args as pipeline_args
from trainer_low_mem.cli import parse_job_config, parse_plan_config

UNICODE_BOX = """\
╭─ Value error ──────────────────────────╮
│ Error parsing --lr: could not convert  │
│ string to float: 'abc'                 │
│ ────────────────────────────────────── │
│ Argument helptext:                     │
│     --lr FLOAT                         │
│ ────────────────────────────────────── │
│ For full helptext, see prog --help     │
╰────────────────────────────────────────╯
"""
ASCII_BOX = """\
 Unrecognized options
 ---------------------------------------
  Unrecognized options: --bogus
  ---------------------------------------
  For full helptext, run prog train --help
"""


def test_the_message_of_either_box_style_is_one_line():
    assert one_line(UNICODE_BOX) == "Error parsing --lr: could not convert string to float: 'abc'"
    assert one_line(ASCII_BOX) == "Unrecognized options: --bogus"


@pytest.mark.parametrize(
    "module, argv, expected",
    [
        (
            "trainer_low_mem.cli",
            ["train", "--lr", "abc"],
            "error: Error parsing --lr: could not convert string to float: 'abc'; "
            "see `train_low_mem.py train --help`",
        ),
        ("trainer_low_mem.cli", ["train", "--bogus"], "error: Unrecognized options: --bogus;"),
        (
            "pipeline.__main__",
            ["build", "x", "--num-proc", "abc"],
            "error: Error parsing --num-proc",
        ),
        ("bench.__main__", ["throughput", "--seconds", "x"], "error: Error parsing --seconds"),
    ],
)
def test_every_cli_reports_a_bad_flag_in_one_line(capsys, module, argv, expected):
    import importlib

    main = importlib.import_module(module).main
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), captured.err
    assert "╭" not in captured.out + captured.err


def test_help_still_prints_in_full(capsys):
    from trainer_low_mem.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--max_seq_len" in out
    assert "--no_is_keep_training" in out and "--no_packing" in out  # booleans are flag pairs


def _forms(flag: str, negative: str) -> list[tuple[list[str], bool]]:
    """Each way to give a boolean: bare, negated, and with a value after `=` or as the next word."""
    return [
        ([flag], True),
        ([negative], False),
        ([f"{flag}=True"], True),
        ([flag, "True"], True),
        ([f"{flag}=false"], False),
        ([flag, "False"], False),
    ]


@dataclass(frozen=True)
class Command:
    """One command's boolean flag, and a flag that takes a value to give after it."""

    parse: Callable[[list[str]], object]
    before: list[str]  # the subcommand and its positional inputs
    flag: str
    negative: str
    read: Callable[[object], object]  # the flag's value in the parsed config
    after: list[str]
    read_after: Callable[[object], object]
    expected_after: object


COMMANDS = {
    "train": Command(
        parse_job_config,
        [],
        "--is_keep_training",
        "--no_is_keep_training",
        lambda c: c.checkpoint.is_keep_training,
        ["--output_dir", "run"],
        lambda c: c.checkpoint.output_dir,
        Path("run"),
    ),
    "train alias": Command(
        parse_job_config,
        [],
        "--resume",
        "--no-resume",
        lambda c: c.checkpoint.is_keep_training,
        ["--max_steps", "7"],
        lambda c: c.training.max_steps,
        7,
    ),
    "train default true": Command(
        parse_job_config,
        [],
        "--packing",
        "--no_packing",
        lambda c: c.data.packing,
        ["--data", "d"],
        lambda c: c.data.data,
        Path("d"),
    ),
    "plan": Command(
        parse_plan_config,
        [],
        "--json",
        "--no-json",
        lambda c: c.json,
        ["--data", "d"],
        lambda c: c.data.data,
        Path("d"),
    ),
    "pipeline build": Command(
        pipeline_args,
        ["build", "in.jsonl"],
        "--sft",
        "--no-sft",
        lambda c: c.sft,
        ["--out", "ds"],
        lambda c: c.out,
        Path("ds"),
    ),
    "pipeline build default true": Command(
        pipeline_args,
        ["build", "in.jsonl"],
        "--fast-bpe",
        "--no_fast_bpe",
        lambda c: c.fast_bpe,
        ["--num-proc", "3"],
        lambda c: c.num_proc,
        3,
    ),
    "pipeline tokenize-distributed": Command(
        pipeline_args,
        ["tokenize-distributed", "in.jsonl"],
        "--strip",
        "--no-strip",
        lambda c: c.strip,
        ["--out", "shards"],
        lambda c: c.out,
        Path("shards"),
    ),
    "bench throughput": Command(
        bench_args,
        ["throughput"],
        "--progress",
        "--no-progress",
        lambda c: c.progress,
        ["--seq-len", "64"],
        lambda c: c.seq_len,
        64,
    ),
    "bench plan": Command(
        bench_args,
        ["plan"],
        "--quick",
        "--no-quick",
        lambda c: c.quick,
        ["--json", "plan.json"],  # a path here, not a boolean
        lambda c: c.json_path,
        Path("plan.json"),
    ),
}
CASES = [
    (name, form, expected)
    for name, command in COMMANDS.items()
    for form, expected in _forms(command.flag, command.negative)
]


@pytest.mark.parametrize(
    "name, form, expected", CASES, ids=[f"{n}: {' '.join(f)}" for n, f, _ in CASES]
)
def test_every_command_takes_a_boolean_bare_or_with_a_value(name, form, expected):
    command = COMMANDS[name]
    cfg = command.parse([*command.before, *form, *command.after])
    assert command.read(cfg) is expected
    assert command.read_after(cfg) == command.expected_after  # not taken as the boolean's value


@pytest.mark.parametrize("name", COMMANDS)
def test_a_boolean_given_another_value_is_one_line(name):
    command = COMMANDS[name]
    with pytest.raises(ConfigError) as exc:
        command.parse([*command.before, f"{command.flag}=maybe", *command.after])
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{command.flag} takes true, false or no value")
    assert "got 'maybe'; see `" in message and message.endswith(" --help`")


def test_a_bare_boolean_leaves_the_next_input_alone():
    cfg = pipeline_args(["build", "--sft", "a.jsonl", "b.jsonl", "--", "--strip", "true"])
    assert (cfg.sft, cfg.strip) == (True, False)  # `--` ends the flags
    assert cfg.inputs == [Path("a.jsonl"), Path("b.jsonl"), Path("--strip"), Path("true")]


@pytest.mark.parametrize(
    "form, expected",
    [
        (["--document_masking"], True),
        (["--no_document_masking"], False),
        (["--no-document_masking"], False),
        (["--document_masking=TRUE"], True),
        (["--document_masking", "false"], False),
        (["--document_masking", "None"], None),
        ([], None),
    ],
)
def test_a_boolean_that_may_be_unset_takes_the_same_forms(form, expected):
    cfg = parse_job_config([*form, "--max_steps", "7"])
    assert (cfg.model.document_masking, cfg.training.max_steps) == (expected, 7)


@pytest.mark.parametrize(
    "form, expected",
    [(["--no_verify"], True), (["--no_verify=False"], False), (["--no_no_verify"], False)],
)
def test_a_boolean_named_no_something_is_not_a_negation(form, expected):
    assert parse_job_config(form).data.no_verify is expected
