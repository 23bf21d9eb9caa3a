"""The built-in engine on CUDA: half precision, CUDA-graph mode, weights never copied."""

import pytest
import torch

import torchtrt_ext
from tests import zoo

pytestmark = pytest.mark.cuda

HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", ["mlp", "cnn", "encoder", "multi_io"])
def test_backend_half_precision_matches_eager(name, dtype):
    model = zoo.build(name, "cuda", dtype)
    compiled = torch.compile(model, backend="torchtrt_ext")
    with torch.no_grad():
        for batch in (2, 7):
            args, kwargs = zoo.inputs(name, batch, "cuda", dtype)
            zoo.assert_matches(compiled(*args, **kwargs), model(*args, **kwargs), dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", ["cnn", "encoder"])
def test_wrapper_half_precision_matches_eager(name, dtype):
    model = zoo.build(name, "cuda", dtype)
    compiled = torchtrt_ext.compile(model, zoo.inputs(name, 4, "cuda", dtype)[0])
    with torch.no_grad():
        for batch in (4, 9):
            args, kwargs = zoo.inputs(name, batch, "cuda", dtype)
            zoo.assert_matches(compiled(*args, **kwargs), model(*args, **kwargs), dtype)


class _Wide(torch.nn.Module):
    """Large weights (3 x 64 MiB) and a tiny input: what CUDA-graph mode is for. Large enough that a
    weight copy stands out against what a graph legitimately adds: the cuBLAS workspace of its capture
    stream (32 MiB on Hopper) and its activations."""

    def __init__(self, width: int = 4096):
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(3)])

    def forward(self, x):
        return torch.tanh(self.layers(x))


@pytest.mark.parametrize("entry", ["backend", "wrapper"])
def test_cuda_graphs_match_eager_and_never_copy_the_weights(entry):
    torch.manual_seed(0)
    model = _Wide().cuda().eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randn(2, 4096, device="cuda")
    if entry == "backend":
        compiled = torch.compile(model, backend="torchtrt_ext", options={"cuda_graphs": True}, dynamic=False)
    else:
        compiled = torchtrt_ext.compile(model, (x,), cuda_graphs=True, dynamic_batch=False)
    with torch.no_grad():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(6):  # the first call compiles and records the CUDA graph
            x = torch.randn(2, 4096, device="cuda")
            out = compiled(x).clone()
            zoo.assert_matches(out, model(x), torch.float32)
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before
    assert grown < weight_bytes / 4, f"memory grew by {grown} bytes: weights copied into the CUDA graph?"
    engines = torchtrt_ext.engines_of(model)
    assert engines and all(e.memory().owned_bytes == 0 for e in engines)
    assert sum(e.graphs_captured for e in engines) >= 1


def test_engine_reports_device_memory_shared_with_the_model():
    model = _Wide(512).cuda().eval()
    compiled = torchtrt_ext.compile(model, (torch.randn(2, 512, device="cuda"),))
    mem = compiled.engines[0].memory()
    assert mem.device == torch.device("cuda", torch.cuda.current_device())
    assert mem.weight_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert mem.owned_bytes == 0


def test_cpu_input_to_cuda_engine_is_a_clear_error():
    model = zoo.build("mlp", "cuda")
    compiled = torch.compile(model, backend="torchtrt_ext")
    with torch.no_grad():
        compiled(torch.randn(2, 32, device="cuda"))
        engine = torchtrt_ext.engines_of(model)[0]
        with pytest.raises(torchtrt_ext.InputError, match=r"input 0 is on cpu but the engine runs on cuda:0"):
            engine(torch.randn(2, 32))
