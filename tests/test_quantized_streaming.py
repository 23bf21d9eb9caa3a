"""Weight streaming of quantized engines on the CPU (issue 16: "weight streaming moves the quantized bytes"):
the segmented program with synchronous copies, what the CUDA path runs less the streams. The program's
weights are the quantized ones and their scales; a float weight that no layer reads any more is neither
streamed nor resident nor counted; outputs equal the resident quantized engine's, bit for bit, at every
budget and after a refit. The CUDA path: tests/test_quantized_cuda.py."""

from __future__ import annotations

import pytest
import torch

import torchtrt_ext
from torchtrt_ext.core import lifting, quantize
from torchtrt_ext.core.settings import Settings
from torchtrt_ext.engines.builtin import BuiltinEngine
from torchtrt_ext.engines.streamed import StreamedEngine

PRECISIONS = ["int8", "fp8"]
BUDGETS = (0, 25, 50, 100)
WIDTH, DEPTH = 256, 4


class Stack(torch.nn.Module):
    def __init__(self, width: int = WIDTH, depth: int = DEPTH):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class TiedHead(torch.nn.Module):
    """An embedding whose weight the output layer reads too: the head computes quantized, the embedding
    still reads the float weight, which stays the program's."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32)
        self.mid = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.embed(ids))))


def _stack(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Stack().eval().to(dtype)


def _x(dtype=torch.float32, seed=1):
    return (torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)


def _calibrated(model, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return torchtrt_ext.calibrate(model, [((torch.randn(4, WIDTH, generator=g) * 2).to(dtype),) for _ in range(4)], progress=False)


def _engines(model, args, settings):
    """(the streaming engine on the CPU at budget 0, the resident engine) of one exported graph."""
    ep = torch.export.export(model, args, strict=False)
    streamed = StreamedEngine(
        lifting.from_export(ep), settings.replace(weight_streaming=True, weight_streaming_budget=0), torch.device("cpu"), 4
    )
    return streamed, BuiltinEngine(lifting.from_export(ep), settings)


def _nbytes(t):
    return t.numel() * t.element_size()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_streamed_bytes_are_the_quantized_weights_about_half_of_fp16(precision):
    model = _stack(torch.float16)
    x = _x(torch.float16)
    plain, _ = _engines(model, (x,), Settings(engine="builtin"))
    quantized, _ = _engines(model, (x,), Settings(engine="builtin", precision=precision, calibration=_calibrated(model, torch.float16)))
    fp16 = sum(_nbytes(p) for p in model.parameters())
    assert plain.total_bytes == plain.streamed_bytes == fp16
    # each layer: its weight at one byte, float32 scales per output channel, its float16 bias
    expected = DEPTH * (WIDTH * WIDTH * 1 + WIDTH * 4 + WIDTH * 2)
    assert quantized.total_bytes == quantized.streamed_bytes == expected
    assert 0.45 < quantized.total_bytes / plain.total_bytes < 0.55
    fmt = quantize.quant_format(precision)
    # the program's weights (what it streams or keeps resident): the quantized ones, their scales, the biases
    program = quantized.placement.streamed[0] + [w for seg in quantized.placement.streamed[1:] for w in seg]
    assert sorted(program) == list(range(3 * DEPTH))
    # the float weights stay the engine's weights by name (what a refit checks), as the model's own tensors
    weights = quantized.named_weights()
    for i, layer in enumerate(model.layers):
        assert weights[f"layers.{i}.weight"].data_ptr() == layer.weight.data_ptr()
    assert sorted((str(t.dtype), tuple(t.shape)) for t in quantized.quantized_weights().values()) == sorted(
        [(str(fmt.dtype), (WIDTH, WIDTH)), ("torch.float32", (WIDTH,))] * DEPTH
    )
    for budget in (0, expected // 2, expected):
        placement = quantized.place(budget)
        assert placement.resident_bytes <= budget
        assert quantized.streamed_bytes == expected - placement.resident_bytes
        assert quantized.memory().weight_bytes == placement.resident_bytes  # no ring before a call


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_streamed_outputs_equal_the_resident_quantized_engine_at_every_budget_and_after_a_refit(precision, dtype):
    model = _stack(dtype)
    cache = _calibrated(model, dtype)
    x = _x(dtype)
    streamed, resident = _engines(model, (x,), Settings(engine="builtin", precision=precision, calibration=cache))
    assert streamed.segment_count >= 2
    assert streamed.quantization == resident.quantization and len(streamed.quantization.sources) == DEPTH
    expected = resident(x)[0]
    assert not torch.equal(expected, model(x))  # quantized, not the float model
    original = {k: v.clone() for k, v in model.state_dict().items()}  # the refits write the model's tensors
    new = _stack(dtype, seed=7).state_dict()
    for percent in BUDGETS:
        streamed.place(streamed.total_bytes * percent // 100)
        assert torch.equal(streamed(x)[0], expected), percent
        torchtrt_ext.refit(streamed, new)  # re-quantized into the host masters and the resident copies
        torchtrt_ext.refit(resident, new)
        out = streamed(x)[0]
        assert torch.equal(out, resident(x)[0]) and not torch.equal(out, expected), percent
        for name, t in resident.quantized_weights().items():
            assert torch.equal(streamed.quantized_weights()[name].view(torch.uint8), t.view(torch.uint8)), name
        torchtrt_ext.refit(streamed, original)
        torchtrt_ext.refit(resident, original)
        assert torch.equal(streamed(x)[0], expected)


def test_a_float_weight_another_layer_still_reads_is_streamed_with_its_quantized_copy():
    torch.manual_seed(0)
    model = TiedHead().eval()
    g = torch.Generator().manual_seed(3)
    cache = torchtrt_ext.calibrate(model, [(torch.randint(0, 64, (2, 5), generator=g),) for _ in range(4)], progress=False)
    assert cache.names() == ["head:input", "mid:input"]
    ids = torch.randint(0, 64, (2, 5), generator=g)
    streamed, resident = _engines(model, (ids,), Settings(engine="builtin", precision="int8", calibration=cache))
    assert len(streamed.quantization.sources) == 2
    embed = 64 * 32 * 4  # the tied float weight: the embedding reads it
    mid_bias = 32 * 4
    quantized = (64 * 32 + 64 * 4) + (32 * 32 + 32 * 4)  # head's and mid's int8 weights and scales
    assert streamed.total_bytes == embed + mid_bias + quantized  # mid's float weight is read by nothing
    assert streamed.named_weights()["mid.weight"].data_ptr() == model.mid.weight.data_ptr()
    assert streamed.named_weights()["embed.weight"].data_ptr() != model.embed.weight.data_ptr()  # a host master
    for percent in BUDGETS:
        streamed.place(streamed.total_bytes * percent // 100)
        assert torch.equal(streamed(ids)[0], resident(ids)[0]), percent
    torch.manual_seed(5)
    new = TiedHead().eval().state_dict()
    torchtrt_ext.refit(streamed, new)
    torchtrt_ext.refit(resident, new)
    assert torch.equal(streamed(ids)[0], resident(ids)[0])


class _GainThenLayers(torch.nn.Module):
    """A norm and a large elementwise weight (no quantized layer: a segment of its own when streamed),
    then two quantized layers."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.rand(256, 256) + 0.5)
        self.c, self.d = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)

    def forward(self, x):
        h = x.float()
        h = self.gain * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        return self.d(torch.relu(self.c(h)))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_segment_without_quantized_layers_rounds_as_the_resident_engine(precision):
    """An engine decides its rounding once (core/inductor.config_patches): a streamed segment that
    quantizes nothing still rounds its bfloat16 casts as the resident engine's graph does, or the next
    segment's quantization moves by whole steps."""
    torch.manual_seed(0)
    model = _GainThenLayers().eval().to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    cache = torchtrt_ext.calibrate(model, [((torch.randn(256, 256, generator=g) * 2).to(torch.bfloat16),) for _ in range(4)], progress=False)
    x = (torch.randn(256, 256, generator=g) * 2).to(torch.bfloat16)
    settings = Settings(engine="builtin", precision=precision, calibration=cache)
    ep = torch.export.export(model, (x,), strict=False)
    streamed = StreamedEngine(
        lifting.from_export(ep), settings.replace(weight_streaming=True, weight_streaming_budget=0), torch.device("cpu"), 3
    )
    resident = BuiltinEngine(lifting.from_export(ep), settings)
    assert streamed.segment_count == 3
    expected = resident(x)[0]
    assert expected.abs().sum() > 0 and torch.equal(streamed(x)[0], expected)
