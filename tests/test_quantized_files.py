"""Engine files of quantized compiles (issue 16: "save/load keeps the quantized weights and the cache"): a
loaded engine computes bit for bit what the saved one did, from the file's quantized weights, its plan
and its calibration cache (the text, exact), without calibrating; a refit of the loaded one re-quantizes;
weight-stripped files strip the quantized weights with the float ones; corrupt or mismatched content is
an EngineFileError naming the fault."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

import torchtrt_ext
from tests.test_quantized_engine import PRECISIONS, _cache, _mlp, _mlp_batches, _mlp_input, reference
from torchtrt_ext import EngineFileError, RefitError
from torchtrt_ext.core import engine_file, file_layout, quantize
from torchtrt_ext.operations import calibrate as calibrate_module


def _compiled(precision, **options):
    model = _mlp()
    cache = _cache(model, _mlp_batches())
    x = _mlp_input()
    compiled = torchtrt_ext.compile(model, (x,), precision=precision, calibration=cache, engine="builtin", **options)
    return model, cache, compiled, x


def _inputs(*batches):
    g = torch.Generator().manual_seed(21)
    return [torch.randn(b, 16, generator=g) for b in batches]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().reshape(-1).view(torch.uint8)


def _header(path) -> engine_file.Header:
    with engine_file.EngineFile(str(path)) as f:
        return f.header


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_loaded_quantized_engine_is_bit_identical_without_calibrating_and_a_refit_requantizes(precision, tmp_path, monkeypatch):
    model, cache, compiled, x = _compiled(precision)
    path = tmp_path / "q.ttx"
    torchtrt_ext.save(compiled, path)

    def refuse(*args, **kwargs):
        raise AssertionError("load calibrated")

    monkeypatch.setattr(calibrate_module, "calibrate", refuse)
    monkeypatch.setattr(torchtrt_ext, "calibrate", refuse)
    loaded = torchtrt_ext.load(path)
    for xb in _inputs(5, 3, 9):  # the compiled batch size and others: the graph's batch is dynamic
        out = loaded(xb)
        assert torch.equal(out, compiled(xb))
        assert torch.equal(out, reference(model, cache, precision, lambda m: m(xb)))
    # the calibration cache, exact: the file's text is the cache's, and it reads back equal
    assert _header(path).settings["calibration"] == cache.dumps()
    assert loaded.settings.calibration == cache and loaded.settings.calibration.digest() == cache.digest()
    # the plan and the quantized weights, bit for bit
    (engine,) = loaded.engines
    assert engine.quantization == compiled.engines[0].quantization
    saved, now = compiled.engines[0].quantized_weights(), engine.quantized_weights()
    fmt = quantize.quant_format(precision)
    assert list(now) == list(saved) == [f"{n}.weight:{fmt.name}{s}" for n in ("up", "mid", "down") for s in ("", "_scales")]
    for name, t in saved.items():
        assert now[name].dtype == t.dtype == (fmt.dtype if not name.endswith("_scales") else torch.float32)
        assert torch.equal(_bits(now[name]), _bits(t)), name
    tensors = {t.name: t for t in _header(path).tensors}
    assert {n for n, t in tensors.items() if t.kind == "quantized"} == set(saved)
    # a refit of the loaded engine re-quantizes, with the activation scales of the cache
    first = loaded(x)
    new = _mlp(seed=5).state_dict()
    torchtrt_ext.refit(loaded, new)
    torchtrt_ext.refit(compiled, new)
    out = loaded(x)
    assert torch.equal(out, compiled(x)) and not torch.equal(out, first)
    assert torch.equal(out, reference(_mlp(seed=5), cache, precision, lambda m: m(x)))
    for name, t in compiled.engines[0].quantized_weights().items():
        assert torch.equal(_bits(engine.quantized_weights()[name]), _bits(t)), name
    # saved after a refit: the new float and quantized weights
    torchtrt_ext.save(loaded, tmp_path / "again.ttx")
    assert torch.equal(torchtrt_ext.load(tmp_path / "again.ttx")(x), out)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_weight_stripped_quantized_file_runs_after_a_refit_with_the_float_weights(precision, tmp_path):
    model, cache, compiled, x = _compiled(precision)
    torchtrt_ext.save(compiled, tmp_path / "full.ttx")
    torchtrt_ext.save(compiled, tmp_path / "stripped.ttx", include_weights=False)
    header = _header(tmp_path / "stripped.ttx")
    quantized = [t for t in header.tensors if t.kind == "quantized"]
    assert len(quantized) == 6 and all(t.region is None for t in quantized)
    assert header.quantization[0] == _header(tmp_path / "full.ttx").quantization[0]
    stripped = torchtrt_ext.load(tmp_path / "stripped.ttx")
    with pytest.raises(RefitError, match="weight-stripped"):
        stripped(x)
    torchtrt_ext.refit(stripped, model.state_dict())
    for xb in _inputs(5, 2):
        assert torch.equal(stripped(xb), compiled(xb))


def test_layers_left_unquantized_and_several_signatures_round_trip(tmp_path):
    """calibration_coverage='warn': the file's plan keeps the uncovered layer at the model's dtype; two
    compiled signatures (static batches) share one copy of each quantized weight in the file."""
    model = _mlp()
    cache = _cache(model, _mlp_batches()).drop("mid:input")
    a, b = _inputs(5, 3)
    compiled = torchtrt_ext.compile(model, (a,), precision="fp8", calibration=cache, calibration_coverage="warn",
                                    dynamic_batch=False, engine="builtin")
    expected = [compiled(a), compiled(b)]
    assert len(compiled.variants) == 2
    path = tmp_path / "warn.ttx"
    torchtrt_ext.save(compiled, path)
    header = _header(path)
    assert [q.uncovered for q in header.quantization] == [["mid:input"]] * 2
    assert sum(t.kind == "quantized" for t in header.tensors) == 4  # up and down, once each
    loaded = torchtrt_ext.load(path)
    assert [e.quantization.uncovered for e in loaded.engines] == [("mid:input",)] * 2
    assert torch.equal(loaded(a), expected[0]) and torch.equal(loaded(b), expected[1])
    assert torch.equal(loaded(b), reference(model, cache, "fp8", lambda m: m(b)))
    text = torchtrt_ext.inspect_file(path)
    assert "up.weight:fp8: float8_e4m3fn (64, 16) 1024 bytes (quantized)" in text
    assert "graph 1: fp8, 2 layer(s) quantized, 1 at the model's dtype" in text
    assert "calibration=<a calibration cache of 2 entries>" in text


# --- corrupt or mismatched content ------------------------------------------------------------------


def _rewrite(path, change):
    """The file written again with change(header, data) applied (data: region name -> bytearray), every
    checksum valid: what only the content checks can refuse."""
    with engine_file.EngineFile(str(path)) as f:
        header = f.header
        raw = path.read_bytes()
        entries = [e for e in header.tensors if e.region is not None] + header.blobs()
        data = {e.name: bytearray(raw[f.data_start + e.region.offset : f.data_start + e.region.offset + e.region.nbytes]) for e in entries}
    change(header, data)
    regions = [(e, torch.frombuffer(data[e.name] or bytearray(1), dtype=torch.uint8)[: len(data[e.name])]) for e in entries]
    engine_file.write(str(path), header, regions)


def _flip_a_quantized_value(header, data):
    data["mid.weight:int8"][7] ^= 0x01


def _another_plan(header, data):
    q = header.quantization[0]
    q.layers = [n for n in q.layers if n != "mid:input"]
    q.uncovered = ["mid:input"]


def _quantized_as_float(header, data):
    data["up.weight"][:4] = bytearray(torch.tensor([3.0]).view(torch.uint8).tolist())


@pytest.mark.parametrize(
    "change, message",
    [
        (_flip_a_quantized_value, r"the quantized tensor 'mid.weight:int8' \(torch.int8 \(32, 64\)\) is not the quantization of the "
                                  r"weight 'mid.weight' that the file holds \(written inconsistently\); save the model again"),
        (_quantized_as_float, r"the quantized tensor 'up.weight:int8' .* is not the quantization of the weight 'up.weight'"),
        (_another_plan, r"the quantization plan saved with it \(int8, 3 weight\(s\) of 5, layers down:input, up:input, unquantized "
                        r"mid:input\) is not what its graph and calibration cache give this torchtrt_ext \(int8, 3 weight\(s\) of 5, "
                        r"layers down:input, mid:input, up:input\); compile and save the model again"),
    ],
    ids=["a quantized value changed", "a float weight changed", "another plan"],
)
def test_content_that_does_not_fit_is_refused_naming_it(tmp_path, change, message):
    _, _, compiled, _ = _compiled("int8")
    path = tmp_path / "q.ttx"
    torchtrt_ext.save(compiled, path)
    _rewrite(path, change)
    with pytest.raises(EngineFileError, match=f"^{path} \\(graph 0\\): {message}"):
        torchtrt_ext.load(path)


def _set_tensor(name, **fields):
    def change(h):
        (entry,) = [t for t in h["tensors"] if t["name"] == name]
        entry.update(fields)

    return change


def _plan(**fields):
    def change(h):
        h["quantization"][0].update(fields)

    return change


def _another_cache_text(h):
    lines = h["settings"]["calibration"].splitlines(keepends=True)
    lines[-1] = "0x1.0p+0 " + lines[-1].split(" ", 1)[1]
    h["settings"]["calibration"] = "".join(lines)


def _drop_tensor(name):
    def change(h):
        h["tensors"] = [t for t in h["tensors"] if t["name"] != name]

    return change


def _set_header(key, value):
    def change(h):
        h[key] = value

    return change


HEADER_REFUSALS = {
    "no plan for a quantized engine": (_set_header("quantization", [None]), r"'quantization\[0\]' is missing, but the settings' precision is 'int8'"),
    "plans for two graphs of one": (lambda h: h["quantization"].append(h["quantization"][0]), r"'quantization' has 2 entries for 1 programs"),
    "another format": (_plan(format="fp8"), r"'quantization\[0\]\.format' 'fp8' is not the settings' precision 'int8'"),
    "another calibration cache": (_another_cache_text, r"'quantization\[0\]\.calibration' is not the digest of the settings' calibration cache"),
    "a source out of range": (_plan(sources=[0, 2, 5]), r"'quantization\[0\]\.sources' \[0, 2, 5\] are not distinct weights of 5"),
    "a source twice": (_plan(sources=[0, 2, 2]), r"'quantization\[0\]\.sources' \[0, 2, 2\] are not distinct"),
    "a missing name": (_plan(tensors=["up.weight:int8"]), r"'quantization\[0\]\.tensors' has 1 names for 3 sources"),
    "a missing tensor": (_drop_tensor("mid.weight:int8_scales"), r"'quantization\[0\]\.tensors' names 'mid.weight:int8_scales', which is no tensor of kind 'quantized'"),
    "a weight of another dtype": (_set_tensor("up.weight:int8", dtype="uint8"), r"'quantization\[0\]\.tensors' names 'up.weight:int8' of uint8 \[64, 16\]; an int8 weight is int8, 2-D"),
    "scales of another shape": (_set_tensor("up.weight:int8_scales", shape=[16, 4]), r"'quantization\[0\]\.tensors' names 'up.weight:int8_scales' of float32 \[16, 4\] as the scales of a \[64, 16\] weight: they are float32 \[64\]"),
    "a quantized tensor no plan names": (_set_tensor("up.bias", kind="quantized"), r"'tensors' hold quantized tensors that no quantization plan names: 'up.bias'"),
}


@pytest.fixture(scope="module")
def int8_header(tmp_path_factory):
    torch._dynamo.reset()
    _, _, compiled, _ = _compiled("int8")
    path = tmp_path_factory.mktemp("quantized") / "q.ttx"
    torchtrt_ext.save(compiled, path)
    return _header(path).to_json()


@pytest.mark.parametrize("case", HEADER_REFUSALS)
def test_the_header_refuses_each_quantization_fault_naming_the_field(int8_header, case):
    change, message = HEADER_REFUSALS[case]
    header = json.loads(json.dumps(int8_header))
    assert engine_file.Header.from_json(json.loads(json.dumps(header))).to_json() == header  # intact: passes, round trips
    change(header)
    with pytest.raises(EngineFileError, match=r"header field " + message):
        engine_file.Header.from_json(header)


def test_a_plan_in_a_file_of_the_models_precision_is_refused(tmp_path):
    model = _mlp()
    x = _mlp_input()
    path = tmp_path / "plain.ttx"
    torchtrt_ext.save(torchtrt_ext.compile(model, (x,), engine="builtin"), path)
    header = _header(path).to_json()
    assert header["quantization"] == [None]
    header["quantization"] = [{"format": "int8", "calibration": "0" * 64, "sources": [], "num_weights": 5,
                               "num_placeholders": 6, "layers": [], "uncovered": [], "transposed": [], "tensors": []}]
    with pytest.raises(EngineFileError, match=r"header field 'quantization\[0\]' is present, but the settings' precision is 'model'"):
        engine_file.Header.from_json(header)


# --- the engine cache ---------------------------------------------------------------------------------


def _refuse_compiling(monkeypatch, allow_export_load=False):
    import torch._inductor.compile_fx as compile_fx_module

    def refuse(*args, **kwargs):
        raise AssertionError("traced or compiled where the compiled code should have been loaded")

    monkeypatch.setattr(compile_fx_module, "compile_fx", refuse)
    monkeypatch.setattr(torch.export, "export", refuse)
    if not allow_export_load:
        monkeypatch.setattr(torch.export, "load", refuse)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_quantized_engine_cache_hit_loads_its_code_binds_the_live_weights_and_computes_identically(precision, tmp_path, monkeypatch):
    cache_dir = str(tmp_path / "engines")
    model, cache, first, x = _compiled(precision, cache_dir=cache_dir)
    expected = {b: first(xb) for b, xb in zip((5, 3), _inputs(5, 3))}
    other = _mlp(seed=3)  # another instance, other weights: the same entry, bound to its own weights
    with monkeypatch.context() as patched:
        _refuse_compiling(patched)
        twin = torchtrt_ext.compile(_mlp(), (x,), precision=precision, calibration=cache, engine="builtin", cache_dir=cache_dir)
        hit = torchtrt_ext.compile(other, (x,), precision=precision, calibration=cache, engine="builtin", cache_dir=cache_dir)
    for compiled in (twin, hit):
        (variant,) = compiled.variants
        assert variant.from_cache and variant.engine.artifact is not None
        assert variant.engine.quantization == first.engines[0].quantization
    for b, xb in zip((5, 3), _inputs(5, 3)):
        assert torch.equal(twin(xb), expected[b])
        assert torch.equal(hit(xb), reference(other, cache, precision, lambda m: m(xb)))
    assert not torch.equal(hit(x), twin(x))
    for name, t in first.engines[0].quantized_weights().items():  # made from the live weights, as a compile makes them
        assert torch.equal(_bits(twin.engines[0].quantized_weights()[name]), _bits(t)), name
    torchtrt_ext.refit(hit, _mlp(seed=5).state_dict())  # a refit of the hit re-quantizes
    assert torch.equal(hit(x), reference(_mlp(seed=5), cache, precision, lambda m: m(x)))
    # saved from the hit (its compiled code and quantized weights), loaded without compiling
    torchtrt_ext.save(hit, tmp_path / "hit.ttx")
    torchtrt_ext.save(hit, tmp_path / "stripped.ttx", include_weights=False)
    with monkeypatch.context() as patched:
        _refuse_compiling(patched, allow_export_load=True)  # load() reads the model's structure from the graph
        loaded = torchtrt_ext.load(tmp_path / "hit.ttx")
        stripped = torchtrt_ext.load(tmp_path / "stripped.ttx")
    assert loaded.variants[0].engine.artifact is not None
    assert torch.equal(loaded(x), hit(x))
    torchtrt_ext.refit(stripped, _mlp(seed=5).state_dict())
    assert torch.equal(stripped(x), hit(x))


def test_another_calibration_cache_or_precision_is_a_miss(tmp_path):
    cache_dir = tmp_path / "engines"
    model = _mlp()
    x = _mlp_input()
    a = _cache(model, _mlp_batches())
    b = _cache(model, _mlp_batches(3))  # another calibration set: other amax
    assert a.diff(b)
    runs = [("int8", a), ("int8", b), ("fp8", a), ("model", None), ("int8", a)]
    for i, (precision, cache) in enumerate(runs):
        compiled = torchtrt_ext.compile(model, (x,), precision=precision, calibration=cache, engine="builtin", cache_dir=str(cache_dir))
        assert compiled.variants[0].from_cache == (i == 4), (precision, i)
        if cache is None:
            torch.testing.assert_close(compiled(x), model(x))
        else:
            assert torch.equal(compiled(x), reference(model, cache, precision, lambda m: m(x)))
    assert len(list(cache_dir.iterdir())) == 4


def test_the_key_holds_the_precision_and_the_calibration_content(tmp_path):
    from torchtrt_ext.core.settings import Settings
    from torchtrt_ext.operations import engine_cache

    model = _mlp()
    x = _mlp_input()
    flat, spec = torch.utils._pytree.tree_flatten(((x,), {}))
    a = _cache(model, _mlp_batches())
    a.save(tmp_path / "a.calib")
    again = torchtrt_ext.CalibrationCache.load(tmp_path / "a.calib")  # the same content, another object
    shifted = torchtrt_ext.CalibrationCache({**a.entries, "up:input": a.amax("up:input") * 2}, a.method, a.model_fingerprint)

    def key(**options):
        return engine_cache.key(model, spec, flat, Settings(engine="builtin", **options))

    keys = [key(), key(precision="int8", calibration=a), key(precision="fp8", calibration=a),
            key(precision="int8", calibration=shifted), key(precision="int8", calibration=a, calibration_coverage="warn")]
    assert len(set(keys)) == len(keys)
    assert key(precision="int8", calibration=again) == keys[1]


def _rewrite_header(path, change) -> None:
    """The file with change(header as JSON) applied to its header (its CRC and the data start made
    valid), its data unchanged: a header that only the schema's checks can refuse."""
    with engine_file.EngineFile(str(path)) as f:
        data = path.read_bytes()[f.data_start :]
        document = f.header.to_json()
    change(document)
    raw = json.dumps(document, sort_keys=True).encode()
    start = file_layout.aligned(file_layout.PREAMBLE.size + len(raw))
    preamble = file_layout.PREAMBLE.pack(file_layout.MAGIC, file_layout.FORMAT_VERSION, 0, len(raw), zlib.crc32(raw), 0)
    path.write_bytes(preamble + raw + b"\0" * (start - file_layout.PREAMBLE.size - len(raw)) + data)


def test_a_mismatched_quantized_cache_entry_costs_a_recompile_never_a_wrong_engine(tmp_path, caplog):
    cache_dir = tmp_path / "engines"
    model, cache, _, x = _compiled("int8", cache_dir=str(cache_dir))
    (entry,) = cache_dir.iterdir()
    _rewrite_header(entry, _plan(format="fp8"))
    again = torchtrt_ext.compile(model, (x,), precision="int8", calibration=cache, engine="builtin", cache_dir=str(cache_dir))
    assert not again.variants[0].from_cache
    assert "not used" in caplog.text and "'quantization[0].format' 'fp8' is not the settings' precision 'int8'" in caplog.text
    assert torch.equal(again(x), reference(model, cache, "int8", lambda m: m(x)))
    third = torchtrt_ext.compile(model, (x,), precision="int8", calibration=cache, engine="builtin", cache_dir=str(cache_dir))
    assert third.variants[0].from_cache and torch.equal(third(x), again(x))


class _Conv1DNet(torch.nn.Module):
    """GPT-2's linear layers: transformers' Conv1D holds its weight (in, out), quantized transposed."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.up, self.down = Conv1D(32, 16), Conv1D(8, 32)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


class _LinearTwin(torch.nn.Module):
    """The same network with nn.Linear layers (weights transposed): what `reference` quantizes."""

    def __init__(self, net: _Conv1DNet):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)
        with torch.no_grad():
            for mine, theirs in ((self.up, net.up), (self.down, net.down)):
                mine.weight.copy_(theirs.weight.t())
                mine.bias.copy_(theirs.bias)

    forward = _Conv1DNet.forward


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_saved_conv1d_engine_keeps_its_transposed_quantized_weights_through_load_and_refit(precision, tmp_path):
    torch.manual_seed(0)
    model = _Conv1DNet().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # Conv1D's biases start at zero
    cache = torchtrt_ext.calibrate(model, [(b,) for b in _inputs(4, 4, 4)])
    x = _inputs(5)[0]
    compiled = torchtrt_ext.compile(model, (x,), precision=precision, calibration=cache, engine="builtin")
    (plan,) = [e.quantization for e in compiled.engines]
    assert plan.transposed == (True, True)
    torchtrt_ext.save(compiled, tmp_path / "c.ttx")
    assert _header(tmp_path / "c.ttx").quantization[0].transposed == [True, True]
    loaded = torchtrt_ext.load(tmp_path / "c.ttx")
    for xb in _inputs(5, 3):
        assert torch.equal(loaded(xb), compiled(xb))
        assert torch.equal(loaded(xb), reference(_LinearTwin(model), cache, precision, lambda m: m(xb)))
    new = _Conv1DNet()
    with torch.no_grad():
        for p in new.parameters():
            p.normal_()
    torchtrt_ext.refit(loaded, new.state_dict())
    xb = _inputs(6)[0]
    got, want = loaded(xb), reference(_LinearTwin(new), cache, precision, lambda m: m(xb))
    assert torch.equal(got, want)
    assert not torch.equal(got, compiled(xb))  # the refit changed the outputs
