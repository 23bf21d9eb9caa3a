"""The quantized engines' arithmetic (core/quantize.py): scales, rounding, saturation and the reference
product, against float32 on random data."""

import math

import pytest
import torch

from torchtrt_ext import CalibrationError
from torchtrt_ext.core import quantize as q


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weights_quantize_per_output_channel_within_half_a_step(precision, dtype):
    fmt = q.quant_format(precision)
    torch.manual_seed(0)
    w = (torch.randn(48, 64) * torch.logspace(-3, 1, 48).unsqueeze(1)).to(dtype)  # channels of very different ranges
    qw, scales = q.quantize_weight(w, fmt)
    assert qw.dtype == fmt.dtype and scales.dtype == torch.float32 and scales.shape == (48,)
    amax = w.float().abs().amax(dim=1)
    torch.testing.assert_close(scales, amax / fmt.qmax, rtol=0, atol=0)
    assert torch.equal(qw.float().abs().amax(dim=1), torch.full((48,), fmt.qmax))  # each channel's range used
    error = (q.dequantize_weight(qw, scales) - w.float()).abs()
    if precision == "int8":
        assert bool((error <= scales.unsqueeze(1) / 2 * (1 + 1e-6)).all())
    else:  # e4m3: 3 mantissa bits, a relative step of 2**-3 at most (subnormals aside)
        normal = w.float().abs() >= scales.unsqueeze(1) * 2**-6
        assert bool((error[normal] <= w.float().abs()[normal] * 2**-4 * (1 + 1e-6)).all())


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_weights_are_the_same_bits_every_time_and_from_a_copy(precision):
    fmt = q.quant_format(precision)
    torch.manual_seed(1)
    w = torch.randn(32, 16)
    first, s1 = q.quantize_weight(w, fmt)
    second, s2 = q.quantize_weight(w.clone().t().contiguous().t(), fmt)  # another layout of the same values
    assert torch.equal(first.view(torch.uint8), second.view(torch.uint8)) and torch.equal(s1, s2)


def test_int8_rounds_half_to_even_and_never_uses_minus_128():
    fmt = q.quant_format("int8")
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -200.0, 200.0])
    assert q.quantize_activation(x, 1.0, fmt).tolist() == [0, 2, 2, 0, -2, -127, 127]


def test_fp8_saturates_instead_of_overflowing_to_nan():
    fmt = q.quant_format("fp8")
    out = q.quantize_activation(torch.tensor([1e6, -1e6, 3.0]), 1.0, fmt).float()
    assert out.tolist() == [448.0, -448.0, 3.0]


def test_a_channel_of_zeros_gets_scale_one_and_quantizes_to_zeros():
    w = torch.randn(4, 8)
    w[2] = 0
    qw, scales = q.quantize_weight(w, q.quant_format("int8"))
    assert scales[2].item() == 1.0 and not qw[2].any()


@pytest.mark.parametrize("amax", [0.0, -1.0, math.inf, math.nan])
def test_an_amax_that_is_not_finite_and_positive_is_a_calibration_error_naming_the_tensor(amax):
    with pytest.raises(CalibrationError, match="amax of layers.0.fc:input is"):
        q.activation_scale(amax, q.quant_format("fp8"), "layers.0.fc:input")


def test_a_weight_with_a_non_finite_value_or_of_integers_is_refused():
    with pytest.raises(ValueError, match="non-finite"):
        q.weight_scales(torch.tensor([[1.0, math.inf]]), q.quant_format("int8"))
    with pytest.raises(ValueError, match="floating-point"):
        q.weight_scales(torch.ones(2, 2, dtype=torch.int32), q.quant_format("int8"))
    with pytest.raises(ValueError, match="not a quantized format; use one of"):
        q.quant_format("int4")


@pytest.mark.parametrize("precision,min_cosine", [("int8", 0.999), ("fp8", 0.998)])
def test_the_reference_product_is_close_to_float32_and_exact_for_int8(precision, min_cosine):
    fmt = q.quant_format(precision)
    torch.manual_seed(2)
    x, w, b = torch.randn(5, 7, 256), torch.randn(96, 256) * 0.05, torch.randn(96)
    qw, scales = q.quantize_weight(w, fmt)
    x_scale = q.activation_scale(x.abs().max().item(), fmt)
    y = q.linear_reference(x, qw, scales, x_scale, b, fmt, torch.float32)
    expected = torch.nn.functional.linear(x, w, b)
    assert y.shape == expected.shape
    cosine = torch.nn.functional.cosine_similarity(y.flatten(), expected.flatten(), dim=0).item()
    assert cosine >= min_cosine, cosine
    if precision == "int8":  # the same integers summed in float64 from the dequantized values
        q_x = q.quantize_activation(x, x_scale, fmt).double().reshape(-1, 256)
        exact = (q_x @ qw.double().t()) * x_scale * scales.double() + b.double()
        torch.testing.assert_close(y.reshape(-1, 96), exact.float(), rtol=1e-6, atol=1e-6)
