"""Stand-ins for bitsandbytes' quantised linear layers, for the planner's fake-tensor trace.

A 4-bit or 8-bit model is quantised from real weights, which a build on the meta device does
not have. `quantise_on_meta` replaces the linear layers of such a build the way transformers'
bitsandbytes integration does (every nn.Linear but the output head, layers whose weight is tied
to another and `skip_modules`) by `QuantisedLinear`: tensors of exactly the sizes bitsandbytes
0.50 stores (planner/model_memory.py's `QuantisedWeights` counts them), and a forward and
backward that allocate what its kernels allocate (Linear4bit + MatMul4Bit; Linear8bitLt +
MatMul8bitFp on the CPU, MatMul8bitLt on CUDA). The trace tells each layer the device it plans
for through `planned_device_type`, and reads the layer's tensors by `quantised_tensors()`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer_low_mem.planner.model_memory import (
    FOUR_BIT_BLOCK,
    FOUR_BIT_CODE_ENTRIES,
    NESTED_BLOCK,
    NESTED_CODE_ENTRIES,
    QuantisedWeights,
)

# LLM.int8's CUDA kernels quantise their input row-wise to int8 through fp16.
_INT8_INPUT_DTYPE = torch.float16


class QuantisedLinear(nn.Linear):
    """A frozen linear layer stored as bitsandbytes stores it (an nn.Linear to peft, which wraps
    it with LoRA as it wraps any linear layer)."""

    def __init__(self, linear: nn.Linear, mode: str, compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)  # nn.Linear's own would allocate the unquantised weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.compute_dtype = mode, compute_dtype
        self.planned_device_type = "cuda"  # the trace says which device it plans for
        n, k = self.out_features, self.in_features
        on = {"device": linear.weight.device}
        if mode == "4bit":
            packed_bytes = QuantisedWeights.packed_bytes(mode, n, k)
            packed = torch.empty(packed_bytes, 1, dtype=torch.uint8, **on)
            blocks = math.ceil(n * k / FOUR_BIT_BLOCK)
            state = {
                "absmax": torch.empty(blocks, dtype=torch.uint8, **on),
                "code": torch.empty(FOUR_BIT_CODE_ENTRIES, **on),
                "nested_absmax": torch.empty(math.ceil(blocks / NESTED_BLOCK), **on),
                "nested_code": torch.empty(NESTED_CODE_ENTRIES, **on),
                "offset": torch.empty((), **on),
            }
        else:
            packed = torch.empty(n, k, dtype=torch.int8, **on)
            state = {"scb": torch.empty(n, **on)}  # SCB: fp32 scale per output row
        self.weight = nn.Parameter(packed, requires_grad=False)
        for name, tensor in state.items():
            self.register_buffer(name, tensor, persistent=False)
        self._state_names = tuple(state)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def quantised_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The packed weight and the quantisation state, for the planner's categories."""
        return {
            "quantised_weights": [self.weight],
            "quant_state": [getattr(self, name) for name in self._state_names],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "4bit":
            return self._forward_4bit(x)
        # Linear8bitLt casts a bias to the input's dtype, once and for good.
        if self.bias is not None and self.bias.dtype != x.dtype:
            self.bias.data = self.bias.data.to(x.dtype)
        if self.planned_device_type == "cuda":
            return _Int8Cuda.apply(x, self.weight, self.bias, self)
        return _Int8Cpu.apply(x, self.weight, self.bias, self)

    def _forward_4bit(self, x: torch.Tensor) -> torch.Tensor:
        # Linear4bit: the input in the compute dtype, the bias made that dtype for good.
        input_dtype = x.dtype
        x = x.to(self.compute_dtype)
        if self.bias is not None and self.bias.dtype != x.dtype:
            self.bias.data = self.bias.data.to(x.dtype)
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        out = (
            _FourBit.apply(x, self.weight, self.bias, self)
            if needs_grad
            else self.gemm_4bit(x, self.bias)
        )
        return out.to(input_dtype)

    def gemm_4bit(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """bitsandbytes' gemm_4bit as the CPU backend runs it and CUDA above 1536 rows: the
        nested absmax dequantised (+ offset), the weight dequantised, then F.linear. (CUDA's
        fused kernel for fewer rows allocates no dequantised weight: this is its upper bound.)"""
        absmax = self.dequantised_absmax() + self.offset
        weight = torch.empty(self.out_features, self.in_features, dtype=x.dtype, device=x.device)
        del absmax
        return F.linear(x, weight, bias)

    def dequantised_absmax(self) -> torch.Tensor:
        return torch.empty(self.absmax.shape, dtype=torch.float32, device=self.absmax.device)

    def dequantised_4bit(self) -> torch.Tensor:
        """F.dequantize_4bit: absmax (in place + offset), then the weight in the compute dtype."""
        absmax = self.dequantised_absmax()
        absmax += self.offset
        return torch.empty(
            self.out_features, self.in_features, dtype=self.compute_dtype, device=absmax.device
        )

    def dequantised_int8(self, dtype: torch.dtype) -> torch.Tensor:
        """CB.to(dtype) * SCB / 127, as MatMul8bitLt and MatMul8bitFp dequantise."""
        return self.weight.to(dtype, copy=True).mul_(self.scb.unsqueeze(1).mul(1.0 / 127.0))


class _FourBit(torch.autograd.Function):
    """MatMul4Bit: saves only the packed weight; backward dequantises it again."""

    @staticmethod
    def forward(ctx, x, packed, bias, layer):
        ctx.layer = layer
        return layer.gemm_4bit(x, bias)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.layer.dequantised_4bit().to(grad.dtype)
        return torch.matmul(grad, weight), None, None, None


class _Int8Cpu(torch.autograd.Function):
    """MatMul8bitFp (bitsandbytes' CPU training path): dequantise, F.linear. It keeps the input
    as an attribute of its context, not a saved tensor, so gradient checkpointing does not free
    it: every 8-bit layer's input stays until its backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.layer, ctx.shape, ctx.input = layer, x.shape, x
        return F.linear(x, layer.dequantised_int8(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        x = ctx.input
        grad = grad.reshape(-1, grad.shape[-1]).contiguous()
        weight = ctx.layer.dequantised_int8(x.dtype)
        return torch.matmul(grad.to(x.dtype), weight).view(ctx.shape), None, None, None


class _Int8Cuda(torch.autograd.Function):
    """MatMul8bitLt (CUDA): the input through fp16 to row-quantised int8, an int32 product
    dequantised to fp16 then the input's dtype; keeps the input in its context as the CPU path
    does; backward as on the CPU."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.layer, ctx.shape, ctx.input = layer, x.shape, x
        rows = x.reshape(-1, x.shape[-1])
        half = rows.to(_INT8_INPUT_DTYPE)
        quantised = torch.empty(rows.shape, dtype=torch.int8, device=x.device)
        scales = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        del half
        product = torch.empty(rows.shape[0], layer.out_features, dtype=torch.int32, device=x.device)
        del quantised, scales
        out = torch.empty(product.shape, dtype=_INT8_INPUT_DTYPE, device=x.device)
        del product
        if bias is not None:
            out = out + bias
        return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, grad):
        return _Int8Cpu.backward(ctx, grad)


def quantisable_linears(
    model: nn.Module, skip_modules: Sequence[str] = ()
) -> list[tuple[str, nn.Linear]]:
    """The linear layers transformers' bitsandbytes integration quantises in a Hugging Face
    causal LM: every nn.Linear but the output head, layers whose weight another module also
    holds (tied), and those named (or ending in a name) in `skip_modules`."""
    head = model.get_output_embeddings()
    holders: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            holders[id(weight)] = holders.get(id(weight), 0) + 1
    out = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module is head or holders[id(module.weight)] > 1:
            continue
        if any(name == s or name.endswith(f".{s}") for s in skip_modules):
            continue
        out.append((name, module))
    return out


def quantised_weights_of(
    model: nn.Module, mode: str, compute_dtype: torch.dtype, skip_modules: Sequence[str] = ()
) -> QuantisedWeights:
    """What the planner's analytic count reads of the layers `quantise_on_meta` would replace."""
    linears = quantisable_linears(model, skip_modules)
    shapes = tuple((m.out_features, m.in_features) for _, m in linears)
    return QuantisedWeights(mode, shapes, torch.empty((), dtype=compute_dtype).element_size())


def quantise_on_meta(
    model: nn.Module, mode: str, compute_dtype: torch.dtype, skip_modules: Sequence[str] = ()
) -> nn.Module:
    """`model` (a Hugging Face causal LM) with its quantisable linears replaced, in place."""
    counted = quantised_weights_of(model, mode, compute_dtype, skip_modules)
    for name, linear in quantisable_linears(model, skip_modules):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantisedLinear(linear, mode, compute_dtype))
    model.quantised_weights = counted
    return model
