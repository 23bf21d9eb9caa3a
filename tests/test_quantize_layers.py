"""Quantized engines over more than nn.Linear (issue 16): transformers' Conv1D (GPT-2's linear layers,
weight stored (in, out)) and convolutions (Conv1d, Conv2d, Conv3d), through the wrapper and the
backend, on the CPU.

The reference is computed here by hand, independently of core/quantize.py: the model run eagerly in
float32 with each layer's input fake-quantized per tensor (the cache's amax / qmax) and its weight
per output channel (a Conv1D's per column), then the layer's float operation. Each output is compared
element by element within a tolerance that a wrong scale exceeds (checked in the tests themselves),
and by cosine with the float model."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import torchtrt_ext
from tests.test_quantized_engine import compiled_through, cosine
from torchtrt_ext.core import lifting, quantize, quantize_pass
from torchtrt_ext.operations.calibrate import quantizable_layers

PRECISIONS = ["int8", "fp8"]
QMAX = {"int8": 127.0, "fp8": 448.0}


# --- the hand reference ----------------------------------------------------------------------------


def fake_quant(x: torch.Tensor, scale: torch.Tensor, precision: str) -> torch.Tensor:
    """x quantized with `scale` (broadcast against x) and dequantized, in float32: int8 rounds half to
    even within ±127, fp8 (e4m3) saturates at ±448 and rounds as its cast does."""
    y = x.float() / scale
    if precision == "int8":
        y = torch.round(y).clamp(-127, 127)
    else:
        y = y.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return y * scale


def fake_quant_weight(w: torch.Tensor, precision: str, out_dim: int = 0) -> torch.Tensor:
    """Per output channel (`out_dim`): each channel's own amax / qmax (1 for a channel of zeros)."""
    moved = w.detach().float().movedim(out_dim, 0)
    amax = moved.abs().reshape(moved.shape[0], -1).amax(1)
    scale = torch.where(amax > 0, amax / QMAX[precision], torch.ones_like(amax)).view(-1, *[1] * (w.dim() - 1))
    return fake_quant(moved, scale, precision).movedim(0, out_dim)


def fake_quant_input(x: torch.Tensor, amax: float, precision: str) -> torch.Tensor:
    return fake_quant(x, torch.tensor(amax, dtype=torch.float32) / QMAX[precision], precision)


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def hand_reference(model, cache, precision, call, skip=(), scale_error: float = 1.0, wrong_conv1d_axis: bool = False):
    """`call(model)` with every quantizable layer that the cache covers (and not in `skip`) computed from
    fake-quantized input and weight. scale_error multiplies every activation amax, and
    wrong_conv1d_axis quantizes Conv1D weights per row: the mistakes the comparisons must catch."""
    handles = []
    for name, module in quantizable_layers(model).items():
        key = f"{name}:input"
        if key not in cache.entries or key in skip:
            continue
        amax = cache.amax(key) * scale_error

        def hook(mod, args, out, amax=amax):
            x = fake_quant_input(args[0], amax, precision)
            if _is_conv1d(mod):
                w = fake_quant_weight(mod.weight, precision, out_dim=0 if wrong_conv1d_axis else 1)
                y = torch.addmm(mod.bias.float(), x.view(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])
            elif isinstance(mod, torch.nn.Linear):
                y = F.linear(x, fake_quant_weight(mod.weight, precision), mod.bias)
            else:
                assert mod.padding_mode == "zeros"
                conv = (F.conv1d, F.conv2d, F.conv3d)[mod.weight.dim() - 3]
                y = conv(x, fake_quant_weight(mod.weight, precision), mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
            return y.to(out.dtype)

        handles.append(module.register_forward_hook(hook))
    try:
        return call(model)
    finally:
        for h in handles:
            h.remove()


def assert_matches_reference(out, model, cache, precision, call, rel_tol: float, skip=()):
    """out within rel_tol * max|reference| of the hand reference everywhere, and a reference made with
    activation scales off by 3% (or, for Conv1D, weights quantized along the wrong axis) not."""
    expected = hand_reference(model, cache, precision, call, skip=skip)
    tol = rel_tol * float(expected.abs().max())
    torch.testing.assert_close(out, expected, rtol=0, atol=tol)
    wrong = hand_reference(model, cache, precision, call, skip=skip, scale_error=1.03)
    assert float((out - wrong).abs().max()) > tol, "the tolerance would not catch a wrong activation scale"
    if any(_is_conv1d(m) for m in model.modules()):
        wrong = hand_reference(model, cache, precision, call, skip=skip, wrong_conv1d_axis=True)
        assert float((out - wrong).abs().max()) > tol, "the tolerance would not catch Conv1D weights quantized per row"


def quantized_nodes(compiled_or_lifted) -> int:
    gm = compiled_or_lifted.gm
    return sum(1 for n in gm.graph.nodes if n.target in quantize_pass.QUANTIZED_TARGETS)


# --- a small convolutional net ---------------------------------------------------------------------


class ConvNet(torch.nn.Module):
    """Conv2d (plain, strided and grouped with a batch norm, 1x1, even kernel with padding='same'),
    Conv3d (grouped), Conv1d (dilated) and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False)
        self.norm = torch.nn.BatchNorm2d(16)
        self.point = torch.nn.Conv2d(16, 16, 1)
        self.same = torch.nn.Conv2d(16, 12, 2, padding="same")
        self.volume = torch.nn.Conv3d(12, 12, (1, 3, 3), padding=(0, 1, 1), groups=3)
        self.line = torch.nn.Conv1d(12, 8, 3, dilation=2, padding=2)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.norm(self.down(h)))
        h = torch.relu(self.same(self.point(h)))  # one layer's output the next one's input, directly
        h = torch.relu(self.volume(h.unsqueeze(2)).squeeze(2))
        h = torch.relu(self.line(h.flatten(2)))
        return self.head(h.mean(-1))


CONVNET_LAYERS = ["down:input", "head:input", "line:input", "point:input", "same:input", "stem:input", "volume:input"]


def _convnet(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    model = ConvNet().eval()
    model.norm.running_mean.uniform_(-0.5, 0.5)
    model.norm.running_var.uniform_(0.5, 2.0)
    return model


def _images(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def _convnet_cache(model):
    return torchtrt_ext.calibrate(model, [(_images(s),) for s in range(4)], progress=False)


# --- a tiny GPT-2 ----------------------------------------------------------------------------------


def _gpt2(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


GPT2_LAYERS = ["lm_head:input"] + [
    f"transformer.h.{i}.{part}:input" for i in range(2) for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def _gpt2_cache(model):
    return torchtrt_ext.calibrate(model, [{"input_ids": _ids(s)} for s in range(4)], progress=False)


# --- calibration names and the graph pass ----------------------------------------------------------


def test_calibration_names_every_conv1d_and_convolution():
    gpt2 = _gpt2()
    conv1d = [n for n, m in gpt2.named_modules() if _is_conv1d(m)]
    assert len(conv1d) == 8 and set(conv1d) < set(quantizable_layers(gpt2))
    assert _gpt2_cache(gpt2).names() == sorted(GPT2_LAYERS)  # stable names: module path + ':input'
    net = _convnet()
    assert sorted(f"{n}:input" for n in quantizable_layers(net)) == CONVNET_LAYERS
    cache = _convnet_cache(net)
    assert cache.names() == CONVNET_LAYERS
    assert all(cache.amax(name) > 0 for name in CONVNET_LAYERS)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_pass_rewrites_every_conv1d_with_its_weight_transposed(precision):
    model = _gpt2()
    cache = _gpt2_cache(model)
    lifted = lifting.from_export(torch.export.export(model, (), {"input_ids": _ids(0), "use_cache": False}, strict=False))
    assert sum(1 for n in lifted.gm.graph.nodes if n.target is torch.ops.aten.addmm.default) == 8
    quantized, plan = quantize_pass.quantize_graph(lifted, precision, cache, "error")
    targets = [n.target for n in quantized.gm.graph.nodes]
    assert targets.count(quantize_pass.QUANTIZED_LINEAR) == 9 and torch.ops.aten.addmm.default not in targets
    assert plan.layers == tuple(sorted(GPT2_LAYERS))
    fmt = quantize.quant_format(precision)
    by_name = {w.name: i for i, w in enumerate(lifted.weights)}
    for name, module in model.named_modules():
        if not _is_conv1d(module):
            continue
        q_index, s_index = plan.quantized_indices(by_name[f"{name}.weight"])
        q, scales = quantized.weights[q_index].tensor, quantized.weights[s_index].tensor
        assert q.shape == (module.nf, module.weight.shape[0]) and q.is_contiguous() and q.dtype == fmt.dtype
        amax = module.weight.detach().abs().amax(dim=0)  # per column of the (in, out) weight
        torch.testing.assert_close(scales, amax / fmt.qmax, rtol=0, atol=0)
        torch.testing.assert_close(q.float() * scales[:, None], fake_quant_weight(module.weight, precision, 1).t(), rtol=0, atol=0)


def test_the_pass_rewrites_every_convolution_of_an_export_and_a_dynamo_graph():
    model = _convnet()
    cache = _convnet_cache(model)
    x = _images(9)
    lifted = lifting.from_export(torch.export.export(model, (x,), strict=False))
    quantized, plan = quantize_pass.quantize_graph(lifted, "int8", cache, "error")
    targets = [n.target for n in quantized.gm.graph.nodes]
    assert targets.count(quantize_pass.QUANTIZED_CONV) == 6 and targets.count(quantize_pass.QUANTIZED_LINEAR) == 1
    assert not any("conv" in str(t) and t is not quantize_pass.QUANTIZED_CONV for t in targets)
    assert plan.layers == tuple(CONVNET_LAYERS) and len(quantized.weights) == len(lifted.weights) + 2 * 7
    same = next(n for n in quantized.gm.graph.nodes if n.target is quantize_pass.QUANTIZED_CONV and quantize_pass.layer_name(n) == "same:input")
    assert same.args[5:9] == ([1, 1], [0, 1, 0, 1], [1, 1], 1)  # 'same' with a 2x2 kernel: one row and column after

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(quantize_pass.quantize_graph(lifting.from_dynamo(gm, example_inputs), "fp8", cache, "error"))
        return gm.forward

    torch.compile(model, backend=backend)(x)
    ((dynamo_graph, dynamo_plan),) = graphs
    assert dynamo_plan.layers == tuple(CONVNET_LAYERS) and quantized_nodes(dynamo_graph) == 7


# --- the convolutional net compiled ----------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("route", ["wrapper", "backend"])
def test_convnet_matches_the_hand_reference(precision, route):
    model = _convnet()
    cache = _convnet_cache(model)
    x = _images(9)
    compiled = compiled_through(route, model, (x,), {}, precision=precision, calibration=cache, engine="builtin")
    engines = torchtrt_ext.engines_of(model)
    out = compiled(x)
    assert [e.quantization.layers for e in engines] == [tuple(CONVNET_LAYERS)]
    assert_matches_reference(out, model, cache, precision, lambda m: m(x), rel_tol=1e-4)
    assert cosine(out, model(x)) >= 0.99
    assert not torch.equal(out, model(x))
    fmt = quantize.quant_format(precision)
    assert sum(1 for t in engines[0].weight_tensors() if t.dtype == fmt.dtype) == 7


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("route", ["refit", "backend"])
def test_convnet_refit_requantizes_the_new_weights(precision, route):
    model = _convnet()
    cache = _convnet_cache(model)
    x = _images(9)
    options = {"precision": precision, "calibration": cache, "engine": "builtin"}
    compiled = torchtrt_ext.compile(model, (x,), **options) if route == "refit" else torch.compile(model, backend="torchtrt_ext", options=options)
    first = compiled(x)
    new = _convnet(seed=3)
    report = torchtrt_ext.refit(compiled if route == "refit" else model, new.state_dict())
    assert {"stem.weight", "volume.weight", "line.weight", "head.weight"} <= set(report.updated)
    out = compiled(x)
    assert not torch.equal(out, first)
    assert_matches_reference(out, new, cache, precision, lambda m: m(x), rel_tol=1e-4)  # the old cache's scales


def test_a_convolution_without_an_entry_is_named_or_left_at_the_model_dtype(caplog):
    model = _convnet()
    cache = _convnet_cache(model).drop("volume:input")
    x = _images(9)
    with pytest.raises(torchtrt_ext.CalibrationError, match="'volume:input'"):
        torchtrt_ext.compile(model, (x,), precision="int8", calibration=cache)
    with caplog.at_level(logging.WARNING, logger="torchtrt_ext"):
        compiled = torchtrt_ext.compile(model, (x,), precision="int8", calibration=cache, calibration_coverage="warn")
    assert any("volume:input" in r.getMessage() for r in caplog.records)
    plan = compiled.engines[0].quantization
    assert plan.uncovered == ("volume:input",) and len(plan.layers) == 6
    assert_matches_reference(compiled(x), model, cache, "int8", lambda m: m(x), rel_tol=1e-4, skip=("volume:input",))


# --- the tiny GPT-2 compiled -----------------------------------------------------------------------


@pytest.mark.zoo  # a transformers model compiled four times: with the zoo's tests
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("route", ["wrapper", "backend"])
def test_gpt2_matches_the_hand_reference(precision, route):
    model = _gpt2()
    cache = _gpt2_cache(model)
    ids = _ids(10)
    compiled = compiled_through(route, model, (), {"input_ids": ids}, precision=precision, calibration=cache, engine="builtin")
    out = compiled(input_ids=ids).logits
    plans = [e.quantization for e in torchtrt_ext.engines_of(model)]
    assert sorted(name for p in plans for name in p.layers) == sorted(GPT2_LAYERS)  # 8 Conv1D + lm_head
    # Inductor's norms and GELU round unlike eager's by an ulp, which can move an activation across a
    # quantization step: within a small fraction of the logits' range
    assert_matches_reference(out, model, cache, precision, lambda m: m(input_ids=ids).logits, rel_tol=1e-3)
    assert cosine(out, model(input_ids=ids).logits) >= 0.99


@pytest.mark.zoo
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpt2_refit_requantizes_conv1d_weights_transposed(precision):
    model = _gpt2()
    cache = _gpt2_cache(model)
    ids = _ids(10)
    compiled = torchtrt_ext.compile(model, example_kwargs={"input_ids": ids}, precision=precision, calibration=cache)
    first = compiled(input_ids=ids).logits
    new = _gpt2(seed=4)
    torchtrt_ext.refit(compiled, new.state_dict())
    out = compiled(input_ids=ids).logits
    assert not torch.equal(out, first)
    assert_matches_reference(out, new, cache, precision, lambda m: m(input_ids=ids).logits, rel_tol=1e-3)


@pytest.mark.zoo
@pytest.mark.parametrize("precision", PRECISIONS)
def test_transformers_resnet_quantizes_every_convolution(precision):
    """The zoo's ResNet (transformers' where timm is missing), tiny: every Conv2d quantized."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], embedding_size=8)
    model = transformers.ResNetModel(config).eval()
    convs = [f"{n}:input" for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    cache = torchtrt_ext.calibrate(model, [{"pixel_values": torch.randn(2, 3, 32, 32)} for _ in range(4)], progress=False)
    assert cache.names() == sorted(convs) and len(convs) > 10
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    compiled = torchtrt_ext.compile(model, example_kwargs={"pixel_values": x}, precision=precision, calibration=cache)
    assert compiled.engines[0].quantization.layers == tuple(sorted(convs))
    out = compiled(pixel_values=x).last_hidden_state
    call = lambda m: m(pixel_values=x).last_hidden_state  # noqa: E731
    assert_matches_reference(out, model, cache, precision, call, rel_tol=1e-3)
    assert cosine(out, call(model)) >= 0.99


# --- the op ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantized_conv_is_one_op_for_export_and_inductor(precision):
    fmt = quantize.quant_format(precision)
    torch.manual_seed(0)
    w, b = torch.randn(6, 4, 2, 3), torch.randn(6)
    q, scales = quantize.quantize_weight(w, fmt)

    class Quantized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("q", q)
            self.register_buffer("scales", scales)
            self.register_buffer("b", b)

        def forward(self, x):
            y = torch.ops.torchtrt_ext.quantized_conv(x, self.q, self.scales, 0.02, self.b, [1, 1], [0, 1, 1, 1], [1, 1], 1, torch.float32)
            return y.relu()

    model = Quantized()
    x = torch.randn(2, 4, 7, 8)
    expected = model(x)
    assert expected.shape == F.conv2d(x, w, b, padding="same").shape
    hand = F.conv2d(fake_quant_input(x, 0.02 * QMAX[precision], precision), fake_quant_weight(w, precision), b, padding="same")
    torch.testing.assert_close(expected, hand.relu(), rtol=0, atol=1e-5)
    ep = torch.export.export(model, (x,))
    assert torch.ops.torchtrt_ext.quantized_conv.default in [n.target for n in ep.graph.nodes]
    assert torch.equal(ep.module()(x), expected)
    torch.testing.assert_close(torch.compile(model)(x), expected, rtol=0, atol=0)


def test_quantized_conv_names_wrong_arguments():
    q, scales = quantize.quantize_weight(torch.randn(6, 4, 3, 3), quantize.quant_format("int8"))
    conv = torch.ops.torchtrt_ext.quantized_conv
    with pytest.raises(ValueError, match=r"an input of shape \(4, 5\) for a weight of shape \(6, 4, 3, 3\) in 1 group"):
        conv(torch.randn(4, 5), q, scales, 0.1, None, [1, 1], [0, 0], [1, 1], 1, torch.float32)
    with pytest.raises(ValueError, match=r"an input of shape \(2, 4, 5, 5\) for a weight of shape \(6, 4, 3, 3\) in 2 group"):
        conv(torch.randn(2, 4, 5, 5), q, scales, 0.1, None, [1, 1], [0, 0], [1, 1], 2, torch.float32)
    with pytest.raises(ValueError, match=r"stride \[1\], dilation \[1, 1\] and padding \[0, 0\] for 2 spatial"):
        conv(torch.randn(2, 4, 5, 5), q, scales, 0.1, None, [1], [0, 0], [1, 1], 1, torch.float32)
    with pytest.raises(ValueError, match="the weight is torch.float32; it must be int8 or float8_e4m3fn"):
        conv(torch.randn(2, 4, 5, 5), q.float(), scales, 0.1, None, [1, 1], [0, 0], [1, 1], 1, torch.float32)
    with pytest.raises(ValueError, match=r"bias of shape \(5,\) for 6 outputs"):
        conv(torch.randn(2, 4, 5, 5), q, scales, 0.1, torch.randn(5), [1, 1], [0, 0], [1, 1], 1, torch.float32)
