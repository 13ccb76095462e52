"""Command-line flags parsed by tyro, with a bad flag reported as one line.

tyro reports a parse error as a framed box of a dozen lines (the error, the flag's help, a
pointer to --help). Our CLIs promise one line naming the problem and the fix, so the box is
captured and its message re-raised as a ConfigError; `--help` output passes through untouched.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Callable
from typing import TypeVar

from lowmem_core.errors import ConfigError

T = TypeVar("T")
# The box is drawn with Unicode frames on a terminal and ASCII ones (+, -, |) elsewhere.
_RULE = re.compile(r"^[\s│|╭╰╮╯+─-]*$")
_SIDES = re.compile(r"^\s*[│|]\s?|\s?[│|]\s*$")
_HELP = re.compile(r"For full helptext, (?:see|run) (.+?--help)")
_TITLE = re.compile(r"^\s*[╭+][─-]+\s*(.*?)\s*[─-]*[╮+]\s*$")


def parse_flags(parse: Callable[[], T], argv: list[str], prog: str) -> T:
    """`parse()` (a tyro call over `argv`); its parse errors become one-line ConfigErrors."""
    if "-h" in argv or "--help" in argv:
        return parse()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            return parse()
    except SystemExit as exc:
        if exc.code in (0, None):
            sys.stdout.write(captured.getvalue())
            raise
        box = captured.getvalue()
        where = _HELP.search(box)
        help_command = where.group(1) if where else f"{prog} --help"
        if help_command == f"{prog} --help" and argv and not argv[0].startswith("-"):
            help_command = f"{prog} {argv[0]} --help"  # the subcommand's own flags
        raise ConfigError(f"{one_line(box)}; see `{help_command}`") from None


def one_line(box: str) -> str:
    """The message of tyro's error box: the block after its title, up to the next rule."""
    title, blocks, block = "", [], []
    for raw in box.splitlines():
        heading = _TITLE.match(raw)
        if heading and not title and not blocks and not block:
            title = heading.group(1)  # a framed title: the first block is the message
            continue
        if _RULE.match(raw):
            if block:
                blocks.append(block)
            block = []
            continue
        line = _SIDES.sub("", raw).strip()
        if not line.startswith("For full helptext"):
            block.append(line)
    if block:
        blocks.append(block)
    if not title and len(blocks) > 1:  # an unframed title is a block of its own
        title, blocks = " ".join(blocks[0]), blocks[1:]
    text = " ".join(blocks[0]) if blocks else title or "invalid command-line flags"
    return text.rstrip(".")
