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


# --- fused_linear: the same arithmetic in torch ops, for CUDA graphs -----------------------------------


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_fused_linear_computes_the_reference_product_eagerly_and_compiled(precision, bias, dtype, rows):
    from torchtrt_ext.core.quantized_ops import fused_linear

    fmt, w, b, qw, scales = _layer(precision)
    b = b if bias else None
    x = torch.randn(rows, 2, 64, generator=torch.Generator().manual_seed(rows)).to(dtype)
    x_scale = quantize.activation_scale(float(x.float().abs().max()) * 0.8, fmt)  # some values saturate
    expected = quantize.linear_reference(x, qw, scales, x_scale, b, fmt, torch.float32)
    got = fused_linear(x, qw, scales, x_scale, b, dtype)
    assert got.dtype == dtype and got.shape == expected.shape
    # int8: the same integer products, scaled in float32 (the reference in float64); fp8: a bfloat16
    # product (the GPU's row-wise kernel), then the output dtype
    tol = 2e-6 if precision == "int8" and dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    # through Inductor as an engine compiles it: a traced graph (make_fx, as AOTAutograd traces the pass's
    # graphs; not dynamo) handed to compile_fx
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda t: fused_linear(t, qw, scales, x_scale, b, dtype))(x)
    compiled = torch._inductor.compile(gm, [x])
    out = compiled(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    torch.testing.assert_close(out.float(), got.float(), rtol=tol, atol=tol * float(expected.abs().max()))


def test_cuda_graphs_hold_fused_linear_layers_of_aligned_shapes_and_the_op_elsewhere():
    """The pass's choice, on graphs whose values are (fake) CUDA tensors: no GPU needed to see it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchtrt_ext import calibrate
    from torchtrt_ext.core import lifting, quantize_pass

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.aligned, self.odd = torch.nn.Linear(64, 32), torch.nn.Linear(32, 24)  # 24 outputs: not a multiple of 16

        def forward(self, x):
            return self.odd(torch.relu(self.aligned(x)))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 64)
    cache = calibrate(model, [(torch.randn(4, 64),) for _ in range(2)])
    lifted = lifting.from_export(torch.export.export(model, (x,)))
    cpu, _ = quantize_pass.quantize_graph(lifted, "fp8", cache, "error")
    assert [n.target for n in cpu.gm.graph.nodes if n.target in quantize_pass.QUANTIZED_TARGETS] == [quantize_pass.QUANTIZED_LINEAR] * 2
    # a graph captured on the host for an engine that runs on CUDA (weight streaming): the engine's device decides
    streamed, _ = quantize_pass.quantize_graph(lifted, "fp8", cache, "error", device=torch.device("cuda"))
    targets = [n.target for n in streamed.gm.graph.nodes if n.target in quantize_pass.QUANTIZED_TARGETS]
    assert targets == [quantize_pass.FUSED_LINEAR, quantize_pass.QUANTIZED_LINEAR]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        for node in lifted.gm.graph.nodes:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                node.meta["val"] = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cuda")
    on_cuda, _ = quantize_pass.quantize_graph(lifted, "fp8", cache, "error")
    targets = [n.target for n in on_cuda.gm.graph.nodes if n.target in quantize_pass.QUANTIZED_TARGETS]
    assert targets == [quantize_pass.FUSED_LINEAR, quantize_pass.QUANTIZED_LINEAR]



def test_int8_products_take_a_row_major_input_whatever_layout_inductor_picks(monkeypatch):
    """cuBLAS's int8 product refuses an A of B's layout; Inductor makes a quantized input computed from a
    column-major one column-major. The product's A, seen where torch._int_mm is called, is row-major
    after Inductor, and the numbers are the reference's."""
    from torchtrt_ext.core.quantized_ops import fused_linear

    fmt, w, b, qw, scales = _layer("int8")
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3)).t()  # (8, 64), column-major
    x_scale = quantize.activation_scale(float(x.abs().max()), fmt)
    seen, int_mm = [], torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: seen.append(a.stride()) or int_mm(a, b))
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda t: fused_linear(t, qw, scales, x_scale, b, torch.float32))(x)
    seen.clear()  # tracing ran the op on real tensors once: what counts is the compiled code's call
    out = torch._inductor.compile(gm, [x])(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert seen and all(s == (64, 1) for s in seen), seen  # (24, 64) row-major: 8 rows and the 16 of padding
    expected = quantize.linear_reference(x, qw, scales, x_scale, b, fmt, torch.float32)
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_compiled_quantized_layers_round_as_eager_does(precision):
    """Four fused layers through Inductor with the engines' config equal the same layers run eagerly, bit
    for bit: a fused kernel that kept a bfloat16 value in float32 before the next layer quantized it
    would move some activations by a quantization step (and a streamed engine, whose segments end
    between layers, would differ from a resident one)."""
    from torch._inductor.compile_fx import compile_fx

    from torchtrt_ext.core.inductor import config_patches, quantizes
    from torchtrt_ext.core.quantized_ops import fused_linear

    fmt = quantize.quant_format(precision)
    g = torch.Generator().manual_seed(0)
    layers = []
    for i in range(4):
        qw, scales = quantize.quantize_weight(torch.randn(256, 256, generator=g) / 16, fmt)
        bias = torch.randn(256, generator=g).to(torch.bfloat16)
        layers.append((qw, scales, quantize.activation_scale(3.0 if i == 0 else 1.0, fmt), bias))

    def stack(x):
        for qw, scales, x_scale, bias in layers:
            x = torch.relu(fused_linear(x, qw, scales, x_scale, bias, torch.bfloat16))
        return x

    x = torch.randn(32, 256, generator=g).to(torch.bfloat16)
    gm = torch.fx.experimental.proxy_tensor.make_fx(stack)(x)
    assert quantizes(gm)
    out = compile_fx(gm, [x], config_patches=config_patches(quantizes(gm)))(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    expected = stack(x)
    assert expected.abs().sum() > 0 and torch.equal(out, expected)


def test_int8_mm_names_wrong_dtypes_and_shapes():
    q = torch.randint(-9, 9, (4, 64), dtype=torch.int8)
    w = torch.randint(-9, 9, (32, 64), dtype=torch.int8)
    assert torch.equal(torch.ops.torchtrt_ext.int8_mm(q, w), (q.double() @ w.double().t()).int())
    with pytest.raises(ValueError, match=r"2-D int8 tensors, got torch.float32 \(4, 64\)"):
        torch.ops.torchtrt_ext.int8_mm(q.float(), w)
    with pytest.raises(ValueError, match=r"48 input features for a weight of shape \(32, 64\)"):
        torch.ops.torchtrt_ext.int8_mm(torch.zeros(4, 48, dtype=torch.int8), w)
