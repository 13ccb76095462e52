"""The model's memory at training precision, as the planner needs it: `ModelMemory`.

The planner never imports a model class: models are described to it by `ModelShape` (the
trainer's `ModelPreset` and its Hugging Face adapter both satisfy it). A `ModelMemory` comes
from the analytic count below, from a GPU probe (`probe.py`) or from a fake-tensor trace.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from lowmem_core.errors import ConfigError
from pipeline.cost import BATCH_BYTES_PER_TOKEN

# Adam keeps two fp32 moments; with 16-bit weights the optimizer also keeps an fp32 master copy.
ADAM_MOMENT_BYTES_PER_PARAM = 8
FP32_MASTER_BYTES_PER_PARAM = 4
DEFAULT_LOSS_CHUNK_TOKENS = 4096
SOURCES = ("analytic", "probe", "trace")
# bitsandbytes 0.50's NF4 with double quantisation (transformers' BitsAndBytesConfig for QLoRA):
# one uint8 absmax per 64 weights, those absmax quantised again per 256 with an fp32 absmax,
# a 16-entry NF4 code, a 256-entry code for the absmax and an fp32 offset, per layer.
FOUR_BIT_BLOCK = 64
NESTED_BLOCK = 256
FOUR_BIT_CODE_ENTRIES = 16
NESTED_CODE_ENTRIES = 256
FP32_BYTES = 4


class ModelShape(Protocol):
    """What the planner reads of a model: its parameter counts and its decoder dimensions."""

    @property
    def n_layers(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    @property
    def n_heads(self) -> int: ...

    @property
    def d_ff(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def param_count(self) -> int:
        """Every parameter (tied weights counted once)."""
        ...

    def trainable_param_count(self) -> int:
        """Parameters that get gradients and optimizer states (adapters only under LoRA)."""
        ...

    @property
    def quantised_weights(self) -> QuantisedWeights | None:
        """The linear layers bitsandbytes stores quantised; None for a model that is not."""
        ...

    def half_precision_param_count(self) -> int:
        """Parameters kept in bf16/fp16 (a LoRA run's frozen base, mostly views of the mapped
        folder when it loads: load_memory.py); 0 for dimensions without a built model."""
        ...


@dataclass(frozen=True)
class QuantisedWeights:
    """The linear layers bitsandbytes stores quantised, as the planner counts them.

    4-bit (NF4, double quantisation): two weights per uint8 and the quantisation state above;
    8-bit (LLM.int8): one int8 per weight and an fp32 scale per output row. Every other layer
    (embeddings, output head, norms, LoRA adapters) stays in its own dtype. Each quantised
    linear dequantises its whole weight, in the compute dtype, for every forward and backward
    call: the transient `dequant_transient_bytes` (the largest layer's).
    """

    mode: Literal["4bit", "8bit"]
    linear_shapes: tuple[tuple[int, int], ...]  # (out_features, in_features) of each layer
    compute_dtype_bytes: int  # what the layers compute in, and the other frozen layers' dtype

    @staticmethod
    def packed_bytes(mode: str, out_features: int, in_features: int) -> int:
        """Bytes of one layer's packed weight."""
        n = out_features * in_features
        return (n + 1) // 2 if mode == "4bit" else n

    @staticmethod
    def state_bytes_of(mode: str, out_features: int, in_features: int) -> int:
        """Bytes of one layer's quantisation state."""
        if mode == "8bit":
            return FP32_BYTES * out_features  # SCB: one fp32 scale per row
        blocks = math.ceil(out_features * in_features / FOUR_BIT_BLOCK)
        nested = math.ceil(blocks / NESTED_BLOCK)
        codes = FOUR_BIT_CODE_ENTRIES + NESTED_CODE_ENTRIES
        return blocks + FP32_BYTES * (nested + codes + 1)  # uint8 absmax, fp32 rest + offset

    @property
    def quantised_params(self) -> int:
        return sum(n * k for n, k in self.linear_shapes)

    @property
    def weight_bytes(self) -> int:
        return sum(self.packed_bytes(self.mode, n, k) for n, k in self.linear_shapes)

    @property
    def state_bytes(self) -> int:
        return sum(self.state_bytes_of(self.mode, n, k) for n, k in self.linear_shapes)

    @property
    def dequant_transient_bytes(self) -> int:
        """The largest layer's dequantised weight (4-bit: with its fp32 absmax)."""
        if not self.linear_shapes:
            return 0
        n, k = max(self.linear_shapes, key=lambda s: s[0] * s[1])
        absmax = FP32_BYTES * math.ceil(n * k / FOUR_BIT_BLOCK) if self.mode == "4bit" else 0
        return n * k * self.compute_dtype_bytes + absmax


@dataclass(frozen=True)
class ShardUnits:
    """The model as a parameter-sharding engine cuts it (planner/sharding.py): its largest
    transformer block, which FSDP2 and ZeRO-3 gather one at a time, and the rest (embeddings,
    head, final norm), which FSDP2 keeps gathered around the loss."""

    block_params: int  # the largest transformer block's parameters
    block_trainable: int  # of which trainable
    root_params: int  # parameters outside the blocks
    root_trainable: int  # of which trainable
    half_frozen: int = 0  # frozen parameters kept in bf16/fp16 (a LoRA base)
    largest_layer_params: int = 0  # the largest single module's own (DeepSpeed's estimator)
    compute_dtype_bytes: int = 2  # what the gathered parameters compute in (4 under "no")
    head_params: int = 0  # the output head's weight the chunked loss reads (the embedding, tied)

    @classmethod
    def of_shape(cls, shape: ModelShape, trainable: int) -> ShardUnits:
        """Counted from the dimensions: the blocks hold what the embeddings and head do not
        (untied), adapters only in the blocks."""
        params, layers = shape.param_count(), shape.n_layers
        embeddings = min(2 * shape.vocab_size * shape.d_model, params - layers)
        block = (params - embeddings) // layers
        full = trainable == params
        return cls(
            block_params=block,
            block_trainable=block if full else -(-trainable // layers),
            root_params=params - layers * block,
            root_trainable=params - layers * block if full else 0,
            half_frozen=shape.half_precision_param_count(),
            largest_layer_params=max(shape.vocab_size * shape.d_model, shape.d_model * shape.d_ff),
            head_params=shape.vocab_size * shape.d_model,
        )


@dataclass(frozen=True)
class ModelMemory:
    """One rank's model memory: static bytes per parameter, activations per token."""

    param_count: int
    activation_bytes_per_token: int  # saved for backward + backward working set, per token
    param_dtype_bytes: int = 2  # weights and gradients on the device: 2 (bf16/fp16) or 4 (fp32)
    step_fixed_bytes: int = 0  # per-step transients that do not grow with tokens (loss chunk)
    trainable_count: int | None = None  # None: every parameter trains
    d_model: int | None = None  # sizes ZeRO-2's two gradient reduce buckets (d_model^2 each)
    # Per rank on the device, already placed for ZeRO/offload (a trace does that itself), and the
    # matching host-RAM bytes; None: the planner places weights, gradients and optimizer states.
    static_device_bytes: Mapping[str, int] | None = None
    host_offload_bytes: int = 0
    source: str = "analytic"  # how activation_bytes_per_token was obtained: see SOURCES
    # bitsandbytes AdamW8bit states of this rank's trainable parameters (optimizer_states.py);
    # None: counted from trainable_count as one tensor.
    adamw_8bit_state_bytes: int | None = None
    # Under activation offload (saved_activations.py): the device line's slope and the pinned
    # host bytes per token of one micro-batch's saved activations; None: not counted.
    offload_device_bytes_per_token: int | None = None
    offload_host_bytes_per_token: int = 0
    # Host RAM of the model while a process builds it, before it moves to the GPU; None: an
    # fp32 copy of every parameter. A quantised model is loaded straight onto its device.
    host_model_bytes: int | None = None
    # How FSDP2 / ZeRO-3 cut the model (sharding.py); None: not counted.
    units: ShardUnits | None = None

    def __post_init__(self) -> None:
        for name in ("param_count", "activation_bytes_per_token"):
            _require_positive_int(f"ModelMemory.{name}", getattr(self, name))
        if self.param_dtype_bytes not in (2, 4):
            raise ConfigError(
                f"param_dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {self.param_dtype_bytes}"
            )
        if self.trainable_count is not None and not 0 < self.trainable_count <= self.param_count:
            raise ConfigError(
                f"trainable_count must be in [1, param_count={self.param_count}], "
                f"got {self.trainable_count}"
            )
        if self.step_fixed_bytes < 0 or self.host_offload_bytes < 0:
            raise ConfigError("step_fixed_bytes and host_offload_bytes must be >= 0")
        if self.source not in SOURCES:
            raise ConfigError(f"ModelMemory.source must be one of {SOURCES}, got {self.source!r}")

    @property
    def trainable(self) -> int:
        """Parameters with gradients and optimizer states."""
        return self.param_count if self.trainable_count is None else self.trainable_count

    @property
    def optimizer_bytes_per_param(self) -> int:
        """Adam moments, plus the fp32 master weights when the device weights are 16-bit."""
        master = FP32_MASTER_BYTES_PER_PARAM if self.param_dtype_bytes < 4 else 0
        return ADAM_MOMENT_BYTES_PER_PARAM + master


def analytic_model_memory(
    shape: ModelShape,
    seq_len: int,
    grad_checkpointing: bool = False,
    dtype_bytes: int = 2,
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
) -> ModelMemory:
    """The memory of a pre-norm decoder (the trainer's `DecoderLM`), counted tensor by tensor.

    Per layer and token, autograd keeps (b = dtype_bytes, d = d_model, f = d_ff, h = n_heads):
    two RMSNorms, each an fp32 copy of its input (4d), its 4-byte statistic, its output and the
    linear's input (2bd); the qkv output (3bd), rotated q and k (2bd), the attention output and
    the projection's input (2bd) plus the fused kernel's fp32 log-sum-exp (4h); the MLP's hidden
    before and after the activation (2bf). Fused attention keeps no L x L scores, so seq_len is
    only checked. Gradient checkpointing keeps just each block's input (bd) and recomputes one
    layer at a time. Backward needs about one layer's activations again as gradients. The
    chunked loss keeps d(loss)/d(hidden) (bd) per token, and per step a fp32 head gradient
    (4 V d) and one chunk's logits in three forms (chunk x V x (2b + 4)).
    """
    dims = {
        "n_layers": shape.n_layers,
        "d_model": shape.d_model,
        "n_heads": shape.n_heads,
        "d_ff": shape.d_ff,
        "vocab_size": shape.vocab_size,
        "seq_len": seq_len,
        "loss_chunk_tokens": loss_chunk_tokens,
    }
    for name, value in dims.items():
        _require_positive_int(name, value)
    if dtype_bytes not in (2, 4):
        raise ConfigError(f"dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {dtype_bytes}")
    b, d, f, h = dtype_bytes, shape.d_model, shape.d_ff, shape.n_heads
    norm = 4 * d + 4 + 2 * b * d
    layer = 2 * norm + 3 * b * d + 2 * b * d + 2 * b * d + 4 * h + 2 * b * f
    kept_per_layer = b * d if grad_checkpointing else layer
    recompute = layer if grad_checkpointing else 0
    head = norm + b * d + 8 + BATCH_BYTES_PER_TOKEN  # final norm, loss grad, targets, the batch
    per_token = shape.n_layers * kept_per_layer + recompute + layer + head
    step_fixed = 4 * shape.vocab_size * d + loss_chunk_tokens * shape.vocab_size * (2 * b + 4)
    params, trainable = shape.param_count(), shape.trainable_param_count()
    # Activation offload: the layers' saved activations wait in host RAM; backward brings one
    # layer's back at a time.
    offload_device = per_token - (shape.n_layers - 1) * kept_per_layer
    return ModelMemory(
        param_count=params,
        activation_bytes_per_token=per_token,
        param_dtype_bytes=dtype_bytes,
        step_fixed_bytes=step_fixed,
        trainable_count=trainable if trainable != params else None,
        d_model=d,
        source="analytic",
        offload_device_bytes_per_token=offload_device,
        offload_host_bytes_per_token=shape.n_layers * kept_per_layer,
    )


def with_quantised_weights(
    memory: ModelMemory, quantised: QuantisedWeights, shape: ModelShape, grad_checkpointing: bool
) -> ModelMemory:
    """`memory` (the analytic count of the unquantised model) with bitsandbytes' storage.

    The quantised linears' parameters are stored packed with their state (`QuantisedWeights`);
    the other frozen layers (embeddings, output head, norms) in the compute dtype, as the
    trainer loads them; the adapters in fp32. The step adds one layer's dequantised weight.
    LLM.int8's matmul keeps each layer's input outside autograd's saved tensors, so gradient
    checkpointing does not free them: per layer and token, the attention's and the MLP's inputs
    (3 x d, the qkv projections sharing one) and the down projection's (f).
    The static bytes are per rank without ZeRO; the caller places them for ZeRO/offload.
    """
    c = quantised.compute_dtype_bytes
    frozen = memory.param_count - quantised.quantised_params - memory.trainable
    kept_inputs = 0
    if quantised.mode == "8bit" and grad_checkpointing:
        kept_inputs = c * shape.n_layers * (3 * shape.d_model + shape.d_ff)
    static = {
        "weights": c * frozen + FP32_BYTES * memory.trainable,
        "quantised_weights": quantised.weight_bytes,
        "quant_state": quantised.state_bytes,
        "buffers": 0,
        "gradients": FP32_BYTES * memory.trainable,
        "optimizer": ADAM_MOMENT_BYTES_PER_PARAM * memory.trainable,  # fp32: no master copy
    }
    return dataclasses.replace(
        memory,
        host_model_bytes=quantised_host_model_bytes(quantised, shape),
        param_dtype_bytes=FP32_BYTES,
        activation_bytes_per_token=memory.activation_bytes_per_token + kept_inputs,
        step_fixed_bytes=memory.step_fixed_bytes + quantised.dequant_transient_bytes,
        static_device_bytes=static,
    )


def quantised_host_model_bytes(quantised: QuantisedWeights, shape: ModelShape) -> int:
    """Host RAM while a quantised model loads: transformers reads one stored tensor at a time
    (the largest: the embedding or a linear weight) in the compute dtype, then quantises and
    keeps it on the device."""
    largest = max([shape.vocab_size * shape.d_model, *(n * k for n, k in quantised.linear_shapes)])
    return largest * quantised.compute_dtype_bytes


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
