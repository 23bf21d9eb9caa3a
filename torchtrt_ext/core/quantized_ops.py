"""The quantized engines' operator (issue 16): ``torch.ops.torchtrt_ext.quantized_linear``, one node that
a quantized graph holds in place of a linear layer, so that export, Inductor and the engine files see
one op with a schema rather than the arithmetic spelled out.

    quantized_linear(x, q_weight, w_scales, x_scale, bias, out_dtype) -> Tensor

x in the model's dtype; q_weight int8 or float8_e4m3fn, (out_features, in_features), per-channel
float32 w_scales; x_scale the per-tensor activation scale (a Python float, baked into the graph).
Implemented for the CPU by quantize.linear_reference, and for meta/fake tensors (shapes only). The
CUDA kernels (torch._scaled_mm rowwise, torch._int_mm) come with the GPU measurements.
"""

from __future__ import annotations

import torch

from . import quantize

_FORMAT_OF = {torch.int8: quantize.FORMATS["int8"], torch.float8_e4m3fn: quantize.FORMATS["fp8"]}


def _check(x: torch.Tensor, q_weight: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None) -> None:
    if q_weight.dtype not in _FORMAT_OF:
        raise ValueError(f"quantized_linear: the weight is {q_weight.dtype}; it must be int8 or float8_e4m3fn")
    if q_weight.dim() != 2 or x.shape[-1] != q_weight.shape[1]:
        raise ValueError(
            f"quantized_linear: input of {x.shape[-1]} features for a weight of shape {tuple(q_weight.shape)}"
        )
    if w_scales.shape != (q_weight.shape[0],) or w_scales.dtype != torch.float32:
        raise ValueError(f"quantized_linear: w_scales must be float32 of shape ({q_weight.shape[0]},), got {w_scales.dtype} {tuple(w_scales.shape)}")
    if bias is not None and bias.shape != (q_weight.shape[0],):
        raise ValueError(f"quantized_linear: bias of shape {tuple(bias.shape)} for {q_weight.shape[0]} outputs")


@torch.library.custom_op("torchtrt_ext::quantized_linear", mutates_args=(), device_types="cpu")
def quantized_linear(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    w_scales: torch.Tensor,
    x_scale: float,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    _check(x, q_weight, w_scales, bias)
    return quantize.linear_reference(x, q_weight, w_scales, x_scale, bias, _FORMAT_OF[q_weight.dtype], out_dtype)


@quantized_linear.register_fake
def _(x, q_weight, w_scales, x_scale, bias, out_dtype):
    _check(x, q_weight, w_scales, bias)
    return x.new_empty((*x.shape[:-1], q_weight.shape[0]), dtype=out_dtype)
