"""The exit codes: every error class's `exit_code` is one the training entry point documents,
in its docstring and in docs/TROUBLESHOOTING.md's table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from lowmem_core.errors import LowMemError

REPO = Path(__file__).resolve().parents[2]


def error_exit_codes() -> dict[str, int]:
    """Every LowMemError class (the base included) -> its exit code."""
    found, todo = {}, [LowMemError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls.exit_code
        todo.extend(cls.__subclasses__())
    return found


def test_the_entry_point_documents_every_error_exit_code():
    doc = ast.get_docstring(ast.parse((REPO / "train_low_mem.py").read_text()))
    listed = re.search(r"Exit codes: (.*)", doc, re.DOTALL).group(1)
    documented = {int(code) for code in re.findall(r"\b(\d+) [a-z]", listed)}
    table = (REPO / "docs" / "TROUBLESHOOTING.md").read_text().split("## Exit codes")[1]
    in_table = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    codes = error_exit_codes()
    assert codes["DivergenceError"] == 4
    for name, code in codes.items():
        assert code in documented, f"{name} exits {code}, missing from train_low_mem.py"
        assert code in in_table, f"{name} exits {code}, missing from docs/TROUBLESHOOTING.md"
    assert documented == in_table
