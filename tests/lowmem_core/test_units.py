"""Byte sizes as flags take them: decimal and binary units, plain counts, one-line refusals."""

from __future__ import annotations

import pytest

from lowmem_core.errors import ConfigError
from lowmem_core.units import parse_byte_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GB", 24 * 10**9),
        ("16GiB", 16 * 2**30),
        ("512 MB", 512 * 10**6),
        ("64KiB", 64 * 2**10),
        ("3KB", 3000),
        ("2MiB", 2 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("30gb", 30 * 10**9),  # case-insensitive: never read as bits
        ("2TB", 2 * 10**12),
        ("1TiB", 2**40),
        (" 1048576 ", 1048576),
        (1048576, 1048576),
    ],
)
def test_sizes_read_in_bytes(text, expected):
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "lots", "24 parsecs", "GB", "-5GB", "0", 0, -1, "0GB", "nanGB", "infGiB", True, 2.5],
)
def test_anything_but_a_positive_finite_size_is_refused(text):
    with pytest.raises(ConfigError) as info:
        parse_byte_size(text)
    assert "\n" not in str(info.value)


def test_the_refusal_names_the_flag_and_the_value():
    with pytest.raises(ConfigError) as info:
        parse_byte_size("plenty", flag="--host_ram_limit")
    message = str(info.value)
    assert "--host_ram_limit" in message and "'plenty'" in message and "GiB" in message
