"""Boundary values for every flag of `train`, `python -m pipeline build` and `bench throughput`.

The flag list comes from the config dataclasses, so a new flag is covered without a test change.
Each invocation runs in-process through the CLI's `main(argv)` and is pointed at a dataset or
input that does not exist, so a value the parser accepts stops at start-up. The outcome must be
a clean exit or one `error:` line (exit != 0; a value the parser rejects names the flag, exit
2); never an exception escaping `main`, never the parser's framed usage box.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path

import pytest

from bench.config import ThroughputConfig
from pipeline.config import BuildConfig
from trainer_low_mem.config import JobConfig

NUMBERS = ["0", "-1", str(10**30), "nan", "inf", "-inf", "abc", ""]
TEXT = ["", "abc", "0"]


def _flags(cls) -> list[tuple[str, object]]:
    """(flag name, annotation) of every field of `cls` and of its nested config dataclasses."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _flags(hint)
            continue
        name = f.name
        for meta in getattr(hint, "__metadata__", ()):
            name = getattr(meta, "name", None) or name
        out.append((name, hint))
    return out


def _values(hint, a_file: Path, a_dir: Path) -> list[str]:
    text = repr(hint)
    if "Path" in text:
        return ["", str(a_file), str(a_dir), str(a_dir / "missing" / "x")]
    if "bool" in text:
        return ["maybe", "", "true", "FALSE"]
    if "int" in text or "float" in text:
        return NUMBERS
    return TEXT


def _cases(cls, prefix: str, skip: set[str]) -> list[tuple[str, str, str]]:
    return [
        (prefix, name, value)
        for name, hint in _flags(cls)
        if name not in skip
        for value in _values(hint, Path("A_FILE"), Path("A_DIR"))
    ]


CASES = (
    _cases(JobConfig, "train", {"data"})
    + _cases(BuildConfig, "build", {"inputs"})
    + _cases(ThroughputConfig, "bench", {"data", "synthetic"})
)


def _argv(prefix: str, flag: str, value: str, tmp: Path) -> tuple[callable, list[str]]:
    value = value.replace("A_FILE", str(tmp / "a_file")).replace("A_DIR", str(tmp / "a_dir"))
    missing = str(tmp / "no-such-input")
    if prefix == "train":
        from trainer_low_mem.cli import main

        base = ["train", "--data", missing, "--output_dir", str(tmp / "out")]
    elif prefix == "build":
        from pipeline.__main__ import main

        base = ["build", missing, "--out", str(tmp / "ds")]
    else:
        from bench.__main__ import main

        base = ["throughput", "--data", missing, "--cache_dir", str(tmp / "cache")]
    return main, [*base, f"--{flag}", value]


@pytest.mark.parametrize(
    "prefix, flag, value", CASES, ids=[f"{p}-{f}-{v or 'empty'}" for p, f, v in CASES]
)
def test_flag_boundary_value_is_a_clean_stop(tmp_path, monkeypatch, capsys, prefix, flag, value):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_dir").mkdir()
    main, argv = _argv(prefix, flag, value, tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if code != 0:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("flag", ["lr", "max_grad_norm", "weight_decay", "min_lr_ratio"])
def test_non_finite_optimizer_flags_are_refused(capsys, flag, value):
    from trainer_low_mem.cli import main

    assert main(["train", f"--{flag}", value]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^error: --{flag} must be", err, re.M), err
    assert not math.isfinite(float(value))


def test_bench_report_paths_are_checked_before_the_run(tmp_path, capsys):
    from bench.__main__ import main

    (tmp_path / "a_dir").mkdir()
    argv = [
        "throughput",
        "--data",
        str(tmp_path / "no-such-input"),
        "--json",
        str(tmp_path / "a_dir"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: --json {tmp_path / 'a_dir'} is a folder; give a file path" in err, err


def test_second_trainer_on_one_output_dir_fails_at_once(tmp_path, capsys):
    from trainer_low_mem.cli import main
    from trainer_low_mem.distributed import RankContext
    from trainer_low_mem.run_lock import lock_output_dir

    out = tmp_path / "out"
    lock = lock_output_dir(out, RankContext.single())
    try:
        assert main(["train", "--data", str(tmp_path / "nope"), "--output_dir", str(out)]) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert f"error: --output_dir {out} is in use by another process" in err, err


def test_output_dir_that_is_a_file_fails_before_any_step(tmp_path, capsys):
    from trainer_low_mem.cli import main

    (tmp_path / "f").write_text("x")
    assert (
        main(["train", "--data", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "f")]) == 2
    )
    assert "error: --output_dir" in capsys.readouterr().err
