"""Specification of trainer_low_mem.model: presets, the forward contract, the chunked loss,
FLOPs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lowmem_core.errors import ConfigError
from trainer_low_mem.model import (
    MODEL_PRESETS,
    DecoderLM,
    ModelPreset,
    build_model,
    model_flops_per_token,
)

TINY = MODEL_PRESETS["tiny"]


def _batch(seed: int = 0, batch: int = 3, seq_len: int = 33, vocab: int = TINY.vocab_size):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[0, 20:] = -100  # padded tail of a row
    labels[1, :4] = -100  # a few leading tokens not scored
    return input_ids, labels


def _tiny_model(seed: int = 0, **kwargs) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(TINY, **kwargs)


def _naive_loss(model: DecoderLM, input_ids, labels):
    """Reference: full logits, shifted by hand, torch's cross-entropy."""
    logits = model(input_ids).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


# ------------------------------------------------------------------------------------------ presets


def test_presets_have_the_documented_shapes():
    assert MODEL_PRESETS["tiny"] == ModelPreset(
        vocab_size=259, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=512
    )
    small = MODEL_PRESETS["small"]
    assert (small.d_model, small.d_ff, small.n_layers, small.n_heads, small.vocab_size) == (
        512,
        2048,
        6,
        8,
        32000,
    )
    assert [name for name in MODEL_PRESETS] == ["tiny", "small", "medium", "large"]


@pytest.mark.parametrize(
    "name, expected",
    [("tiny", 147_968), ("small", 41_556_480), ("medium", 341_099_520), ("large", 990_455_808)],
)
def test_param_count_is_exact_and_matches_the_built_model(name, expected):
    preset = MODEL_PRESETS[name]
    with torch.device("meta"):  # shapes only: the 1B preset builds in milliseconds with no memory
        model = DecoderLM(preset)
    assert preset.param_count() == expected
    assert sum(p.numel() for p in model.parameters()) == expected


def test_with_vocab_replaces_only_the_vocabulary():
    byte_small = MODEL_PRESETS["small"].with_vocab(259)
    assert byte_small == dataclasses.replace(MODEL_PRESETS["small"], vocab_size=259)
    with torch.device("meta"):
        assert build_model("small", vocab_size=259).embed.weight.shape == (259, 512)


def test_build_model_by_name_or_preset():
    assert build_model("tiny").preset == TINY
    assert build_model(TINY, grad_checkpointing=True).grad_checkpointing is True


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError) as exc:
        build_model("huge")
    assert str(exc.value) == "unknown model preset 'huge'; choose one of tiny, small, medium, large"


def test_preset_rejects_heads_not_dividing_width():
    with pytest.raises(ConfigError) as exc:
        ModelPreset(vocab_size=10, d_model=66, n_layers=1, n_heads=4, d_ff=8, max_seq_len=8)
    assert (
        str(exc.value)
        == "d_model 66 is not divisible by n_heads 4; choose n_heads dividing d_model"
    )


def test_preset_rejects_odd_head_size():
    with pytest.raises(ConfigError) as exc:
        ModelPreset(vocab_size=10, d_model=12, n_layers=1, n_heads=4, d_ff=8, max_seq_len=8)
    assert str(exc.value) == (
        "head size d_model/n_heads = 3 is odd but rotary positions need it even; change d_model or "
        "n_heads"
    )


def test_preset_rejects_non_positive_sizes():
    with pytest.raises(ConfigError) as exc:
        ModelPreset(vocab_size=10, d_model=8, n_layers=0, n_heads=2, d_ff=8, max_seq_len=8)
    assert str(exc.value) == "model n_layers must be a positive integer, got 0"


def test_model_flops_per_token():
    # small: matmul params 6 * (4*512^2 + 3*512*2048) + 32000*512 = 41_549_824;
    # 6 * 41_549_824 + 12 * 6 layers * 512 * 1024 tokens = 287_047_680.
    assert model_flops_per_token(MODEL_PRESETS["small"], 1024) == 287_047_680.0
    assert model_flops_per_token(TINY, 0) == 6.0 * (2 * (4 * 64 * 64 + 3 * 64 * 256) + 259 * 64)


# ------------------------------------------------------------------------------------------ forward


def test_logits_only_without_labels_and_loss_only_with_them():
    model = _tiny_model()
    input_ids, labels = _batch()
    without = model(input_ids)
    assert without.loss is None and without.n_loss_tokens is None
    assert without.logits.shape == (3, 33, TINY.vocab_size)
    with_labels = model(input_ids, labels=labels)
    assert with_labels.logits is None
    assert with_labels.loss.dtype == torch.float32 and with_labels.loss.shape == ()


def test_labels_are_shifted_and_ignored_tokens_not_counted():
    model = _tiny_model()
    input_ids, labels = _batch()
    # Targets are labels[:, 1:]: row 0 counts labels 1..19 (19), row 1 counts 4..32 (29), row 2 all
    # 32.
    assert model(input_ids, labels=labels).n_loss_tokens.item() == 19 + 29 + 32


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 4096])
def test_chunked_loss_equals_naive_loss_and_gradients(chunk_tokens):
    chunked = _tiny_model(loss_chunk_tokens=chunk_tokens)
    naive = copy.deepcopy(chunked)
    input_ids, labels = _batch()

    loss = chunked(input_ids, labels=labels).loss
    reference = _naive_loss(naive, input_ids, labels)
    loss.backward()
    reference.backward()

    assert abs(loss.item() - reference.item()) < 1e-5
    for (name, p), q in zip(chunked.named_parameters(), naive.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_no_counted_tokens_gives_zero_loss_and_zero_gradients():
    model = _tiny_model()
    input_ids, _ = _batch()
    out = model(input_ids, labels=torch.full_like(input_ids, -100))
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.n_loss_tokens.item() == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_rows_longer_than_max_seq_len_are_rejected():
    model = _tiny_model()
    with pytest.raises(ConfigError) as exc:
        model(torch.zeros(1, 513, dtype=torch.long))
    assert str(exc.value) == (
        "rows of 513 tokens exceed the model's max_seq_len 512; lower --max_seq_len to at most 512"
    )


def test_attention_is_causal():
    model = _tiny_model()
    input_ids, _ = _batch()
    changed = input_ids.clone()
    changed[:, 20] = (changed[:, 20] + 1) % TINY.vocab_size
    before, after = model(input_ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, :20], after[:, :20], rtol=0, atol=0)
    assert not torch.allclose(before[:, 20:], after[:, 20:])


def test_position_ids_default_to_arange_and_are_relative():
    model = _tiny_model()
    input_ids, _ = _batch()
    positions = torch.arange(33).expand(3, 33)
    base = model(input_ids).logits
    torch.testing.assert_close(
        model(input_ids, position_ids=positions).logits, base, rtol=0, atol=0
    )
    # Rotary positions encode only distances: shifting every position leaves the output unchanged.
    torch.testing.assert_close(
        model(input_ids, position_ids=positions + 100).logits, base, rtol=1e-4, atol=1e-5
    )


def test_position_restart_at_a_document_start_changes_only_the_later_document():
    model = _tiny_model()
    input_ids, _ = _batch()
    restarted = torch.cat((torch.arange(10), torch.arange(23))).expand(
        3, 33
    )  # second document at column 10
    base = model(input_ids).logits
    packed = model(input_ids, position_ids=restarted).logits
    torch.testing.assert_close(packed[:, :10], base[:, :10], rtol=0, atol=0)
    assert not torch.allclose(packed[:, 10:], base[:, 10:])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    plain = _tiny_model()
    checkpointed = copy.deepcopy(plain)
    checkpointed.grad_checkpointing = True
    input_ids, labels = _batch()
    plain_loss = plain(input_ids, labels=labels).loss
    checkpointed_loss = checkpointed(input_ids, labels=labels).loss
    plain_loss.backward()
    checkpointed_loss.backward()
    assert plain_loss.item() == checkpointed_loss.item()
    for p, q in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-7)


def test_forward_and_backward_are_bit_deterministic_on_cpu():
    grads = []
    losses = []
    for _ in range(2):
        model = _tiny_model(seed=3, loss_chunk_tokens=16)
        input_ids, labels = _batch(seed=5)
        loss = model(input_ids, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))


def test_bf16_autocast_loss_is_close_and_gradients_stay_fp32():
    model = _tiny_model(loss_chunk_tokens=16)
    input_ids, labels = _batch()
    fp32_loss = model(input_ids, labels=labels).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids, labels=labels)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - fp32_loss) < 0.05
    assert all(
        p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters()
    )


def test_bf16_weights_train_without_dtype_errors():
    """DeepSpeed's bf16 mode casts the whole model to bf16; loss and gradients must still flow."""
    model = _tiny_model(loss_chunk_tokens=16).to(torch.bfloat16)
    input_ids, labels = _batch()
    out = model(input_ids, labels=labels)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_a_few_steps_on_one_batch_lower_the_loss():
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    input_ids, labels = _batch()
    losses = []
    for _ in range(10):
        loss = model(input_ids, labels=labels).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_chunked_loss_matches_naive_with_a_fraction_of_the_memory():
    preset = dataclasses.replace(TINY, vocab_size=32000)
    torch.manual_seed(0)
    chunked = DecoderLM(preset, loss_chunk_tokens=512).cuda()
    naive = copy.deepcopy(chunked)
    input_ids, labels = (t.cuda() for t in _batch(batch=8, seq_len=512, vocab=32000))

    def peak_bytes(run) -> tuple[float, int]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run()
        loss.backward()
        torch.cuda.synchronize()
        return loss.item(), torch.cuda.max_memory_allocated() - before

    chunked_loss, chunked_peak = peak_bytes(lambda: chunked(input_ids, labels=labels).loss)
    naive_loss, naive_peak = peak_bytes(lambda: _naive_loss(naive, input_ids, labels))
    assert abs(chunked_loss - naive_loss) < 1e-2
    assert (
        chunked_peak * 3 < naive_peak
    )  # the naive path holds [8, 512, 32000] logits in bf16 and fp32
    for (name, p), q in zip(chunked.named_parameters(), naive.parameters(), strict=True):
        relative_error = ((p.grad - q.grad).norm() / q.grad.norm()).item()
        assert relative_error < 2e-2, name
