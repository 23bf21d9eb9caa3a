"""Quantized engines on the CPU (issue 16): precision='int8'|'fp8' with a calibration cache, through the
wrapper and the backend. Each output is compared element by element with the model run eagerly with
every covered Linear replaced by quantize.linear_reference, and with the float model (cosine >= 0.99)."""

from __future__ import annotations

import logging

import pytest
import torch
import torchtrt_ext
from torchtrt_ext import CalibrationCache, CalibrationError, OptionError
from torchtrt_ext.core import lifting, quantize, quantize_pass

PRECISIONS = ["int8", "fp8"]


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 64)
        self.mid = torch.nn.Linear(64, 32, bias=False)
        self.down = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


MLP_LAYERS = ["down:input", "mid:input", "up:input"]


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def _mlp_batches(n: int = 8) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 16, generator=g),) for _ in range(n)]


def _mlp_input() -> torch.Tensor:
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(2))


def _llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    return transformers.LlamaForCausalLM(config).eval()


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(seed))


def _cache(model, batches) -> CalibrationCache:
    return torchtrt_ext.calibrate(model, batches, progress=False)


def reference(model: torch.nn.Module, cache: CalibrationCache, precision: str, call, skip=()):
    """`call(model)` with each Linear that the cache covers (and not in `skip`) computing
    quantize.linear_reference: per-channel weights, the cache's per-tensor activation scale."""
    fmt = quantize.quant_format(precision)
    handles = []
    for name, module in model.named_modules():
        key = f"{name}:input"
        if isinstance(module, torch.nn.Linear) and key in cache.entries and key not in skip:
            q, scales = quantize.quantize_weight(module.weight, fmt)
            x_scale = quantize.activation_scale(cache.amax(key), fmt, key)

            def hook(mod, args, out, q=q, scales=scales, x_scale=x_scale):
                return _linear_reference(args[0], q, scales, x_scale, mod.bias, fmt, args[0].dtype)

            handles.append(module.register_forward_hook(hook))
    try:
        return call(model)
    finally:
        for h in handles:
            h.remove()


def compiled_through(route: str, model: torch.nn.Module, args: tuple, kwargs: dict, **options):
    """model compiled through one entry point ('wrapper' or 'backend') and called once with (args, kwargs):
    its engines are built."""
    if route == "wrapper":
        return torchtrt_ext.compile(model, args, kwargs, **options)
    compiled = torch.compile(model, backend="torchtrt_ext", options=options)
    compiled(*args, **kwargs)
    return compiled


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


_linear_reference = quantize.linear_reference


@pytest.fixture
def counter(monkeypatch):
    """Counts the quantized_linear calls that run: the op's CPU implementation calls
    quantize.linear_reference once per call."""

    class Counter:
        calls = 0

    def counted(*args, **kwargs):
        Counter.calls += 1
        return _linear_reference(*args, **kwargs)

    monkeypatch.setattr(quantize, "linear_reference", counted)
    return Counter


def _graph_count(model, args, cache, precision, coverage="error") -> int:
    """quantized_linear nodes the pass puts into the model's exported, lifted graph."""
    lifted = lifting.from_export(torch.export.export(model, args, strict=False))
    quantized, _ = quantize_pass.quantize_graph(lifted, precision, cache, coverage)
    return sum(1 for n in quantized.gm.graph.nodes if n.target is quantize_pass.QUANTIZED_LINEAR)


# --- the MLP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_mlp_wrapper_matches_reference_arithmetic(precision, counter):
    model = _mlp()
    cache = _cache(model, _mlp_batches())
    assert cache.names() == MLP_LAYERS
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _mlp_input()
    compiled = torchtrt_ext.compile(model, (x,), precision=precision, calibration=cache, engine="builtin")
    counter.calls = 0
    out = compiled(x)
    assert counter.calls == 3  # one per Linear, every call
    expected = reference(model, cache, precision, lambda m: m(x))
    assert torch.equal(out, expected)  # ReLU and the op's own arithmetic: bit for bit
    assert cosine(out, model(x)) >= 0.99
    assert not torch.equal(out, model(x))  # quantized, not the float model
    plan = compiled.engines[0].quantization
    assert plan.layers == tuple(MLP_LAYERS) and plan.uncovered == ()
    assert _graph_count(model, (x,), cache, precision) == 3
    for k, v in model.state_dict().items():  # the model's weights stay as they were
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])
    quantized = [t for t in compiled.engines[0].weight_tensors() if t.dtype == quantize.quant_format(precision).dtype]
    assert len(quantized) == 3


@pytest.mark.parametrize("precision", PRECISIONS)
def test_mlp_backend_matches_reference_arithmetic(precision, counter):
    model = _mlp()
    cache = _cache(model, _mlp_batches())
    x = _mlp_input()
    compiled = torch.compile(model, backend="torchtrt_ext", options={"precision": precision, "calibration": cache, "engine": "builtin"})
    compiled(x)  # compiles
    counter.calls = 0
    out = compiled(x)
    assert counter.calls == 3
    assert torch.equal(out, reference(model, cache, precision, lambda m: m(x)))
    assert cosine(out, model(x)) >= 0.99
    (engine,) = torchtrt_ext.engines_of(model)
    assert engine.quantization.layers == tuple(MLP_LAYERS)


def test_int8_and_fp8_differ_and_model_precision_quantizes_nothing(counter):
    model = _mlp()
    cache = _cache(model, _mlp_batches())
    x = _mlp_input()
    outs = {p: torchtrt_ext.compile(model, (x,), precision=p, calibration=cache, engine="builtin")(x) for p in PRECISIONS}
    assert not torch.equal(outs["int8"], outs["fp8"])
    plain = torchtrt_ext.compile(model, (x,), precision=None, engine="builtin")
    assert plain.engines[0].quantization is None
    counter.calls = 0
    torch.testing.assert_close(plain(x), model(x))
    assert counter.calls == 0


def test_calibration_from_a_saved_file(tmp_path):
    model = _mlp()
    cache = _cache(model, _mlp_batches())
    path = tmp_path / "mlp.calib"
    cache.save(path)
    x = _mlp_input()
    from_path = torchtrt_ext.compile(model, (x,), precision="int8", calibration=str(path), engine="builtin")
    from_object = torchtrt_ext.compile(model, (x,), precision="int8", calibration=cache, engine="builtin")
    assert torch.equal(from_path(x), from_object(x))


# --- a tiny Llama ----------------------------------------------------------------------------------


@pytest.mark.zoo  # a transformers model: with the zoo's tests (the main suite stays within CI's time)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("route", ["wrapper", "backend"])
def test_llama_matches_reference_arithmetic(precision, route, counter):
    model = _llama()
    cache = _cache(model, [{"input_ids": _ids(seed)} for seed in range(4)])
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 15 and sorted(f"{n}:input" for n in linears) == cache.names()
    ids = _ids(10)
    compiled = compiled_through(route, model, (), {"input_ids": ids}, precision=precision, calibration=cache, engine="builtin")
    counter.calls = 0
    out = compiled(input_ids=ids).logits
    assert counter.calls == 15
    expected = reference(model, cache, precision, lambda m: m(input_ids=ids).logits)
    # Inductor's own kernels (norms, softmax, rotary) round unlike eager's by an ulp or so, which can move
    # an activation across a quantization step: element-wise within a small fraction of the logits' range.
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-3 * float(expected.abs().max()))
    assert cosine(out, model(input_ids=ids).logits) >= 0.99
    plans = [e.quantization for e in torchtrt_ext.engines_of(model)]
    assert sorted(name for p in plans for name in p.layers) == cache.names()


def test_llama_graph_holds_one_quantized_linear_per_layer():
    model = _llama()
    cache = _cache(model, [{"input_ids": _ids(seed)} for seed in range(2)])
    lifted = lifting.from_export(torch.export.export(model, (), {"input_ids": _ids(0), "use_cache": False}, strict=False))
    linear_nodes = sum(1 for n in lifted.gm.graph.nodes if n.target in quantize_pass.LINEAR_TARGETS)
    quantized, plan = quantize_pass.quantize_graph(lifted, "fp8", cache, "error")
    targets = [n.target for n in quantized.gm.graph.nodes]
    assert linear_nodes == 15
    assert targets.count(quantize_pass.QUANTIZED_LINEAR) == 15
    assert not any(t in quantize_pass.LINEAR_TARGETS for t in targets)
    assert len(quantized.weights) == len(lifted.weights) + 2 * 15
    assert sum(1 for n in lifted.gm.graph.nodes if n.target is quantize_pass.QUANTIZED_LINEAR) == 0  # a copy


# --- never silent ----------------------------------------------------------------------------------


def test_missing_entry_is_an_error_naming_the_layer():
    model = _mlp()
    cache = _cache(model, _mlp_batches()).drop("mid:input")
    with pytest.raises(CalibrationError, match=r"no amax for 1 tensor\(s\) the engine quantizes: 'mid:input'.*calibration_coverage='warn'"):
        torchtrt_ext.compile(model, (_mlp_input(),), precision="int8", calibration=cache, engine="builtin")
    compiled = torch.compile(model, backend="torchtrt_ext", options={"precision": "fp8", "calibration": cache, "engine": "builtin"})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="'mid:input'") as e:
        compiled(_mlp_input())
    assert isinstance(e.value.inner_exception, CalibrationError)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_coverage_warn_leaves_uncovered_layers_at_the_model_dtype(precision, caplog, counter):
    model = _mlp()
    cache = _cache(model, _mlp_batches()).drop("mid:input")
    x = _mlp_input()
    with caplog.at_level(logging.WARNING, logger="torchtrt_ext"):
        compiled = torchtrt_ext.compile(
            model, (x,), precision=precision, calibration=cache, calibration_coverage="warn", engine="builtin"
        )
    assert any("no amax for 1 layer(s) of 3" in r.getMessage() and "mid:input" in r.getMessage() for r in caplog.records)
    plan = compiled.engines[0].quantization
    assert plan.uncovered == ("mid:input",) and plan.layers == ("down:input", "up:input")
    counter.calls = 0
    out = compiled(x)
    assert counter.calls == 2
    assert torch.equal(out, reference(model, cache, precision, lambda m: m(x)))  # mid ran in float32
    fully = reference(model, _cache(model, _mlp_batches()), precision, lambda m: m(x))
    assert not torch.equal(out, fully)
    assert _graph_count(model, (x,), cache, precision, coverage="warn") == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_non_finite_or_non_positive_amax_is_an_error(bad):
    model = _mlp()
    cache = _cache(model, _mlp_batches())
    with pytest.raises(CalibrationError, match="up:input"):
        CalibrationCache({**cache.entries, "up:input": bad})
    cache.entries["up:input"] = bad  # changed after the cache checked it
    with pytest.raises(CalibrationError, match=r"amax of up:input is .*finite and positive"):
        torchtrt_ext.compile(model, (_mlp_input(),), precision="int8", calibration=cache, engine="builtin")


def test_bad_amax_in_a_file_is_an_error_with_its_line(tmp_path):
    model = _mlp()
    text = _cache(model, _mlp_batches()).dumps().splitlines()
    text[-1] = "nan " + text[-1].split(" ", 1)[1]
    path = tmp_path / "bad.calib"
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(CalibrationError, match="line 8"):
        torchtrt_ext.compile(model, (_mlp_input(),), precision="int8", calibration=str(path), engine="builtin")


def test_fingerprint_mismatch_is_an_error():
    model = _mlp()
    cache = _cache(model, _mlp_batches())
    other = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    renamed = CalibrationCache({"0:input": 1.0}, model_fingerprint=cache.model_fingerprint)
    with pytest.raises(CalibrationError, match="recorded for another model.*calibrate this model"):
        torchtrt_ext.compile(other, (_mlp_input(),), precision="int8", calibration=renamed, engine="builtin")
    # a cache without a fingerprint (TensorRT's format) is taken by its names
    anonymous = CalibrationCache({"0:input": 1.0})
    torchtrt_ext.compile(other, (_mlp_input(),), precision="int8", calibration=anonymous, engine="builtin")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_cache_recorded_in_float32_serves_the_bfloat16_model(precision):
    """Calibrate once in float32, deploy in another dtype: the fingerprint is the structure and the
    shapes, not the dtype."""
    model = _mlp()
    cache = _cache(model, _mlp_batches())
    low = _mlp().to(torch.bfloat16)
    x = _mlp_input().to(torch.bfloat16)
    compiled = torchtrt_ext.compile(low, (x,), precision=precision, calibration=cache, engine="builtin")
    out = compiled(x)
    assert out.dtype == torch.bfloat16
    expected = reference(low, cache, precision, lambda m: m(x))
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert cosine(out, low(x)) >= 0.99


def test_schema_version_mismatch_is_an_error(tmp_path):
    model = _mlp()
    path = tmp_path / "v2.calib"
    path.write_text(_cache(model, _mlp_batches()).dumps().replace("calibration cache 1\n", "calibration cache 2\n", 1))
    with pytest.raises(CalibrationError, match="schema version 2"):
        torchtrt_ext.compile(model, (_mlp_input(),), precision="fp8", calibration=str(path), engine="builtin")
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="schema version 2") as e:
        torch.compile(model, backend="torchtrt_ext", options={"precision": "fp8", "calibration": str(path)})(_mlp_input())
    assert isinstance(e.value.inner_exception, CalibrationError)


# --- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"precision": "int4"}, "option 'precision' must be one of 'model', 'int8', 'fp8', got 'int4'"),
        ({"precision": "int8"}, "precision='int8' needs calibration=: a CalibrationCache"),
        ({"calibration": CalibrationCache({"a:input": 1.0})}, "option 'calibration' applies only with precision 'int8' or 'fp8'"),
        ({"calibration_coverage": "warn"}, "option 'calibration_coverage' applies only with precision"),
        ({"precision": "fp8", "calibration": 3}, "option 'calibration' must be a CalibrationCache, the path of a saved one, or None, got int 3"),
        ({"precision": "fp8", "calibration": "/no/such.calib"}, "option 'calibration': no file '/no/such.calib'"),
        (
            {"precision": "fp8", "calibration": CalibrationCache({"a:input": 1.0}), "calibration_coverage": "ignore"},
            "option 'calibration_coverage' must be one of 'error', 'warn', got 'ignore'",
        ),
        (
            {"precision": "int8", "calibration": CalibrationCache({"a:input": 1.0}), "engine": "tensorrt"},
            "option 'engine' does not go with precision='int8'",
        ),
    ],
)
def test_bad_quantization_options_name_the_option(options, message):
    with pytest.raises(OptionError) as e:
        torchtrt_ext.Settings.from_options(options, for_backend=True)
    assert str(e.value).startswith(message)


def test_settings_round_trip_the_calibration_as_text():
    cache = CalibrationCache({"up:input": 1.25, "down:input": 0.5}, model_fingerprint="abc")
    s = torchtrt_ext.Settings(precision="fp8", calibration=cache)
    again = torchtrt_ext.Settings(**s.as_dict())
    assert again.calibration == cache and again == s


# --- refit -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("route", ["refit", "load_state_dict", "backend"])
def test_refit_requantizes_new_weights_with_the_same_activation_scales(precision, route):
    model = _mlp()
    cache = _cache(model, _mlp_batches())
    x = _mlp_input()
    options = {"precision": precision, "calibration": cache, "engine": "builtin"}
    if route == "backend":
        compiled = torch.compile(model, backend="torchtrt_ext", options=options)
    else:
        compiled = torchtrt_ext.compile(model, (x,), **options)
    first = compiled(x)
    new = _mlp(seed=5).state_dict()
    if route == "load_state_dict":
        compiled.load_state_dict(new)
    else:
        report = torchtrt_ext.refit(model if route == "backend" else compiled, new)
        assert set(report.updated) == set(new)
    out = compiled(x)
    expected = reference(_mlp(seed=5), cache, precision, lambda m: m(x))  # the old cache's scales
    assert torch.equal(out, expected)
    assert not torch.equal(out, first)
    for k, v in model.state_dict().items():
        assert torch.equal(v, new[k])  # the model holds the new float weights


@pytest.mark.parametrize("precision", PRECISIONS)
def test_refit_double_buffered_and_in_place_changes_requantize(precision):
    model = _mlp()
    cache = _cache(model, _mlp_batches())
    x = _mlp_input()
    compiled = torchtrt_ext.compile(model, (x,), precision=precision, calibration=cache, engine="builtin", refit_double_buffer=True)
    torchtrt_ext.refit(compiled, _mlp(seed=6).state_dict())
    assert torch.equal(compiled(x), reference(_mlp(seed=6), cache, precision, lambda m: m(x)))
    model.up.weight.mul_(0.5)  # written in place: the wrapper follows, the quantized copy with it
    expected = _mlp(seed=6)
    expected.up.weight.data.mul_(0.5)
    assert torch.equal(compiled(x), reference(expected, cache, precision, lambda m: m(x)))


def test_wrapper_through_dynamo_quantizes_too():
    model = _mlp()
    cache = _cache(model, _mlp_batches())
    x = _mlp_input()
    compiled = torchtrt_ext.compile(model, (x,), precision="int8", calibration=cache, engine="builtin", frontend="dynamo")
    assert torch.equal(compiled(x), reference(model, cache, "int8", lambda m: m(x)))
    assert [e.quantization.layers for e in compiled.engines] == [tuple(MLP_LAYERS)]


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        torch._dynamo.graph_break()
        return torch.relu(self.fc(x))


def test_backend_graph_inside_a_repeated_layer_is_never_quantized_silently():
    """After a graph break inside a layer, dynamo's graph names the layer relative to it ('fc') and
    serves every layer with it: no cache entry has that name, so it is an error naming it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(), _Block()).eval()
    cache = _cache(model, [(torch.randn(2, 8),)])
    assert cache.names() == ["0.fc:input", "1.fc:input"]
    compiled = torch.compile(model, backend="torchtrt_ext", options={"precision": "int8", "calibration": cache})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="'fc:input'"):
        compiled(torch.randn(2, 8))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_backend_engine_for_replaced_weights_quantizes_them(precision):
    """The backend builds another engine (sharing the compiled code) when the model's weights are
    replaced by new tensors: it quantizes those, with the same activation scales."""
    model = _mlp()
    cache = _cache(model, _mlp_batches())
    x = _mlp_input()
    compiled = torch.compile(model, backend="torchtrt_ext", options={"precision": precision, "calibration": cache})
    compiled(x)
    other = _mlp(seed=7)
    model.load_state_dict(other.state_dict(), assign=True)  # new Parameter objects
    assert torch.equal(compiled(x), reference(other, cache, precision, lambda m: m(x)))
    engines = torchtrt_ext.engines_of(model)
    assert [e.quantization.layers for e in engines] == [tuple(MLP_LAYERS)]
