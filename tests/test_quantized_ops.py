"""torch.ops.torchtrt_ext.quantized_linear on the CPU: the reference arithmetic, its shape checks, and
that export and Inductor take it as one op."""

import pytest
import torch

from torchtrt_ext.core import quantize
from torchtrt_ext.core.quantized_ops import quantized_linear


def _layer(precision, seed=0):
    torch.manual_seed(seed)
    fmt = quantize.quant_format(precision)
    w, b = torch.randn(32, 64) * 0.1, torch.randn(32)
    qw, scales = quantize.quantize_weight(w, fmt)
    return fmt, w, b, qw, scales


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_the_op_computes_the_reference_product(precision):
    fmt, w, b, qw, scales = _layer(precision)
    x = torch.randn(3, 5, 64)
    x_scale = quantize.activation_scale(x.abs().max().item(), fmt)
    got = quantized_linear(x, qw, scales, x_scale, b, torch.float32)
    assert torch.equal(got, quantize.linear_reference(x, qw, scales, x_scale, b, fmt, torch.float32))
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), torch.nn.functional.linear(x, w, b).flatten(), dim=0)
    assert cosine.item() > 0.99


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_export_and_inductor_keep_it_one_op_with_the_same_result(precision):
    fmt, _, b, qw, scales = _layer(precision)

    class Quantized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("qw", qw)
            self.register_buffer("scales", scales)
            self.register_buffer("b", b)

        def forward(self, x):
            return torch.ops.torchtrt_ext.quantized_linear(x, self.qw, self.scales, 0.05, self.b, torch.float32).relu()

    model = Quantized()
    x = torch.randn(4, 64)
    ep = torch.export.export(model, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.torchtrt_ext.quantized_linear.default in targets
    expected = model(x)
    assert torch.equal(ep.module()(x), expected)
    torch.testing.assert_close(torch.compile(model)(x), expected, rtol=0, atol=0)


def test_wrong_shapes_and_dtypes_are_errors_that_name_them():
    fmt, _, b, qw, scales = _layer("int8")
    with pytest.raises(ValueError, match=r"input of 63 features for a weight of shape \(32, 64\)"):
        quantized_linear(torch.randn(2, 63), qw, scales, 0.1, b, torch.float32)
    with pytest.raises(ValueError, match="the weight is torch.float32; it must be int8 or float8_e4m3fn"):
        quantized_linear(torch.randn(2, 64), qw.float(), scales, 0.1, b, torch.float32)
    with pytest.raises(ValueError, match=r"w_scales must be float32 of shape \(32,\)"):
        quantized_linear(torch.randn(2, 64), qw, scales.double(), 0.1, b, torch.float32)
