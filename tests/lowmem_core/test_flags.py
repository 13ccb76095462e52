"""A bad command-line flag is one `error:` line naming the flag and where help is, exit 2."""

from __future__ import annotations

import pytest

from lowmem_core.flags import one_line

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
    assert "--max_seq_len" in capsys.readouterr().out
