"""Bytes of bitsandbytes' AdamW8bit states, counted as its `init_state` allocates them.

A parameter of at least `MIN_8BIT_SIZE` elements gets two uint8 moments (1 B per element each)
and two fp32 absolute maxima per block of 256 elements; a smaller one keeps two fp32 moments
(8 B per element). Two 256-entry fp32 quantisation maps (signed and unsigned) are shared by every
8-bit parameter on a device. The trainer builds the optimizer with the same `MIN_8BIT_SIZE`.
"""

from __future__ import annotations

from collections.abc import Iterable

MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors stay 32-bit
BLOCK_ELEMENTS = 256  # elements per absmax block of the 8-bit states
QMAP_BYTES = 2 * 256 * 4  # the signed and unsigned dynamic maps, fp32


def adamw_8bit_state_bytes(numels: Iterable[int], round_to: int = 1) -> int:
    """State bytes of AdamW8bit over parameters of these element counts, each tensor's bytes
    rounded up to `round_to` (the CUDA caching allocator's block)."""

    def rounded(nbytes: int) -> int:
        return -(-nbytes // round_to) * round_to

    total, eight_bit = 0, False
    for n in numels:
        if n < MIN_8BIT_SIZE:
            total += 2 * rounded(4 * n)
        else:
            blocks = -(-n // BLOCK_ELEMENTS)
            total += 2 * rounded(n) + 2 * rounded(4 * blocks)
            eight_bit = True
    return total + (2 * rounded(QMAP_BYTES // 2) if eight_bit else 0)
