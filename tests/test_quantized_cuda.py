"""Issue 16 on the GPU: the quantized_linear kernels (torch._scaled_mm row-wise for fp8, torch._int_mm
for int8) against the CPU's reference arithmetic, and portability: one weight and one calibration give
bit-identical quantized weights and the same activation scales on the CPU and on the GPU."""

import pytest
import torch

from torchtrt_ext.core import quantize
from torchtrt_ext.core.quantized_ops import quantized_linear

pytestmark = pytest.mark.cuda

PRECISIONS = ["int8", "fp8"]


def _layer(precision, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = quantize.quant_format(precision)
    w, b = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
    qw, scales = quantize.quantize_weight(w, fmt)
    return fmt, w, b, qw, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantized_weights_are_bit_identical_on_cpu_and_cuda(precision, dtype):
    fmt = quantize.quant_format(precision)
    g = torch.Generator().manual_seed(3)
    for shape in [(64, 128), (5632, 2048), (17, 33)]:
        w = (torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g)).to(dtype)
        q_cpu, s_cpu = quantize.quantize_weight(w, fmt)
        q_gpu, s_gpu = quantize.quantize_weight(w.cuda(), fmt)
        assert torch.equal(q_cpu.view(torch.uint8), q_gpu.cpu().view(torch.uint8)), (precision, dtype, shape)
        assert torch.equal(s_cpu, s_gpu.cpu())


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 64])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_cuda_kernel_computes_the_reference_product(precision, out_dtype, rows):
    fmt, w, b, qw, scales = _layer(precision, 96, 256)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(4))
    x_scale = quantize.activation_scale(float(x.abs().max()), fmt)
    expected = quantize.linear_reference(x, qw, scales, x_scale, b, fmt, torch.float32)
    got = quantized_linear(x.cuda().to(out_dtype), qw.cuda(), scales.cuda(), x_scale, b.cuda(), out_dtype)
    assert got.dtype == out_dtype and got.shape == expected.shape
    # the input rounded to out_dtype first, then one rounding of the output (fp8: bf16 out of _scaled_mm)
    ref_same_input = quantize.linear_reference(x.to(out_dtype), qw, scales, x_scale, b, fmt, torch.float32)
    tol = 8e-3 if fmt.dtype == torch.float8_e4m3fn or out_dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(got.float().cpu(), ref_same_input, rtol=tol, atol=tol * float(expected.abs().max()))
    cosine = torch.nn.functional.cosine_similarity(got.float().cpu().flatten(), expected.flatten(), dim=0)
    assert cosine.item() > 0.999


@pytest.mark.parametrize("precision", PRECISIONS)
def test_unaligned_shapes_fall_back_to_the_reference_on_the_gpu(precision):
    fmt, _, b, qw, scales = _layer(precision, 24, 40)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(5))
    x_scale = quantize.activation_scale(float(x.abs().max()), fmt)
    got = quantized_linear(x.cuda(), qw.cuda(), scales.cuda(), x_scale, b.cuda(), torch.float32)
    torch.testing.assert_close(got.cpu(), quantize.linear_reference(x, qw, scales, x_scale, b, fmt, torch.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [5, 17, 100])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_column_major_input_is_taken(precision, rows):
    """torch._scaled_mm takes a row-major A only: a transposed input is quantized into one."""
    fmt, _, b, qw, scales = _layer(precision, 64, 128)
    x = torch.randn(128, rows, generator=torch.Generator().manual_seed(8)).t()  # (rows, 128), column-major
    x_scale = quantize.activation_scale(float(x.abs().max()), fmt)
    got = quantized_linear(x.cuda(), qw.cuda(), scales.cuda(), x_scale, b.cuda(), torch.float32)
    expected = quantize.linear_reference(x, qw, scales, x_scale, b, fmt, torch.float32)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))


@pytest.mark.parametrize("kernel", [1, 3])  # 1x1: through quantized_linear's low-precision product
@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_cuda_convolution_computes_the_cpu_one(precision, kernel):
    fmt = quantize.quant_format(precision)
    g = torch.Generator().manual_seed(6)
    w, b = torch.randn(64, 32, kernel, kernel, generator=g) * 0.05, torch.randn(64, generator=g)
    qw, scales = quantize.quantize_weight(w, fmt)
    x = torch.randn(2, 32, 9, 9, generator=g)
    x_scale = quantize.activation_scale(float(x.abs().max()), fmt)
    pad = [kernel // 2] * 2
    expected = torch.ops.torchtrt_ext.quantized_conv(x, qw, scales, x_scale, b, [1, 1], pad, [1, 1], 1, torch.float32)
    got = torch.ops.torchtrt_ext.quantized_conv(x.cuda().half(), qw.cuda(), scales.cuda(), x_scale, b.cuda().half(),
                                                [1, 1], pad, [1, 1], 1, torch.float16)
    assert got.dtype == torch.float16 and got.shape == expected.shape and got.is_contiguous()
    tol = 1e-2 * float(expected.abs().max())
    torch.testing.assert_close(got.float().cpu(), expected, rtol=1e-2, atol=tol)

@pytest.mark.parametrize("rows", [1, 8, 40])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_fused_linear_on_the_gpu_takes_column_major_and_3d_inputs(precision, rows):
    """What a CUDA graph holds for an aligned quantized linear layer (quantized_ops.fused_linear), on
    inputs as graphs give them: column-major (x.t(), a transposed feature map) and 3-D, against the
    reference; eagerly and through Inductor."""
    from torchtrt_ext.core.quantized_ops import fused_linear

    fmt, w, b, qw, scales = _layer(precision, 48, 64)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(64, rows, generator=g).t()  # (rows, 64), column-major
    x3 = torch.randn(1, 64, rows, generator=g).transpose(1, 2)  # (1, rows, 64): a transposed feature map
    x_scale = quantize.activation_scale(float(x.abs().max()), fmt)
    x_scale = max(x_scale, quantize.activation_scale(float(x3.abs().max()), fmt))
    args = (qw.cuda(), scales.cuda(), x_scale, b.cuda(), torch.bfloat16)
    for xc in (x, x3):
        xg = xc.cuda().to(torch.bfloat16)  # .cuda() and .to keep the strides
        assert rows == 1 or not xg.is_contiguous()  # one row: contiguous whatever its strides
        expected = quantize.linear_reference(xc.to(torch.bfloat16), qw, scales, x_scale, b, fmt, torch.float32)
        tol = 1e-2 * float(expected.abs().max())
        got = fused_linear(xg, *args)
        torch.testing.assert_close(got.float().cpu(), expected, rtol=1e-2, atol=tol)
        # through Inductor as an engine compiles it (a traced graph handed to compile_fx)
        gm = torch.fx.experimental.proxy_tensor.make_fx(lambda t: fused_linear(t, *args))(xg)
        out = torch._inductor.compile(gm, [xg])(xg)
        out = out[0] if isinstance(out, (list, tuple)) else out
        torch.testing.assert_close(out.float().cpu(), expected, rtol=1e-2, atol=tol)
