"""The loss at labelled positions only: the same loss and gradients as cross-entropy over full
logits for every model kind, in fp32 and under bf16 autocast; rows without labels give 0; and a
loss step whose peak does not grow with the row length past the planner's chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode

from lowmem_core.format import IGNORE_INDEX
from trainer_low_mem.hf_model import HFCausalLM
from trainer_low_mem.loss import (
    LogitMap,
    chunked_cross_entropy,
    gathered_logits_cross_entropy,
    shift_labels,
)
from trainer_low_mem.model import MODEL_PRESETS, DecoderLM
from trainer_low_mem.planner.loss_chunk import choose_loss_chunk, loss_chunk_bytes_per_token
from trainer_low_mem.seq2seq import Seq2SeqLM

transformers = pytest.importorskip("transformers")

VOCAB = 96
FP32 = {"rtol": 1e-5, "atol": 1e-6}
BF16 = {"rtol": 2e-2, "atol": 2e-3}


def _prompt_heavy(ids: torch.Tensor) -> torch.Tensor:
    """Labels of chat rows: a long prompt, then the response; the last row is all prompt."""
    labels = ids.clone()
    labels[:, : ids.shape[1] * 3 // 5] = IGNORE_INDEX
    labels[-1] = IGNORE_INDEX
    return labels


def _ids(batch: int = 3, seq_len: int = 40, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def _full_logits_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference: torch's cross-entropy over every position's fp32 logits."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )


def _grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))


def _compare(model, batch: dict, reference_targets, tol: dict, autocast: bool = False) -> None:
    """The model's own loss and gradients against cross-entropy over its full logits."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        reference = _full_logits_loss(logits, reference_targets)
    counted = int((reference_targets != IGNORE_INDEX).sum())
    assert out.n_loss_tokens.item() == counted
    torch.testing.assert_close(out.loss, reference, **tol)
    for ours, theirs in zip(_grads(model, out.loss), _grads(model, reference), strict=True):
        torch.testing.assert_close(ours, theirs, **tol)


def _builtin(chunk: int) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(MODEL_PRESETS["tiny"], loss_chunk_tokens=chunk)


def _hf(config) -> HFCausalLM:
    torch.manual_seed(0)
    return HFCausalLM(transformers.AutoModelForCausalLM.from_config(config), loss_chunk_tokens=8)


def _hf_configs() -> dict:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return {
        "llama": (transformers.LlamaConfig(**common), None),
        "qwen2": (transformers.Qwen2Config(**common), None),
        "gemma2-softcap": (
            transformers.Gemma2Config(head_dim=8, final_logit_softcapping=3.0, **common),
            "final_logit_softcapping",
        ),
        "cohere-logit-scale": (transformers.CohereConfig(logit_scale=0.5, **common), "logit_scale"),
        "granite-logits-scaling": (
            transformers.GraniteConfig(logits_scaling=4.0, **common),
            "logits_scaling",
        ),
    }


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("scale", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_the_kernel_equals_cross_entropy_over_full_logits(chunk, scale, softcap):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, requires_grad=True)
    weight = torch.randn(37, 16, generator=g, requires_grad=True)
    bias = torch.randn(37, generator=g, requires_grad=True)
    targets = torch.randint(0, 37, (50,), generator=g)
    targets[:30] = IGNORE_INDEX
    loss, count = chunked_cross_entropy(
        hidden, weight, targets, chunk, bias=bias, logit_map=LogitMap(scale, softcap)
    )
    z = F.linear(hidden, weight, bias) * scale
    reference = F.cross_entropy(
        z if softcap is None else torch.tanh(z / softcap) * softcap, targets
    )
    assert count.item() == 20
    torch.testing.assert_close(loss, reference, **FP32)
    ours = torch.autograd.grad(loss, (hidden, weight, bias))
    theirs = torch.autograd.grad(reference, (hidden, weight, bias))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **FP32)
    assert torch.count_nonzero(ours[0][:30]) == 0  # unlabelled positions get no gradient


@pytest.mark.parametrize("autocast, tol", [(False, FP32), (True, BF16)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [7, 4096])
def test_builtin_decoder_loss_and_gradients_equal_full_logits(chunk, autocast, tol):
    ids = _ids(vocab=MODEL_PRESETS["tiny"].vocab_size)
    labels = _prompt_heavy(ids)
    batch = {"input_ids": ids, "labels": labels}
    _compare(_builtin(chunk), batch, shift_labels(labels), tol, autocast)


@pytest.mark.parametrize("autocast, tol", [(False, FP32), (True, BF16)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(_hf_configs()))
def test_hf_causal_lm_loss_and_gradients_equal_its_own_logits(name, autocast, tol):
    config, post_processing = _hf_configs()[name]
    model = _hf(config).eval()
    assert model.loss_path == "chunked", model.loss_path_reason
    if post_processing is not None:
        assert f"{post_processing} elementwise" in model.loss_path_reason
    ids = _ids()
    labels = _prompt_heavy(ids)
    _compare(model, {"input_ids": ids, "labels": labels}, shift_labels(labels), tol, autocast)


@pytest.mark.parametrize("autocast, tol", [(False, FP32), (True, BF16)], ids=["fp32", "bf16"])
def test_t5_loss_and_gradients_equal_full_logits(autocast, tol):
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    )
    config.decoder_start_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    model = Seq2SeqLM(transformers.T5ForConditionalGeneration(config), loss_chunk_tokens=8).eval()
    labels = _prompt_heavy(_ids(seq_len=20, seed=1))  # already aligned with the decoder
    batch = {
        "input_ids": _ids(seq_len=24, seed=2),
        "decoder_input_ids": _ids(seq_len=20, seed=3),
        "labels": labels,
    }
    _compare(model, batch, labels, tol, autocast)


def _all_prompt_models() -> dict:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    )
    config.decoder_start_token_id = config.pad_token_id = 0
    t5 = Seq2SeqLM(transformers.T5ForConditionalGeneration(config), loss_chunk_tokens=8)
    return {
        "builtin": (_builtin(8), {}),
        "llama": (_hf(_hf_configs()["llama"][0]), {}),
        "gemma2-softcap": (_hf(_hf_configs()["gemma2-softcap"][0]), {}),
        "t5": (t5, {"decoder_input_ids": _ids(seq_len=10, seed=4)}),
    }


@pytest.mark.parametrize("name", ["builtin", "llama", "gemma2-softcap", "t5"])
def test_rows_that_are_all_prompt_give_loss_zero_count_zero_and_no_nan(name):
    model, extra = _all_prompt_models()[name]
    ids = _ids(seq_len=10)
    out = model(input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX), **extra)
    assert (out.loss.item(), out.n_loss_tokens.item()) == (0.0, 0)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def _loss_step_peak_bytes(head: nn.Linear, seq_len: int, chunk: int) -> int:
    """MemTracker's peak over the loss and its backward on one row of `seq_len` hidden states,
    half of them labelled."""
    g = torch.Generator().manual_seed(seq_len)
    hidden = torch.randn(1, seq_len, head.in_features, generator=g, requires_grad=True)
    targets = torch.randint(0, head.out_features, (1, seq_len), generator=g)
    targets[:, : seq_len // 2] = IGNORE_INDEX
    tracker = MemTracker()
    tracker.track_external(head)
    with tracker:
        loss, _ = chunked_cross_entropy(hidden, head.weight, targets, chunk)
        loss.backward()
    head.weight.grad = None
    return sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())


def test_the_loss_step_peak_does_not_grow_with_the_row_past_the_planned_chunk():
    vocab, d = 152064, 32
    chunk = choose_loss_chunk(
        vocab_size=vocab, budget_bytes=16 << 30, mixed_precision="no", budget_why="a 16 GiB GPU"
    ).value
    assert chunk == 216  # 256 MiB / (152064 x 2 fp32 rows of 4 bytes), a multiple of 8
    torch.manual_seed(0)
    head = nn.Linear(d, vocab, bias=False)
    short, long = (_loss_step_peak_bytes(head, n, chunk) for n in (512, 2048))
    # Per position only the hidden-state terms: its gradient (zeros, then scaled in backward,
    # 2 x 4d bytes), the labelled index and the target (8 + 8 bytes).
    assert long - short <= (2048 - 512) * (2 * 4 * d + 16)
    # Static: the head, its fp32 gradient, the scaled copy backward returns and one chunk's
    # [V, d] product; then the chunk's buffers as the planner counts them.
    bound = 4 * vocab * d * 4 + chunk * loss_chunk_bytes_per_token(vocab, "no")
    assert long <= bound + 2048 * (2 * 4 * d + 16)
    assert long < 1024 * vocab * 4  # the fp32 logits of the 1024 labelled positions, for scale


def test_only_the_labelled_positions_reach_the_head():
    g = torch.Generator().manual_seed(0)
    n_positions, labelled, d, vocab = 64, 24, 16, 40
    hidden = torch.randn(n_positions, d, generator=g, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, requires_grad=True)
    targets = torch.full((n_positions,), IGNORE_INDEX)
    targets[-labelled:] = torch.randint(0, vocab, (labelled,), generator=g)
    with FlopCounterMode(display=False) as flops:
        loss, _ = chunked_cross_entropy(hidden, weight, targets, 16)
        loss.backward()
    # Three matmuls of labelled x d x vocab: the logits, d(hidden) and d(weight).
    assert flops.get_total_flops() == 3 * 2 * labelled * d * vocab


def test_a_head_the_kernel_cannot_take_sees_only_the_labelled_positions():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 30, 16, generator=g, requires_grad=True)
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 37))
    targets = torch.randint(0, 37, (2, 30), generator=g)
    targets[:, :20] = IGNORE_INDEX
    logit_map = LogitMap(scale=0.5, softcap=2.0)
    with FlopCounterMode(display=False) as flops:
        loss, count = gathered_logits_cross_entropy(hidden, head, targets, logit_map)
    assert count.item() == 20
    assert flops.get_total_flops() == 2 * 20 * 16 * (16 + 37)  # two matmuls, labelled rows only
    z = head(hidden) * 0.5
    reference = _full_logits_loss(torch.tanh(z / 2.0) * 2.0, targets)
    torch.testing.assert_close(loss, reference, **FP32)
    ours = torch.autograd.grad(loss, [hidden, *head.parameters()])
    theirs = torch.autograd.grad(reference, [hidden, *head.parameters()])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **FP32)
