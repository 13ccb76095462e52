"""The bad-input table: every CLI turns a user mistake into one line that names it and its fix.

Each case runs a real command in a subprocess inside its own folder and asserts:
- a non-zero exit code;
- exactly one line starting with `error: ` on stderr, it is the last line, and it matches the
  case's `problem` and `fix` patterns;
- no Python traceback anywhere in the output;
- nothing in the folder was created, changed or removed (a before/after snapshot of every file).

The `pipeline build` and `pipeline plan` cases are fast; the `bench` and `train` ones pay for
importing torch in a fresh interpreter and are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TRAIN = str(REPO / "train_low_mem.py")


# ----------------------------------------------------------------------------- inputs a case needs


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _jsonl(path: Path, rows: list[dict]) -> None:
    _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _good_text(d: Path) -> None:
    _write(
        d / "good.txt", "The first document.\n\nThe second one, a little longer than the first.\n"
    )


def _existing_dataset(d: Path, name: str = "tokens") -> None:
    """A complete dataset at d/name, built from d/good.txt."""
    _good_text(d)
    subprocess.run(
        [PY, "-m", "pipeline", "build", str(d / "good.txt"), "--out", str(d / name)],
        check=True,
        capture_output=True,
        cwd=d,
        timeout=120,
    )


def _sample_dataset(d: Path) -> None:
    """The sample corpus built at d/tokens (enough tokens for a few steps of the tiny model)."""
    from pipeline.build import build_dataset
    from pipeline.config import BuildConfig
    from pipeline.sample_corpus import write_sample_corpus

    files = write_sample_corpus(d / "corpus", num_docs=300)
    build_dataset(BuildConfig(inputs=[files["txt"]], out=d / "tokens"), progress=False)


def _truncated_dataset(d: Path) -> None:
    _existing_dataset(d)
    shard = d / "tokens" / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-64])


def _vocab_beyond_dtype(d: Path) -> None:
    """A dataset whose index.json claims 70000 ids while its tokens are uint16."""
    _existing_dataset(d)
    index = json.loads((d / "tokens" / "index.json").read_text())
    index["vocab_size"] = 70000
    (d / "tokens" / "index.json").write_text(json.dumps(index))


def _trained_state(d: Path) -> None:
    """A finished 1-step tiny run in d/run (so train_latest_state exists)."""
    _sample_dataset(d)
    subprocess.run(
        [PY, TRAIN, "train", *_TINY, "--max_steps", "1", "--output_dir", str(d / "run")],
        check=True,
        capture_output=True,
        cwd=d,
        timeout=300,
    )


_TINY = [
    "--data",
    "tokens",
    "--model_preset",
    "tiny",
    "--max_seq_len",
    "64",
    "--global_batch",
    "4",
    "--progress_bar",
    "False",
]


@dataclass(frozen=True)
class Case:
    """One kind of bad input: the command, what it needs on disk, and what the error must say."""

    id: str
    argv: list[str]
    problem: str  # regex the error line must match: names what is wrong
    fix: str  # regex the error line must match: says what to do
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    slow: bool = False


def _build(*args: str) -> list[str]:
    return [PY, "-m", "pipeline", "build", *args]


def _plan(*args: str) -> list[str]:
    return [PY, "-m", "pipeline", "plan", *args]


def _bench(*args: str) -> list[str]:
    return [PY, "-m", "bench", "throughput", "--no-progress", *args]


def _train(*args: str) -> list[str]:
    return [PY, TRAIN, "train", *args]


CASES = [
    # -- pipeline build ---------------------------------------------------------------------
    Case(
        "build-missing-input",
        _build("nope.txt", "--out", "tokens"),
        problem=r"nope\.txt does not exist",
        fix=r"check the path",
    ),
    Case(
        "build-empty-file",
        _build("empty.txt", "--out", "tokens"),
        problem=r"empty\.txt is empty",
        fix=r"remove it",
        setup=lambda d: _write(d / "empty.txt", b""),
    ),
    Case(
        "build-binary-as-text",
        _build("garbage.txt", "--out", "tokens"),
        problem=r"garbage\.txt is not UTF-8 text",
        fix=r"convert it to UTF-8",
        setup=lambda d: _write(d / "garbage.txt", bytes(range(128, 256)) * 64),
    ),
    Case(
        "build-nul-bytes-as-text",
        _build("nul.txt", "--out", "tokens"),
        problem=r"nul\.txt contains NUL bytes",
        fix=r"pass a text file",
        setup=lambda d: _write(d / "nul.txt", b"text\x00with\x00nul\n" * 100),
    ),
    Case(
        "build-wrong-jsonl-field",
        _build("docs.jsonl", "--out", "tokens"),
        problem=r"docs\.jsonl has no field 'text' \(fields: body\)",
        fix=r"--text-field",
        setup=lambda d: _jsonl(d / "docs.jsonl", [{"body": "hello"}, {"body": "world"}]),
    ),
    Case(
        "build-malformed-jsonl",
        _build("broken.jsonl", "--out", "tokens"),
        problem=r"broken\.jsonl is not valid JSON Lines",
        fix=r"fix or remove the bad line",
        setup=lambda d: _write(
            d / "broken.jsonl", '{"text": "fine"}\n{"text": "no closing brace"\n'
        ),
    ),
    Case(
        "build-non-integer-token-column",
        _build("tok.jsonl", "--out", "tokens", "--text-field", "input_ids"),
        problem=r"field 'input_ids' in tok\.jsonl holds list<item: string>",
        fix=r"--text-field",
        setup=lambda d: _jsonl(d / "tok.jsonl", [{"input_ids": ["a", "b"]}, {"input_ids": ["c"]}]),
    ),
    Case(
        "build-token-ids-beyond-vocab",
        _build("ids.jsonl", "--out", "tokens", "--text-field", "input_ids"),
        problem=(
            r"token ids in ids\.jsonl range over \[3, 70000\] but the tokenizer's vocabulary "
            r"has 259 ids"
        ),
        fix=r"pass the --tokenizer that produced them",
        setup=lambda d: _jsonl(d / "ids.jsonl", [{"input_ids": [3, 70000]}]),
    ),
    Case(
        "build-zero-threads",
        _build("good.txt", "--out", "tokens", "--num-proc", "0"),
        problem=r"--num-proc must be >= 1, got 0",
        fix=r">= 1",
        setup=_good_text,
    ),
    Case(
        "build-negative-shard-size",
        _build("good.txt", "--out", "tokens", "--max-shard-tokens", "-5"),
        problem=r"--max-shard-tokens must be >= 1, got -5",
        fix=r">= 1",
        setup=_good_text,
    ),
    Case(
        "build-output-exists",
        _build("good.txt", "--out", "tokens"),
        problem=r"output tokens already exists",
        fix=r"pass --overwrite",
        setup=_existing_dataset,
    ),
    Case(
        "build-output-parent-is-a-file",
        _build("good.txt", "--out", "afile/tokens"),
        problem=r"cannot create the output's parent folder afile",
        fix=r"choose another --out",
        setup=lambda d: (_good_text(d), _write(d / "afile", "not a folder")),
    ),
    Case(
        "build-unknown-input-type",
        _build("table.csv", "--out", "tokens"),
        problem=r"table\.csv: unknown input type \.csv",
        fix=r"inputs are \.txt, \.jsonl, \.json, \.parquet",
        setup=lambda d: _write(d / "table.csv", "a,b\n1,2\n"),
    ),
    Case(
        "build-corrupt-parquet",
        _build("bad.parquet", "--out", "tokens"),
        problem=r"bad\.parquet is not a readable Parquet file",
        fix=r"rewrite it or pass another input",
        setup=lambda d: _write(d / "bad.parquet", b"PAR1 this is not parquet"),
    ),
    Case(
        "build-missing-tokenizer-file",
        _build("good.txt", "--out", "tokens", "--tokenizer", "tok.json"),
        problem=r"tok\.json",
        fix=r"byte|tokenizer\.json",
        setup=_good_text,
    ),
    Case(
        "build-tokenizer-folder-without-tokenizer-json",
        _build("good.txt", "--out", "tokens", "--tokenizer", "model"),
        problem=r"--tokenizer model is a folder without tokenizer\.json \(it holds: config\.json\)",
        fix=r"pass a folder saved by `transformers`",
        setup=lambda d: (_good_text(d), _write(d / "model" / "config.json", "{}")),
    ),
    Case(
        "build-overwrite-a-user-folder",
        _build("good.txt", "--out", "notes", "--overwrite"),
        problem=(
            r"output notes already exists and is not a dataset built by `pipeline build` "
            r"\(it holds todo\.md\)"
        ),
        fix=r"choose another --out$",
        setup=lambda d: (_good_text(d), _write(d / "notes" / "todo.md", "mine")),
    ),
    Case(
        "build-overwrite-the-folder-holding-the-input",
        _build("tokens/good.txt", "--out", "tokens", "--overwrite"),
        problem=r"output tokens holds the input tokens/good\.txt",
        fix=r"choose another --out",
        setup=lambda d: (_existing_dataset(d), _good_text(d / "tokens")),
    ),
    Case(
        "build-out-is-the-current-folder",
        _build("good.txt", "--out", ".", "--overwrite"),
        problem=r"--out \. is the current folder or holds it",
        fix=r"give a new folder, e\.g\. --out tokens",
        setup=_good_text,
    ),
    Case(
        "build-garbage-tokenizer-file",
        _build("good.txt", "--out", "tokens", "--tokenizer", "tok.json"),
        problem=r"tok\.json is not a valid tokenizer\.json",
        fix=r"pass a file saved by `tokenizers`",
        setup=lambda d: (_good_text(d), _write(d / "tok.json", "not json")),
    ),
    # -- pipeline plan ----------------------------------------------------------------------
    Case(
        "plan-unknown-preset",
        _plan("--model_preset", "gigantic"),
        problem=r"unknown model preset 'gigantic'",
        fix=r"choose one of tiny, small",
    ),
    Case(
        "plan-zero-global-batch",
        _plan("--model_preset", "tiny", "--global_batch", "0"),
        problem=r"--global_batch must be a finite number greater than 0, got 0",
        fix=r"greater than 0",
    ),
    Case(
        "plan-world-size-does-not-divide",
        _plan("--model_preset", "tiny", "--global_batch", "32", "--world_size", "3"),
        problem=r"global batch 32 is not divisible by world size 3",
        fix=r"use a global batch of 30 or 33",
    ),
    Case(
        "plan-negative-host-ram",
        _plan("--model_preset", "tiny", "--host_ram_limit=-4GiB"),
        problem=r"--host_ram_limit: size '-4GiB' must be a finite number of bytes above 0",
        fix=r"above 0",
    ),
    Case(
        "plan-unreadable-device-budget",
        _plan("--model_preset", "tiny", "--device_budget", "20 gigs"),
        problem=r"--device_budget: cannot read '20 gigs' as a size in bytes",
        fix=r"24GB|16GiB",
    ),
    Case(
        "plan-unknown-zero-stage",
        _plan("--model_preset", "tiny", "--zero_stage", "4"),
        problem=r"ZeRO stage 4 is not a ZeRO stage \(0, 1, 2 or 3\)",
        fix=r"use --zero_stage 2",
    ),
    Case(
        "plan-missing-dataset",
        _plan("--model_preset", "tiny", "--data", "missing_ds"),
        problem=r"dataset missing_ds does not exist",
        fix=r"pipeline build",
    ),
    Case(
        "plan-device-budget-too-small",
        _plan("--model_preset", "small", "--device_budget", "100MiB"),
        problem=r"no plan fits \(GPU at micro-batch 1: peak [0-9.]+ GiB > [0-9.]+ MiB",
        fix=r"Try: --offload_optimizer=True",
    ),
    # -- bench throughput -------------------------------------------------------------------
    Case(
        "bench-missing-dataset",
        _bench("--data", "missing_ds", "--stage", "loader", "--quick"),
        problem=r"missing_ds does not exist",
        fix=r"pipeline build",
        slow=True,
    ),
    Case(
        "bench-zero-batch",
        _bench("--synthetic", "100", "--batch-size", "0"),
        problem=r"--batch-size must be >= 1, got 0",
        fix=r">= 1",
        slow=True,
    ),
    Case(
        "bench-not-a-dataset",
        _bench("--data", "plain_dir", "--stage", "loader", "--quick"),
        problem=r"plain_dir is not a dataset",
        fix=r"pipeline build",
        setup=lambda d: _write(d / "plain_dir" / "notes.md", "just notes"),
        slow=True,
    ),
    Case(
        "bench-vocab-does-not-fit-dtype",
        _bench("--data", "tokens", "--stage", "loader", "--quick"),
        problem=r"tokens/index\.json: (a )?vocabulary of 70000 ids does not fit dtype uint16",
        fix=r"rebuild it with",
        setup=_vocab_beyond_dtype,
        slow=True,
    ),
    # -- train ------------------------------------------------------------------------------
    Case(
        "train-missing-dataset",
        _train("--data", "missing_ds", "--model_preset", "tiny"),
        problem=r"missing_ds does not exist",
        fix=r"pipeline build",
        slow=True,
    ),
    Case(
        "train-truncated-dataset",
        _train("--data", "tokens", "--model_preset", "tiny"),
        problem=r"shard-00000\.arrow has \d+ bytes but index\.json says \d+",
        fix=r"rebuild it",
        setup=_truncated_dataset,
        slow=True,
    ),
    Case(
        "train-unknown-preset",
        _train("--data", "tokens", "--model_preset", "gigantic"),
        problem=r"gigantic",
        fix=r"tiny",
        setup=_existing_dataset,
        slow=True,
    ),
    Case(
        "train-zero-seq-len",
        _train("--data", "tokens", "--model_preset", "tiny", "--max_seq_len", "0"),
        problem=r"--max_seq_len must be (a finite number )?greater than 0, got 0",
        fix=r"greater than 0",
        slow=True,
    ),
    Case(
        "train-negative-save-every",
        _train("--data", "tokens", "--save_every", "-1"),
        problem=r"--save_every must be 0 .* got -1",
        fix=r"0 \(only at the end\) or greater",
        slow=True,
    ),
    Case(
        "train-bad-host-ram-limit",
        _train("--data", "tokens", "--host_ram_limit", "lots"),
        problem=r"cannot read 'lots' as a size in bytes",
        fix=r"24GB|16GiB",
        slow=True,
    ),
    Case(
        "train-seq-len-above-model",
        _train(*_TINY[:4], "--max_seq_len", "1000000"),
        problem=r"1000000",
        fix=r"--max_seq_len",
        setup=_existing_dataset,
        slow=True,
    ),
    Case(
        "train-resume-without-state",
        _train(*_TINY, "--is_keep_training=True", "--output_dir", "run"),
        problem=r"run/train_latest_state does not exist",
        fix=r"start without it",
        setup=_sample_dataset,
        slow=True,
    ),
    Case(
        "train-state-exists-without-resume",
        _train(*_TINY, "--max_steps", "1", "--output_dir", "run"),
        problem=r"run/train_latest_state already exists",
        fix=r"--is_keep_training=True",
        setup=_trained_state,
        slow=True,
    ),
    # What `accelerate launch` / torchrun export to each rank, set directly: the checks run before
    # any process group exists, and the launcher's own failure report stays out of the output.
    Case(
        "train-world-size-does-not-divide",
        _train(*_TINY),
        problem=r"global batch 4 is not divisible by world size 3",
        fix=r"use a global batch of 3 or 6",
        setup=_sample_dataset,
        env={"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"},
        slow=True,
    ),
    Case(
        "train-malformed-deepspeed-config",
        _train(*_TINY),
        problem=r"DeepSpeed config \S*ds\.json is not valid JSON",
        fix=r"fix the file",
        setup=lambda d: (
            _sample_dataset(d),
            _write(d / "ds.json", '{"zero_optimization": {"stage": 2,'),
        ),
        env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"},
        slow=True,
    ),
    Case(
        "train-deepspeed-config-bad-zero-stage",
        _train(*_TINY),
        problem=r"ZeRO stage 7 is not a ZeRO stage \(0, 1, 2 or 3\)",
        fix=r"use zero_optimization\.stage: 2 in the DeepSpeed config",
        setup=lambda d: (
            _sample_dataset(d),
            _write(d / "ds.json", '{"zero_optimization": {"stage": 7}}'),
        ),
        env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"},
        slow=True,
    ),
]


# ----------------------------------------------------------------------------- the check


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under root: relative path -> (size, sha256) ('dir' for folders)."""
    out: dict[str, tuple[int, str]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = (0, "dir")
        else:
            out[rel] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def run_case(case: Case, workdir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **case.env}
    env.pop("LOWMEM_DEBUG", None)
    return subprocess.run(
        case.argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(case: Case, proc: subprocess.CompletedProcess) -> str:
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, f"{case.id}: traceback in the output:\n{output}"
    assert proc.returncode != 0, f"{case.id}: exit code 0\n{output}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, (
        f"{case.id}: expected one 'error: ' line on stderr, got {len(errors)}:\n{proc.stderr}"
    )
    assert lines[-1] == errors[0], (
        f"{case.id}: the error is not the last line on stderr:\n{proc.stderr}"
    )
    line = errors[0]
    assert re.search(case.problem, line), (
        f"{case.id}: {line!r} does not name the problem /{case.problem}/"
    )
    assert re.search(case.fix, line), f"{case.id}: {line!r} does not say the fix /{case.fix}/"
    return line


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]
)
@pytest.mark.timeout(600)
def test_bad_input_gives_one_line_error_and_changes_nothing(case: Case, tmp_path: Path):
    if case.setup is not None:
        case.setup(tmp_path)
    before = snapshot(tmp_path)
    proc = run_case(case, tmp_path)
    assert_one_line_error(case, proc)
    assert snapshot(tmp_path) == before, f"{case.id}: files changed"


def test_table_covers_every_cli_and_at_least_15_kinds():
    clis = {c.id.split("-")[0] for c in CASES}
    assert clis == {"build", "plan", "bench", "train"}
    assert len({c.id for c in CASES}) == len(CASES) >= 15


def test_debug_flag_shows_the_traceback(tmp_path: Path):
    proc = subprocess.run(
        _build("nope.txt", "--out", "tokens", "--debug"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert (
        proc.stderr.rstrip().splitlines()[-1]
        == "error: input nope.txt does not exist; check the path"
    )
