"""The GPU probe: refuses a CPU device; on a GPU, close to the analytic count."""

from __future__ import annotations

import pytest
import torch

from lowmem_core.errors import ConfigError
from trainer_low_mem.model import build_model
from trainer_low_mem.planner import analytic_model_memory, probe_model_memory


def test_probe_needs_a_cuda_device():
    model = build_model("tiny")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        probe_model_memory(model, model.preset, seq_len=64, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probe_measures_activations_close_to_the_analytic_model():
    torch.manual_seed(0)
    model = build_model("small", vocab_size=259).cuda()
    preset = model.preset
    probed = probe_model_memory(
        model,
        preset,
        seq_len=512,
        device="cuda",
        micro_batches=(2, 4),
        autocast_dtype=torch.bfloat16,
    )
    analytic = analytic_model_memory(preset, 512, dtype_bytes=2)
    assert probed.source == "probe" and probed.param_count == preset.param_count()
    assert 0.5 <= probed.activation_bytes_per_token / analytic.activation_bytes_per_token <= 1.5
