"""Byte sizes as users write them on command lines: one parser for every flag that takes a size.

Units follow the usual convention, as in accelerate: GB = 10^9 bytes, GiB = 2^30 bytes.
"""

from __future__ import annotations

import math

from lowmem_core.errors import ConfigError

# Longest suffix first, so "GiB" is never read as "B". TB/TiB are scaled to GB/GiB, the largest
# units accelerate reads.
_UNITS = ("KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB")
_SCALED = {"TiB": (1024, "GiB"), "TB": (1000, "GB")}
_HINT = "write a byte count or a number with a unit: 24GB (10^9 bytes), 16GiB (2^30), 512MB, 64KiB"


def parse_byte_size(text: str | int, flag: str | None = None) -> int:
    """'24GB' -> 24_000_000_000, '16GiB' -> 17_179_869_184, '1048576' or 1048576 -> 1_048_576.

    Units are case-insensitive (accelerate would read a lower-case 'b' as bits). Anything that is
    not a positive, finite size raises ConfigError naming `flag` when given.
    """
    from accelerate.utils import convert_file_size_to_int  # deferred: accelerate imports torch

    where = f"{flag}: " if flag else ""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConfigError(f"{where}expected a size in bytes, got {text!r}; {_HINT}")
    if isinstance(text, int):
        size = text
    elif text.strip().isdigit():
        size = int(text.strip())
    else:
        stripped = text.strip()
        unit = next((u for u in _UNITS if stripped.upper().endswith(u.upper())), None)
        number = stripped[: -len(unit)].strip() if unit else ""
        try:
            value = float(number)
        except ValueError:
            raise ConfigError(f"{where}cannot read {text!r} as a size in bytes; {_HINT}") from None
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}size {text!r} must be a finite number of bytes above 0")
        factor, unit = _SCALED.get(unit, (1, unit))
        size = convert_file_size_to_int(f"{value * factor!r}{unit}")
    if size <= 0:
        raise ConfigError(f"{where}size {text!r} must be greater than 0 bytes")
    return size
