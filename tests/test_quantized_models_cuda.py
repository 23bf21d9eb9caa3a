"""Issue 16 on the GPU, whole models: one calibration cache file gives the same quantized engine
weights on the CPU and on the GPU, and a tiny Llama's quantized logits on the GPU match the CPU's (their
own file, so that the CUDA suite's files run in parallel: the model compiles dominate). The kernels'
own tests: tests/test_quantized_cuda.py."""

import pytest
import torch

import torchtrt_ext
from torchtrt_ext import CalibrationCache
from torchtrt_ext.core import quantize

pytestmark = pytest.mark.cuda

PRECISIONS = ["int8", "fp8"]


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 256)
        self.down = torch.nn.Linear(256, 32)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_one_cache_file_gives_the_same_engine_weights_on_cpu_and_gpu(precision, tmp_path):
    torch.manual_seed(0)
    model = _MLP().eval()
    g = torch.Generator().manual_seed(6)
    cache = torchtrt_ext.calibrate(model, [(torch.randn(8, 64, generator=g),) for _ in range(8)], progress=False)
    path = tmp_path / "mlp.calib"
    cache.save(str(path))
    x = torch.randn(8, 64, generator=g)
    on_cpu = torchtrt_ext.compile(model, (x,), precision=precision, calibration=str(path), engine="builtin")
    gpu_model = _MLP().eval()
    gpu_model.load_state_dict(model.state_dict())
    on_gpu = torchtrt_ext.compile(gpu_model.cuda(), (x.cuda(),), precision=precision, calibration=str(path), engine="builtin")
    fmt = quantize.quant_format(precision)
    cpu_q = [t for t in on_cpu.engines[0].weight_tensors() if t.dtype == fmt.dtype]
    gpu_q = [t for t in on_gpu.engines[0].weight_tensors() if t.dtype == fmt.dtype]
    assert len(cpu_q) == len(gpu_q) == 2
    for a, b in zip(cpu_q, gpu_q):  # the same weights, quantized on either: the same bits
        assert b.device.type == "cuda" and torch.equal(a.view(torch.uint8), b.cpu().view(torch.uint8))
    assert on_gpu.engines[0].quantization.layers == on_cpu.engines[0].quantization.layers
    out_gpu, out_cpu = on_gpu(x.cuda()).cpu(), on_cpu(x)
    tol = 2e-2 if precision == "fp8" else 1e-3  # fp8's product leaves _scaled_mm in bfloat16
    torch.testing.assert_close(out_gpu, out_cpu, rtol=tol, atol=tol * float(out_cpu.abs().max()))
    assert CalibrationCache.load(str(path)).amax("up:input") == cache.amax("up:input")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_tiny_llama_on_the_gpu_matches_the_cpu_reference(precision):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randint(0, 256, (2, 16), generator=g),) for _ in range(8)]
    cache = torchtrt_ext.calibrate(model, batches, progress=False)
    ids = torch.randint(0, 256, (2, 16), generator=g)
    on_cpu = torchtrt_ext.compile(model, precision=precision, calibration=cache, engine="builtin")
    expected = on_cpu(ids).logits
    gpu_model = transformers.LlamaForCausalLM(config).eval()
    gpu_model.load_state_dict(model.state_dict())
    on_gpu = torchtrt_ext.compile(gpu_model.cuda(), precision=precision, calibration=cache, engine="builtin")
    got = on_gpu(ids.cuda()).logits.cpu()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
    assert cosine > 0.999, cosine
    float_logits = model(ids).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), float_logits.flatten(), dim=0).item() > 0.99
