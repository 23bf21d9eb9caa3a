"""The quantized engines' operators (issue 16): ``torch.ops.torchtrt_ext.quantized_linear`` and
``quantized_conv``, one node that a quantized graph holds in place of a linear or convolution layer, so that export, Inductor and the engine files see
one op with a schema rather than the arithmetic spelled out.

    quantized_linear(x, q_weight, w_scales, x_scale, bias, out_dtype) -> Tensor

x in the model's dtype; q_weight int8 or float8_e4m3fn, (out_features, in_features), per-channel
float32 w_scales; x_scale the per-tensor activation scale (a Python float, baked into the graph).
Implemented for the CPU by quantize.linear_reference, for meta/fake tensors (shapes only), and for
CUDA by the GPU's low-precision matrix products: fp8 through torch._scaled_mm with row-wise scales (the
activation's per-tensor scale for every row, the weight's per-channel scales; bfloat16 out, the only
output row-wise scaling takes), int8 through torch._int_mm (int32 accumulation: exact up to K of
about 130k) scaled in float32. Both quantize the activation with quantize.quantize_activation, as the
reference does. The CUDA kernel is fused_linear (below) run eagerly, with int8's product in
``torchtrt_ext::int8_mm`` (torch._int_mm's row count and layouts, made right where it is called);
sizes that are not multiples of 16 run the reference arithmetic on the GPU instead.

    quantized_conv(x, q_weight, w_scales, x_scale, bias, stride, padding, dilation, groups, out_dtype) -> Tensor

A convolution (1, 2 or 3 spatial dimensions) with its weight quantized per output channel
(q_weight (out, in / groups, *kernel), float32 w_scales (out,)) and its input per tensor (x_scale).
There is no low-precision convolution kernel (torch has no fp8 or int8 convolution on CUDA), so this
op gains no speed: it quantizes the input with the static scale (saturating, rounded as for linear
layers), dequantizes it and the weight, and convolves in the model's dtype (quantize.conv_reference).
Its numbers are those of the quantized convolution, and the engine stores the weight's quantized bytes
(a quarter of float32's); the dequantized weight is made anew at each call. On CUDA, a 1x1
convolution (stride 1, no padding, one group) runs as quantized_linear over the channels, the
low-precision matrix product. padding: one value per spatial dimension, or (before, after) pairs
(padding='same' of an even kernel).
"""

from __future__ import annotations

import torch

from . import quantize

_FORMAT_OF = {torch.int8: quantize.FORMATS["int8"], torch.float8_e4m3fn: quantize.FORMATS["fp8"]}


def _check_weight_dtype(op: str, q_weight: torch.Tensor) -> None:
    if q_weight.dtype not in _FORMAT_OF:
        raise ValueError(f"{op}: the weight is {q_weight.dtype}; it must be int8 or float8_e4m3fn")


def _check_scales_and_bias(op: str, q_weight: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Per-output-channel float32 scales, and a bias of one value per output."""
    if w_scales.shape != (q_weight.shape[0],) or w_scales.dtype != torch.float32:
        raise ValueError(f"{op}: w_scales must be float32 of shape ({q_weight.shape[0]},), got {w_scales.dtype} {tuple(w_scales.shape)}")
    if bias is not None and bias.shape != (q_weight.shape[0],):
        raise ValueError(f"{op}: bias of shape {tuple(bias.shape)} for {q_weight.shape[0]} outputs")


def _check(x: torch.Tensor, q_weight: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None) -> None:
    _check_weight_dtype("quantized_linear", q_weight)
    if q_weight.dim() != 2 or x.shape[-1] != q_weight.shape[1]:
        raise ValueError(
            f"quantized_linear: input of {x.shape[-1]} features for a weight of shape {tuple(q_weight.shape)}"
        )
    _check_scales_and_bias("quantized_linear", q_weight, w_scales, bias)


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


@quantized_linear.register_kernel("cuda")
def _(x, q_weight, w_scales, x_scale, bias, out_dtype):
    _check(x, q_weight, w_scales, bias)
    n, k = q_weight.shape
    if not aligned(k, n):
        return quantize.linear_reference(x, q_weight, w_scales, x_scale, bias, _FORMAT_OF[q_weight.dtype], out_dtype)
    return fused_linear(x, q_weight, w_scales, x_scale, bias, out_dtype)  # the one GPU arithmetic, eagerly


_INT_MM_MIN_ROWS = 17  # torch._int_mm takes more than 16 rows


def aligned(k: int, n: int) -> bool:
    """Whether the GPU's low-precision products take a (k in, n out) weight: multiples of 16."""
    return k % 16 == 0 and n % 16 == 0


def int8_mm(q_x: torch.Tensor, q_weight: torch.Tensor) -> torch.Tensor:
    """q_x (rows, k) @ q_weight (n, k).t() in int32, through torch._int_mm as cuBLAS takes it: more than
    16 rows (padded by 16: a branch on the row count would specialise a dynamic batch) and a row-major
    q_x against the column-major q_weight.t() (cuBLASLt's int8 products refuse A and B of the same
    layout: CUBLAS_STATUS_NOT_SUPPORTED, seen on the H200). The op ``torchtrt_ext::int8_mm``, because
    Inductor picks the layout of a computed q_x (column-major when it is computed from a column-major
    input) and never learns _int_mm's rule; here q_x is made row-major where it is used."""
    _check_int8_mm(q_x, q_weight)
    rows = q_x.shape[0]
    padded = torch.nn.functional.pad(q_x.contiguous(), (0, 0, 0, _INT_MM_MIN_ROWS - 1))
    return torch._int_mm(padded, q_weight.t())[:rows]


# Defined through torch.library.Library rather than custom_op: a call costs about 5 us over the
# function's own, against 13.5 for custom_op's wrappers (measured on the CPU machine, 1x64 int8), and
# Inductor calls it once per int8 layer of every engine run without CUDA graphs.
_LIBRARY = torch.library.Library("torchtrt_ext", "FRAGMENT")
_LIBRARY.define("int8_mm(Tensor q_x, Tensor q_weight) -> Tensor")
_LIBRARY.impl("int8_mm", int8_mm, "CompositeExplicitAutograd")


def _check_int8_mm(q_x: torch.Tensor, q_weight: torch.Tensor) -> None:
    if q_x.dtype != torch.int8 or q_weight.dtype != torch.int8 or q_x.dim() != 2 or q_weight.dim() != 2:
        raise ValueError(
            f"int8_mm takes 2-D int8 tensors, got {q_x.dtype} {tuple(q_x.shape)} and {q_weight.dtype} {tuple(q_weight.shape)}"
        )
    if q_x.shape[1] != q_weight.shape[1]:
        raise ValueError(f"int8_mm: {q_x.shape[1]} input features for a weight of shape {tuple(q_weight.shape)}")


@torch.library.register_fake("torchtrt_ext::int8_mm")
def _(q_x, q_weight):
    _check_int8_mm(q_x, q_weight)
    return q_x.new_empty((q_x.shape[0], q_weight.shape[0]), dtype=torch.int32)


def fused_linear(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    w_scales: torch.Tensor,
    x_scale: float,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """quantized_linear spelled out in torch ops, for the graphs of CUDA engines (core/quantize_layers.py
    puts it there; Inductor traces through it). The op is opaque to Inductor, which must then write the
    layer's input in full and call it, and the op makes three more passes over that input (to float32,
    scaled, cast) and two over the product (bias, output dtype). Spelled out, the activation's
    quantization is elementwise work that Inductor fuses into the kernel that makes the input (a norm,
    an activation function), and the scaling and bias into the one that reads the product; the
    products stay cuBLAS's (torch._scaled_mm row-wise for fp8, torch._int_mm for int8: the same kernels
    as the op's). Same arithmetic as quantize.linear_reference, within the rounding of values Inductor
    keeps in float32 between fused steps (core/inductor.py has Inductor round those as eager does). Takes
    aligned() shapes; int8's product is int8_mm (above)."""
    _check(x, q_weight, w_scales, bias)
    fmt = _FORMAT_OF[q_weight.dtype]
    n, k = q_weight.shape
    rows = x.reshape(-1, k)
    q_x = quantize.quantize_activation(rows, x_scale, fmt).contiguous()  # the products take row-major A
    if fmt.dtype == torch.int8:
        y = torch.ops.torchtrt_ext.int8_mm.default(q_x, q_weight).float() * (w_scales * x_scale)
    else:
        scale_a = torch.full((rows.shape[0], 1), x_scale, dtype=torch.float32, device=x.device)
        y = torch._scaled_mm(q_x, q_weight.t(), scale_a=scale_a, scale_b=w_scales.view(1, n), out_dtype=torch.bfloat16)
    if bias is not None:
        y = y.float() + bias.float()
    return y.reshape(*x.shape[:-1], n).to(out_dtype)


def _check_conv(x, q_weight, w_scales, bias, stride, padding, dilation, groups) -> int:
    """The number of spatial dimensions, after checking the arguments against each other."""
    _check_weight_dtype("quantized_conv", q_weight)
    n = q_weight.dim() - 2
    if not 1 <= n <= 3 or x.dim() not in (n + 1, n + 2) or x.shape[x.dim() - n - 1] != q_weight.shape[1] * groups:
        raise ValueError(
            f"quantized_conv: an input of shape {tuple(x.shape)} for a weight of shape {tuple(q_weight.shape)} in {groups} group(s)"
        )
    if len(stride) != n or len(dilation) != n or len(padding) not in (n, 2 * n):
        raise ValueError(f"quantized_conv: stride {stride}, dilation {dilation} and padding {padding} for {n} spatial dimension(s)")
    _check_scales_and_bias("quantized_conv", q_weight, w_scales, bias)
    return n


@torch.library.custom_op("torchtrt_ext::quantized_conv", mutates_args=())
def quantized_conv(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    w_scales: torch.Tensor,
    x_scale: float,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    _check_conv(x, q_weight, w_scales, bias, stride, padding, dilation, groups)
    fmt = _FORMAT_OF[q_weight.dtype]
    return quantize.conv_reference(x, q_weight, w_scales, x_scale, bias, stride, padding, dilation, groups, fmt, out_dtype)


@quantized_conv.register_fake
def _(x, q_weight, w_scales, x_scale, bias, stride, padding, dilation, groups, out_dtype):
    n = _check_conv(x, q_weight, w_scales, bias, stride, padding, dilation, groups)
    if len(padding) == 2 * n:
        padding = [before + after for before, after in zip(padding[0::2], padding[1::2])]
        x = x.new_empty((*x.shape[: x.dim() - n], *(s + p for s, p in zip(x.shape[x.dim() - n :], padding))))
        padding = [0] * n
    weight = q_weight.new_empty(q_weight.shape, dtype=x.dtype)
    y = quantize.CONV_FUNCTIONS[n - 1](x, weight, None, stride, padding, dilation, groups)
    return y.to(out_dtype).contiguous()


@quantized_conv.register_kernel("cuda")
def _(x, q_weight, w_scales, x_scale, bias, stride, padding, dilation, groups, out_dtype):
    n = _check_conv(x, q_weight, w_scales, bias, stride, padding, dilation, groups)
    pointwise = groups == 1 and all(k == 1 for k in q_weight.shape[2:]) and all(s == 1 for s in stride) and not any(padding)
    if not pointwise:
        fmt = _FORMAT_OF[q_weight.dtype]
        return quantize.conv_reference(x, q_weight, w_scales, x_scale, bias, stride, padding, dilation, groups, fmt, out_dtype)
    channels = x.dim() - n - 1  # 0 for an unbatched input
    rows = x.movedim(channels, -1)
    y = torch.ops.torchtrt_ext.quantized_linear(rows, q_weight.reshape(q_weight.shape[:2]), w_scales, x_scale, bias, out_dtype)
    return y.movedim(-1, channels).contiguous()
