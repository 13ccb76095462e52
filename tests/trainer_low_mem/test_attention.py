"""The README's own loop on a Hugging Face model: packed samples kept apart by
`sample_isolation`, the loss through `chunked_cross_entropy`, as the trainer computes it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import Loader, open_dataset
from pipeline.build import build_dataset
from pipeline.config import BuildConfig
from trainer_low_mem.attention import sample_isolation
from trainer_low_mem.hf_model import HFCausalLM
from trainer_low_mem.loss import chunked_cross_entropy, shift_labels

transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[2] / "README.md"
VOCAB = 300  # the byte tokenizer's 259 ids, and room


def tiny_model(kind: str, attn_implementation: str):
    torch.manual_seed(0)
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    config = {"qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig}[kind](
        head_dim=8, **shape
    )
    config._attn_implementation = attn_implementation
    return transformers.AutoModelForCausalLM.from_config(config).float()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Prompt/response samples of 20-150 bytes, so a 512-token row packs several."""
    folder = tmp_path_factory.mktemp("attention")
    rows = [
        {"prompt": f"Question {i}: " + "why " * (i % 7), "response": f"Answer {i}. " * (1 + i % 9)}
        for i in range(120)
    ]
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_dataset(
        BuildConfig(inputs=[folder / "sft.jsonl"], out=folder / "tokens", sft=True), progress=False
    )
    return folder / "tokens"


def readme_loop() -> str:
    section = README.read_text().split("### The data path in your own loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class LargestLogits(TorchDispatchMode):
    """Records the most rows of any tensor made whose last dimension is the vocabulary."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == VOCAB:
                self.rows = max(self.rows, t.numel() // VOCAB)
        return out


@pytest.mark.parametrize("kind, attn", [("qwen3", "sdpa"), ("llama", "eager")])
def test_the_readme_loop_trains_without_vocabulary_sized_logits_per_position(dataset, kind, attn):
    model = tiny_model(kind, attn)
    before = [p.detach().clone() for p in model.parameters()]
    code = readme_loop().replace('"data/tokens"', repr(str(dataset)))
    code = code.replace('device="cuda"', 'device="cpu"').replace('"sdpa"', repr(attn))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    names = {"rank": 0, "world_size": 1, "model": model, "optimizer": optimizer}
    with LargestLogits() as seen:
        exec(compile(code, str(README), "exec"), names)
    batches = list(Loader(open_dataset(dataset), batch_size=8, seq_len=512, seed=0))
    most_labels = max(int((b["labels"] != -100).sum()) for b in batches)
    assert len(batches) >= 2 and most_labels < 8 * 512
    # The largest logits block holds one batch's labelled positions at most, never [B, L, V].
    assert 0 < seen.rows <= most_labels
    assert torch.isfinite(names["loss"]) and int(names["n_label_tokens"]) > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("kind, attn", [("qwen3", "sdpa"), ("qwen3", "eager"), ("llama", "sdpa")])
def test_packed_samples_see_only_themselves_and_the_loss_is_the_trainers(dataset, kind, attn):
    model = tiny_model(kind, attn).eval()
    batch = next(iter(Loader(open_dataset(dataset), batch_size=2, seq_len=512, seed=0)))
    ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    isolated = sample_isolation(ids, pos, attn)
    with torch.no_grad():
        packed = model(use_cache=False, **isolated).logits
        starts = [(r, int(s)) for r in range(ids.shape[0]) for s in torch.nonzero(pos[r] == 0)]
        assert len(starts) > 4
        for (r, a), (r2, b) in zip(starts, [*starts[1:], (None, None)], strict=True):
            end = b if r2 == r else ids.shape[1]
            alone = model(input_ids=ids[r : r + 1, a:end], use_cache=False).logits
            torch.testing.assert_close(packed[r, a:end], alone[0], rtol=1e-5, atol=1e-5)
        head = model.get_output_embeddings()
        hidden = model.base_model(use_cache=False, **isolated).last_hidden_state
        loss, n = chunked_cross_entropy(
            hidden, head.weight, shift_labels(labels), 4096, bias=head.bias
        )
        trainer = HFCausalLM(model)(ids, position_ids=pos, labels=labels)
    assert int(n) == int(trainer.n_loss_tokens) == int((shift_labels(labels) != -100).sum())
    torch.testing.assert_close(loss, trainer.loss, rtol=1e-6, atol=1e-6)


def test_flash_attention_gets_the_batch_as_one_row_whose_samples_transformers_finds():
    fa_utils = pytest.importorskip("transformers.modeling_flash_attention_utils")
    ids = torch.arange(12).view(2, 6)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])

    isolated = sample_isolation(ids, pos, "flash_attention_2")

    assert set(isolated) == {"input_ids", "position_ids"}  # no mask: the kernel is varlen
    assert torch.equal(isolated["input_ids"], ids.view(1, 12))
    assert fa_utils._is_packed_sequence(isolated["position_ids"], batch_size=1)
    (cu_seqlens, _), _ = fa_utils.prepare_fa_kwargs_from_position_ids(isolated["position_ids"])
    # Every sample of both rows, the second row's first one included, is its own sequence.
    assert cu_seqlens.tolist() == [0, 3, 5, 6, 10, 12]
    # As given ([2, 6]), transformers would not see the samples at all.
    assert not fa_utils._is_packed_sequence(pos, batch_size=2)


def test_the_mask_lets_each_position_see_its_own_sample_up_to_itself():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = sample_isolation(torch.zeros_like(pos), pos, "sdpa", torch.bfloat16)["attention_mask"]
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bfloat16
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert mask[0, 0, 0, 1].item() == torch.finfo(torch.bfloat16).min
