"""Command-line flags parsed by tyro: booleans in either form, and a bad flag as one line.

A boolean is a tyro flag pair (`--json` / `--no-json`, also spelt `--no_json`), while the seed's
scripts give booleans a value (`--is_keep_training=True`, `--auto_plan False`). Both are accepted:
a boolean flag followed by true or false (any case, after `=` or as the next word) is rewritten
to `--flag` or `--no-flag` before tyro reads the command line. A `bool | None` field stays a value
for tyro (None means "decide for me"), so there the rewrite goes the other way: `--flag` alone is
`--flag True` and `--no-flag` is `--flag False`.

tyro reports a parse error as a framed box of a dozen lines (the error, the flag's help, a
pointer to --help). Our CLIs promise one line naming the problem and the fix, so the box is
captured and its message re-raised as a ConfigError; `--help` output passes through untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import sys
import typing
from collections.abc import Callable, Mapping
from typing import TypeVar

from lowmem_core.errors import ConfigError

T = TypeVar("T")
# The box is drawn with Unicode frames on a terminal and ASCII ones (+, -, |) elsewhere.
_RULE = re.compile(r"^[\s│|╭╰╮╯+─-]*$")
_SIDES = re.compile(r"^\s*[│|]\s?|\s?[│|]\s*$")
_HELP = re.compile(r"For full helptext, (?:see|run) (.+?--help)")
_TITLE = re.compile(r"^\s*[╭+][─-]+\s*(.*?)\s*[─-]*[╮+]\s*$")
# The values a boolean flag may be given (any case), as tyro's own bool parser spells them.
_BOOL_WORDS = {"true": "True", "false": "False"}
_OPTIONAL_BOOL_WORDS = {**_BOOL_WORDS, "none": "None"}


def parse_flags(
    parse: Callable[[list[str]], T],
    argv: list[str],
    prog: str,
    config: type | Mapping[str, type],
) -> T:
    """`parse(args)`, a tyro call, over `argv` with its booleans in tyro's form; `config` is the
    dataclass parsed, or the subcommands' by name. Parse errors become one-line ConfigErrors."""
    if "-h" in argv or "--help" in argv:
        return parse(argv)
    try:
        args = _tyro_argv(argv, config)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; see `{_help_command('', argv, prog)}`") from None
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            return parse(args)
    except SystemExit as exc:
        if exc.code in (0, None):
            sys.stdout.write(captured.getvalue())
            raise
        box = captured.getvalue()
        raise ConfigError(f"{one_line(box)}; see `{_help_command(box, argv, prog)}`") from None


def _help_command(box: str, argv: list[str], prog: str) -> str:
    where = _HELP.search(box)
    help_command = where.group(1) if where else f"{prog} --help"
    if help_command == f"{prog} --help" and argv and not argv[0].startswith("-"):
        help_command = f"{prog} {argv[0]} --help"  # the subcommand's own flags
    return help_command


def _tyro_argv(argv: list[str], config: type | Mapping[str, type]) -> list[str]:
    if not isinstance(config, Mapping):
        return _booleans_for_tyro(argv, config)
    if not argv or argv[0] not in config:
        return argv  # tyro names the missing or unknown subcommand
    return [argv[0], *_booleans_for_tyro(argv[1:], config[argv[0]])]


def _booleans_for_tyro(argv: list[str], config: type) -> list[str]:
    """`argv` (the flags of the dataclass `config`) with each boolean in the form tyro reads."""
    booleans = _boolean_fields(config)
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":  # the rest is positional
            return out + argv[i - 1 :]
        flag, has_value, value = token.partition("=")
        key = flag[2:].replace("-", "_")
        if not flag.startswith("--"):
            out.append(token)
        elif key in booleans:
            words = _OPTIONAL_BOOL_WORDS if booleans[key] else _BOOL_WORDS
            if not has_value and i < len(argv) and argv[i].lower() in words:
                value, has_value, i = argv[i], True, i + 1
            out += _rewrite(flag, value if has_value else None, booleans[key])
        elif key.startswith("no_") and booleans.get(key[3:]) and not has_value:
            out += [f"--{flag[5:]}", "False"]  # the negation of a `bool | None` field
        else:
            out.append(token)
    return out


def _rewrite(flag: str, value: str | None, optional: bool) -> list[str]:
    """`flag` given `value` (None: nothing) as tyro reads it: a flag pair, or `bool | None`'s
    value."""
    words = _OPTIONAL_BOOL_WORDS if optional else _BOOL_WORDS
    if value is None:
        return [flag, "True"] if optional else [flag]
    if value.lower() not in words:
        raise ConfigError(
            f"{flag} takes {', '.join(words)} or no value (alone it means true), got {value!r}"
        )
    word = words[value.lower()]
    if optional:
        return [flag, word]
    return [flag] if word == "True" else [f"--no-{flag[2:]}"]


def _boolean_fields(cls: type) -> dict[str, bool]:
    """Flag name (with underscores) -> whether it is `bool | None`, for each boolean of `cls` and
    its aliases; nested dataclasses add theirs unprefixed, as tyro.conf.OmitArgPrefixes names
    them."""
    out = {}
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        hint, names = hints[f.name], [f.name]
        if typing.get_origin(hint) is typing.Annotated:
            for meta in hint.__metadata__:  # tyro.conf.arg(name=..., aliases=...)
                names[0] = getattr(meta, "name", None) or names[0]
                names += getattr(meta, "aliases", None) or ()
            hint = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(hint):
            out.update(_boolean_fields(hint))
        elif hint is bool or set(typing.get_args(hint)) == {bool, type(None)}:
            out.update({name.lstrip("-").replace("-", "_"): hint is not bool for name in names})
    return out


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
