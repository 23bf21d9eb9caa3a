"""Issue 16 on the GPU: weight streaming of quantized engines moves the quantized bytes, and equals the
resident quantized engine (its own file, so that the CUDA suite's files run in parallel: the engines'
compiles dominate). The CPU's part: tests/test_quantized_streaming.py."""

import pytest
import torch

import torchtrt_ext
from tests.test_quantized_streaming import Stack

pytestmark = pytest.mark.cuda

PRECISIONS = ["int8", "fp8"]


def _stack(seed):
    torch.manual_seed(seed)
    return Stack(width=1024).eval()  # the CPU tests' stack, at a size the GPU's products take


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "cuda_graphs"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_weight_streaming_moves_the_quantized_bytes_and_equals_the_resident_engine(precision, cuda_graphs):
    """The model stays on the host in float16; the streamed engine copies the quantized weights and their
    scales (about half of float16's bytes, none of the float weights) and computes, at every budget and
    after a refit or a change of the model's own weights, what the resident quantized engine computes."""
    g = torch.Generator().manual_seed(11)
    cache = torchtrt_ext.calibrate(_stack(0), [(torch.randn(16, 1024, generator=g),) for _ in range(4)], progress=False)
    host = _stack(0).half()
    x = torch.randn(16, 1024, generator=g).to("cuda", torch.float16)
    options = dict(precision=precision, calibration=cache, engine="builtin", dynamic_batch=False)
    resident_model = _stack(0).half().cuda()
    resident = torchtrt_ext.compile(resident_model, (x,), **options)
    plain = torchtrt_ext.compile(_stack(0).half(), (x,), weight_streaming=True, weight_streaming_budget=0, dynamic_batch=False)
    streamed = torchtrt_ext.compile(host, (x,), weight_streaming=True, weight_streaming_budget=0, cuda_graphs=cuda_graphs, **options)
    ws, ws16 = torchtrt_ext.weight_streaming(streamed), torchtrt_ext.weight_streaming(plain)
    expected_bytes = 4 * (1024 * 1024 + 1024 * 4 + 1024 * 2)  # per layer: the 1-byte weight, float32 scales, the float16 bias
    assert ws16.total_bytes == sum(p.numel() * 2 for p in host.parameters())
    assert ws.total_bytes == expected_bytes and 0.45 < ws.total_bytes / ws16.total_bytes < 0.55
    engine = streamed.engines[0]
    assert engine.streamed_bytes == expected_bytes  # budget 0: every byte streams
    assert all(t.device.type == "cpu" for t in engine.named_weights().values())  # the float weights stay the host model's
    with torch.no_grad():
        expected = resident(x)
        for percent in (0, 50, 100):
            ws.device_budget = f"{percent}%"
            assert engine.streamed_bytes == expected_bytes - ws.resident_bytes
            for _ in range(3):  # cuda_graphs: captured, then replayed
                assert torch.equal(streamed(x), expected), percent
        new = _stack(3).half().state_dict()
        torchtrt_ext.refit(streamed, new)
        torchtrt_ext.refit(resident, new)
        assert torch.equal(streamed(x), resident(x)) and not torch.equal(streamed(x), expected)
        host.layers[1].weight.mul_(0.5)  # the model's own change, followed: re-quantized and streamed
        resident_model.layers[1].weight.mul_(0.5)
        assert torch.equal(streamed(x), resident(x))
        eager = resident_model(x)  # the float model (the same weights as the host's), run eagerly
        cosine = torch.nn.functional.cosine_similarity(streamed(x).float().flatten(), eager.float().flatten(), dim=0)
    assert cosine.item() > 0.99


