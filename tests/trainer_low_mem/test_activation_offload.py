"""Activation offload: the saved activations go to host copies and come back for backward, with
bit-identical losses and gradients, with and without gradient checkpointing; parameters and
small tensors stay; the planner's trace counts the host copies a real run makes."""

from __future__ import annotations

import weakref

import pytest
import torch

from pipeline.batch_spec import TokenRows
from trainer_low_mem import loop
from trainer_low_mem.cli import parse_job_config
from trainer_low_mem.model import MODEL_PRESETS, DecoderLM
from trainer_low_mem.planner.saved_activations import (
    MIN_OFFLOAD_BYTES,
    offload_saved_activations,
)
from trainer_low_mem.planner.trace import trace_step_memory

CPU = torch.device("cpu")


class HostCopies:
    """Counts the host copies the hooks make: how many, and the peak of their live bytes."""

    def __init__(self) -> None:
        self.made: list[torch.Tensor] = []
        self.live_bytes = self.peak_bytes = 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        host = t.detach().clone()
        nbytes = host.untyped_storage().nbytes()
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(host.untyped_storage(), self._free, nbytes)
        self.made.append(t)
        return host

    def _free(self, nbytes: int) -> None:
        self.live_bytes -= nbytes


def _loss_and_grads(grad_checkpointing: bool, offload: bool, host_copy=None):
    torch.manual_seed(0)
    model = DecoderLM(MODEL_PRESETS["tiny"], grad_checkpointing=grad_checkpointing)
    batch = TokenRows(64).example(2, "cpu")
    batch["input_ids"] = torch.randint(0, 259, batch["input_ids"].shape)
    batch["labels"] = batch["input_ids"].clone()
    hooks = (
        offload_saved_activations(model.parameters(), CPU, pin_memory=False, host_copy=host_copy)
        if offload
        else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    )
    with hooks:
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model


@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_offload_gives_bit_identical_losses_and_gradients(grad_checkpointing):
    copies = HostCopies()
    loss, grads, _ = _loss_and_grads(grad_checkpointing, offload=False)
    offloaded_loss, offloaded_grads, _ = _loss_and_grads(grad_checkpointing, True, copies)
    assert torch.equal(loss, offloaded_loss)
    assert all(torch.equal(grads[n], offloaded_grads[n]) for n in grads)
    assert copies.made  # the mechanism ran: something went to the host


def test_parameters_and_small_tensors_stay_on_the_device():
    copies = HostCopies()
    _, _, model = _loss_and_grads(False, True, copies)
    params = {id(p.untyped_storage()) for p in model.parameters()}
    assert all(id(t.untyped_storage()) not in params for t in copies.made)
    assert min(t.numel() * t.element_size() for t in copies.made) >= MIN_OFFLOAD_BYTES


def test_the_trace_counts_the_host_copies_a_real_step_makes():
    def factory():
        return DecoderLM(MODEL_PRESETS["tiny"])

    traced = trace_step_memory(factory, seq_len=128, micro_batches=(1, 2), device_type="cuda")
    torch.manual_seed(0)
    model = DecoderLM(MODEL_PRESETS["tiny"])
    for point in traced.offload_points:
        copies = HostCopies()
        batch = TokenRows(128).example(point.micro_batch, "cpu")
        with offload_saved_activations(model.parameters(), CPU, pin_memory=False, host_copy=copies):
            loss = model(**batch).loss
        loss.backward()
        # The trace rounds each copy up to CUDA's 512-byte blocks; the real CPU run does not.
        assert copies.peak_bytes <= point.host_bytes
        assert point.host_bytes - copies.peak_bytes < 512 * len(copies.made)
    memory = traced.to_model_memory()
    assert memory.offload_device_bytes_per_token < memory.activation_bytes_per_token
    assert memory.offload_host_bytes_per_token > 0


def _train(data, out, *extra: str):
    flags = ["--data", str(data), "--output_dir", str(out), "--model_preset", "tiny"]
    flags += ["--max_seq_len", "64", "--global_batch", "4", "--max_steps", "3"]
    flags += ["--progress_bar=False", "--num_readers", "1", "--save_every", "0", *extra]
    return loop.train(parse_job_config(flags))


@pytest.mark.slow  # two short CPU runs each: about 20 s on two cores
@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_training_with_offload_on_has_the_same_losses(
    tmp_path, sample_dataset_dir, grad_checkpointing
):
    checkpointing = f"--grad_checkpointing={grad_checkpointing}"
    plain = _train(sample_dataset_dir, tmp_path / "off", checkpointing)
    offloaded = _train(
        sample_dataset_dir, tmp_path / "on", checkpointing, "--offload_activations", "on"
    )
    assert (plain.plan["offload_activations"], offloaded.plan["offload_activations"]) == (
        False,
        True,
    )
    assert offloaded.losses == plain.losses  # exact float equality
