"""The arithmetic of quantized engines (issue 16), one definition for every device: weights per output
channel, activations per tensor from a calibration cache's amax, both symmetric.

* int8: scale = amax / 127, q = round-half-even(x / scale) clamped to [-127, 127] (-128 unused, so that
  the range is symmetric);
* fp8 (e4m3fn): scale = amax / 448, q = (x / scale) clamped to [-448, 448], cast (round to nearest even).

Every step is an IEEE operation that the CPU and the GPU compute alike (an amax, one division, one
rounding), so one weight and one cache give bit-identical quantized weights on either. Two places
where torch's kernels differ by device are spelled out: a tensor divided by a Python number is a
multiplication by its float32 reciprocal on CUDA and a true division on the CPU (so the scales divide
in float64, rounded once to float32, and activations multiply by the reciprocal on both); and CUDA has
no int64 matrix product (so the int8 reference sums its exact products in float64, exact for K below
2**53 / 127**2). linear_reference
is what the GPU's low-precision matrix products compute (exact products, accumulated in int64 for int8
and in float32 for fp8), for the CPU and for tests. conv_reference is a quantized convolution's
numbers computed without a low-precision kernel (there is none for convolutions): the quantized
input and weight dequantized, convolved in the input's dtype.
"""

from __future__ import annotations

import dataclasses
import math
import struct

import torch

from .errors import CalibrationError


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    name: str
    dtype: torch.dtype
    qmax: float  # the largest magnitude a quantized value takes


FORMATS = {
    "int8": QuantFormat("int8", torch.int8, 127.0),
    "fp8": QuantFormat("fp8", torch.float8_e4m3fn, 448.0),
}


def quant_format(precision: str) -> QuantFormat:
    try:
        return FORMATS[precision]
    except KeyError:
        raise ValueError(f"precision {precision!r} is not a quantized format; use one of {sorted(FORMATS)}") from None


def weight_scales(weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Per output channel (dimension 0), float32: amax / qmax; a channel of zeros gets 1 (its values
    quantize to zeros whatever the scale)."""
    if weight.dim() < 1 or not weight.is_floating_point():
        raise ValueError(f"a weight to quantize is a floating-point tensor of at least one dimension, got {weight.dtype} {tuple(weight.shape)}")
    amax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1).float()
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("a weight to quantize holds a non-finite value")
    # float64, rounded once: amax / qmax correctly rounded on every device (see the module's docstring)
    return torch.where(amax > 0, (amax.double() / fmt.qmax).float(), torch.ones_like(amax))


def quantize_weight(weight: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized weight, its per-channel float32 scales)."""
    scales = weight_scales(weight, fmt)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return _to_format(weight.detach().float() / scales.view(shape), fmt), scales


def activation_scale(amax: float, fmt: QuantFormat, name: str = "") -> float:
    """A calibrated amax as a per-tensor scale; a non-finite or non-positive amax is a CalibrationError."""
    if not (math.isfinite(amax) and amax > 0):
        raise CalibrationError(f"amax of {name or 'a tensor'} is {amax!r}: it must be finite and positive")
    return float(torch.tensor(amax, dtype=torch.float32) / fmt.qmax)


def quantize_activation(x: torch.Tensor, scale: float, fmt: QuantFormat) -> torch.Tensor:
    """x / scale in the format, computed as x times the float32 reciprocal of scale (what CUDA does for a
    division by a number; the CPU alike): values beyond the calibrated range saturate at ±qmax."""
    return _to_format(x.float() * reciprocal(scale), fmt)


def reciprocal(scale: float) -> float:
    """1 / scale rounded to float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", 1.0 / struct.unpack("f", struct.pack("f", scale))[0]))[0]


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.view((-1,) + (1,) * (q.dim() - 1))


def linear_reference(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    w_scales: torch.Tensor,
    x_scale: float,
    bias: torch.Tensor | None,
    fmt: QuantFormat,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """y = x W^T + b with x quantized per tensor and W per output channel: the low-precision products
    summed exactly (int8, in float64) or in float32 (fp8), then scaled back. The GPU kernels take the
    same products; they scale int8 sums in float32 (this, in float64) and round fp8's to bfloat16, so
    their outputs agree within those roundings, not bit for bit."""
    q_x = quantize_activation(x, x_scale, fmt).reshape(-1, x.shape[-1])
    if fmt.dtype == torch.int8:
        acc = q_x.double() @ q_weight.double().t()  # exact: integer products and sums below 2**53
        y = (acc * x_scale * w_scales.double()).float()
    else:
        y = (q_x.float() @ q_weight.float().t()) * (x_scale * w_scales)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], q_weight.shape[0]).to(out_dtype)


def conv_reference(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    w_scales: torch.Tensor,
    x_scale: float,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    fmt: QuantFormat,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """A convolution of x quantized per tensor and the weight per output channel: both quantized
    values dequantized (x in float32 then to its dtype, as exact as that dtype holds them) and
    convolved in x's dtype. padding: one value per spatial dimension (both sides), or two
    (before, after) per dimension, in order, for the asymmetric padding of padding='same'."""
    n = q_weight.dim() - 2
    x_dq = (quantize_activation(x, x_scale, fmt).float() * x_scale).to(x.dtype)
    if len(padding) == 2 * n:
        x_dq, padding = _pad_asymmetric(x_dq, padding)
    w_dq = dequantize_weight(q_weight, w_scales).to(x.dtype)
    b = bias.to(x.dtype) if bias is not None else None
    y = CONV_FUNCTIONS[n - 1](x_dq, w_dq, b, stride, padding, dilation, groups)
    return y.to(out_dtype).contiguous()


CONV_FUNCTIONS = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)


def _pad_asymmetric(x: torch.Tensor, padding: list[int]) -> tuple[torch.Tensor, list[int]]:
    """(x padded with zeros by what (before, after) pairs have beyond their smaller side, the symmetric
    rest). Zeros quantize to zeros, so padding before or after quantizing is the same."""
    pairs = list(zip(padding[0::2], padding[1::2]))
    extra = [v for before, after in reversed(pairs) for v in (before - min(before, after), after - min(before, after))]
    return torch.nn.functional.pad(x, extra), [min(pair) for pair in pairs]


def _to_format(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    x = x.clamp(-fmt.qmax, fmt.qmax)
    if fmt.dtype == torch.int8:
        x = torch.round(x)  # half to even
    return x.to(fmt.dtype)
