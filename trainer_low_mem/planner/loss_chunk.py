"""How many labelled positions the chunked loss takes at a time: `choose_loss_chunk`.

The loss (trainer_low_mem/loss.py) holds one chunk's logits at a time. Per position that is at
most two fp32 rows of the vocabulary (the logits, turned into softmax and gradient in place, and
a softcapped head's tanh beside them) and, under 16-bit autocast, one 16-bit row (the matmul's
output, later the gradient fed back to the matmuls). The chunk is the most positions whose rows
stay under min(a share of the device budget, a cap), so no [tokens, vocab] fp32 tensor above
that bound exists whatever the row length; at least a floor of positions (the head's matmul stays
efficient), a multiple of 8 (tensor-core shapes), and at most a ceiling past which a larger
chunk saves no time.
"""

from __future__ import annotations

from lowmem_core.errors import ConfigError
from trainer_low_mem.planner.explain import Reason

LOSS_CHUNK_CAP_BYTES = 256 << 20
LOSS_CHUNK_BUDGET_FRAC = 1 / 32
MIN_LOSS_CHUNK_TOKENS = 128
MAX_LOSS_CHUNK_TOKENS = 4096
LOSS_CHUNK_MULTIPLE = 8
FP32_ROWS_PER_POSITION = 2
_HALF_BYTES = {"bf16": 2, "fp16": 2}


def loss_chunk_bytes_per_token(vocab_size: int, mixed_precision: str | None) -> int:
    """The loss kernel's [chunk, vocab] buffers per position of a chunk, at most."""
    return vocab_size * (4 * FP32_ROWS_PER_POSITION + _HALF_BYTES.get(mixed_precision or "", 0))


def choose_loss_chunk(
    *, vocab_size: int, budget_bytes: int, mixed_precision: str | None, budget_why: str
) -> Reason:
    """The `loss_chunk_tokens` reason: its value is the chunk in positions (module docstring).

    `budget_bytes`: the rank's device budget (training in host RAM: its share of host RAM);
    `budget_why` says where it came from.
    """
    if vocab_size <= 0 or budget_bytes <= 0:
        raise ConfigError(
            f"the loss chunk needs a positive vocabulary and budget, got {vocab_size} and "
            f"{budget_bytes} bytes"
        )
    per_token = loss_chunk_bytes_per_token(vocab_size, mixed_precision)
    bound = min(int(budget_bytes * LOSS_CHUNK_BUDGET_FRAC), LOSS_CHUNK_CAP_BYTES)
    fits = bound // per_token // LOSS_CHUNK_MULTIPLE * LOSS_CHUNK_MULTIPLE
    tokens = min(max(fits, MIN_LOSS_CHUNK_TOKENS), MAX_LOSS_CHUNK_TOKENS)
    numbers = {
        "tokens": tokens,
        "token_bytes": per_token,
        "vocab": vocab_size,
        "half": _HALF_BYTES.get(mixed_precision or "", 0),
        "budget_frac": LOSS_CHUNK_BUDGET_FRAC,
        "budget_bytes": budget_bytes,
        "budget_why": budget_why,
        "cap_bytes": LOSS_CHUNK_CAP_BYTES,
        "bound_bytes": bound,
        "chunk_bytes": tokens * per_token,
    }
    why = (
        "{tokens} labelled positions per chunk of the loss: {token_bytes} per position "
        "(vocabulary {vocab} x (2 x 4 + {half}) bytes: two fp32 rows, and a 16-bit one under "
        "autocast) under min({budget_frac} of the budget {budget_bytes} ({budget_why}), cap "
        "{cap_bytes}) = {bound_bytes}"
    )
    if fits < MIN_LOSS_CHUNK_TOKENS:
        numbers["floor"] = MIN_LOSS_CHUNK_TOKENS
        why += "; raised to the floor of {floor} positions"
    elif fits > MAX_LOSS_CHUNK_TOKENS:
        numbers["ceiling"] = MAX_LOSS_CHUNK_TOKENS
        why += "; capped at {ceiling} positions (a larger chunk saves no time)"
    why += ": at most {chunk_bytes} of logits, whatever the row length"
    return Reason("loss_chunk_tokens", tokens, why, numbers)
