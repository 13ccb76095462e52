"""What the commands' help shows: --debug for `train` and `plan`, and `plan` among the pipeline's
subcommands."""

from __future__ import annotations

import pytest

from pipeline.__main__ import main as pipeline_main
from trainer_low_mem.cli import main as trainer_main
from trainer_low_mem.cli import parse_job_config, parse_plan_config


def help_text(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "main, argv",
    [
        (trainer_main, ["train", "--help"]),
        (trainer_main, ["plan", "--help"]),
        (pipeline_main, ["plan", "-h"]),
    ],
    ids=["train", "plan", "pipeline plan"],
)
def test_debug_is_in_the_help(main, argv, capsys):
    out = help_text(main, argv, capsys)
    assert "--debug" in out and "full traceback" in out and "--no_debug" not in out
    assert "--data" in out  # the command's own flags are all still there


def test_the_pipeline_help_lists_plan(capsys):
    out = help_text(pipeline_main, ["--help"], capsys)
    assert "{build,tokenize-distributed,demo,show,plan}" in out
    assert "The plan a run would use" in out


def test_debug_stays_out_of_the_parsed_configs(capsys):
    assert not hasattr(parse_job_config([]), "debug")
    assert not hasattr(parse_plan_config([]), "debug")
    argv = ["plan", "--model_preset", "tiny", "--max_seq_len", "128", "--global_batch", "8"]
    assert trainer_main([*argv, "--debug"]) == 0
    assert capsys.readouterr().out.startswith("plan: global batch 8")
