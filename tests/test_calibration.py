"""Calibration cache files: exact round trips in torchtrt_ext's format and TensorRT's, every malformed
line refused with its number, and a missing entry refused by name."""

import math
import random
import struct

import pytest

from torchtrt_ext import CalibrationCache, CalibrationError

NAMES = ["layers.0.self_attn.q_proj:input", "lm_head:input", "(Unnamed Layer* 64) [Shuffle]_output", "a: b:input", "conv 1:input"]


def _cache(seed: int = 0) -> CalibrationCache:
    rng = random.Random(seed)
    values = [rng.uniform(1e-6, 1e4) for _ in NAMES[:-1]] + [5e-324 * 2**60]  # a tiny subnormal-ish amax too
    return CalibrationCache(dict(zip(NAMES, values)), "entropy", "9f8e7d", 32, "c0ffee")


def test_torchtrt_ext_format_round_trips_every_value_exactly(tmp_path):
    cache = _cache()
    cache.save(tmp_path / "cache.txt")
    loaded = CalibrationCache.load(tmp_path / "cache.txt")
    assert loaded == cache
    for name in NAMES:
        assert loaded.amax(name).hex() == cache.amax(name).hex()
    assert loaded.dumps() == cache.dumps() == (tmp_path / "cache.txt").read_text()
    assert (loaded.method, loaded.model_fingerprint, loaded.batches, loaded.batches_hash) == ("entropy", "9f8e7d", 32, "c0ffee")


def test_tensorrt_format_keeps_the_scale_bits_and_maps_names(tmp_path):
    with pytest.raises(CalibrationError, match="'conv 1:input' has amax .* float32: TensorRT's format cannot hold it"):
        _cache().dumps("tensorrt")  # its tiny amax has no float32 scale
    cache = CalibrationCache({**_cache().entries, "conv 1:input": 0.5}, "entropy")
    ours_to_trt = {n: f"(Unnamed Layer* {i}) [Shuffle]_output" for i, n in enumerate(NAMES)}
    cache.save(tmp_path / "trt.cache", format="tensorrt", names=ours_to_trt)
    text = (tmp_path / "trt.cache").read_text()
    assert text.splitlines()[0] == "TRT-8601-EntropyCalibration2"
    loaded = CalibrationCache.load(tmp_path / "trt.cache", names={v: k for k, v in ours_to_trt.items()})
    assert loaded.names() == cache.names() and loaded.method == "entropy"
    for name in NAMES:
        scale = struct.unpack(">f", struct.pack(">f", cache.amax(name) / 127))[0]  # float32, as TensorRT keeps it
        assert loaded.amax(name) == scale * 127
    assert loaded.dumps("tensorrt", ours_to_trt) == text  # and the text round-trips exactly


def test_a_tensorrt_cache_as_tensorrt_writes_it_reads_back_bit_for_bit():
    text = "TRT-8601-EntropyCalibration2\ninput_0: 3c010a14\n(Unnamed Layer* 64) [Shuffle]_output: 3d1e0d62\nout: 3f800000\n"
    cache = CalibrationCache.loads(text)
    assert cache.amax("out") == 127.0  # scale 1.0
    assert cache.dumps("tensorrt") == "TRT-8601-EntropyCalibration2\n" + "".join(sorted(text.splitlines(True)[1:]))


def test_crlf_line_ends_and_trailing_newlines_read_the_same():
    text = _cache().dumps()
    assert CalibrationCache.loads(text.replace("\n", "\r\n") + "\r\n\n") == _cache()


def _broken(text: str, line: int, new: str | None) -> str:
    lines = text.split("\n")
    if new is None:
        del lines[line - 1]
    else:
        lines[line - 1] = new
    return "\n".join(lines)


@pytest.mark.parametrize(
    "line, new, message",
    [
        (1, "torchtrt_ext calibration cache 2", "line 1: schema version 2, but this torchtrt_ext reads version 1"),
        (1, "some other file", "line 1: not a calibration cache"),
        (2, "method: minmax", "line 2: unknown method 'minmax'"),
        (3, "modle: 9f8e7d", "line 3: expected 'model: ...'"),
        (4, "batches: many c0ffee", "line 4: expected 'batches: <count> <hash>'"),
        (5, "entries: 9", "the header says 9 entries, the file has 5"),
        (7, "0x1.8p+3", "line 7: expected '<amax as a hex float> <name>'"),
        (7, "0x1.8q+3 lm_head:input", "line 7: expected '<amax as a hex float> <name>'"),
        (7, "12.5 lm_head:input", "line 7: expected '<amax as a hex float> <name>'"),
        (7, "inf lm_head:input", "line 7: 'lm_head:input' has amax inf; an amax must be a finite float above 0"),
        (8, "nan conv 1:input", "line 8: 'conv 1:input' has amax nan"),
        (8, "-0x1.0p+0 conv 1:input", "line 8: 'conv 1:input' has amax -1.0"),
        (8, "0x0.0p+0 conv 1:input", "line 8: 'conv 1:input' has amax 0.0"),
        (9, "0x1.0p+0 a: b:input", "line 9: 'a: b:input' appears twice"),
        (7, "", "line 7: a blank line before the end of the file"),
        (7, "0x1.0p+0 lm\rhead", "line 7: a carriage return inside the line"),
        (5, "entries: \u00b2", "line 5: the entry count '\u00b2' is not a number"),  # isdigit() says yes
        (1, "torchtrt_ext calibration cache \u00b9", "line 1: not a calibration cache"),
        (7, "0x1p+99999999999 lm_head:input", "line 7: hexadecimal value too large to represent as a float"),
        (7, "0x1p+\u0661 lm_head:input", "line 7: expected '<amax as a hex float> <name>'"),  # an Arabic-Indic digit
        (7, "0x1p+0  lm_head:input", "line 7: the name ' lm_head:input' cannot be written"),
        (7, "0x1p+0 lm\x0bhead", "line 7: the name 'lm\\x0bhead' cannot be written"),
    ],
)
def test_malformed_lines_are_refused_with_their_number(line, new, message):
    text = _cache().dumps()
    with pytest.raises(CalibrationError, match="^<text>: " + _escaped(message)):
        CalibrationCache.loads(_broken(text, line, new))


@pytest.mark.parametrize(
    "text, message",
    [
        ("TRT-8601\nx: 3c010a14\n", "line 1: expected 'TRT-<version>-<algorithm>'"),
        ("TRT-8601-EntropyCalibration2\nx 3c010a14\n", "line 2: expected '<tensor name>: <8 hex digits>'"),
        ("TRT-8601-EntropyCalibration2\nx: 3c01zz14\n", "line 2: expected '<tensor name>: <8 hex digits>'"),
        ("TRT-8601-EntropyCalibration2\nx: 3c010a14\ny: 7f800000\n", "line 3: 'y' has amax inf"),
        ("TRT-8601-EntropyCalibration2\nx: 3c010a14\nx: 3c010a14\n", "line 3: 'x' appears twice"),
        ("TRT-8601-EntropyCalibration2\nx: 00000000\n", "line 2: 'x' has amax 0.0"),
        ("", "empty"),
        ("TRT-\u0668601-EntropyCalibration2\nx: 3c010a14\n", "line 1: expected 'TRT-<version>-<algorithm>'"),
    ],
)
def test_malformed_tensorrt_caches_are_refused_with_their_number(text, message):
    with pytest.raises(CalibrationError, match="^<text>: " + _escaped(message)):
        CalibrationCache.loads(text)


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


def test_a_dropped_entry_is_refused_by_name():
    cache = _cache().drop("lm_head:input")
    assert "lm_head:input" not in cache.names() and len(cache.names()) == len(NAMES) - 1
    with pytest.raises(CalibrationError, match=r"no amax for 1 tensor\(s\) the engine quantizes: 'lm_head:input'"):
        cache.require(NAMES)
    with pytest.raises(CalibrationError, match="has no entry 'lm_head:input'"):
        cache.amax("lm_head:input")
    cache.require(NAMES[:1])  # what it has passes


def test_diff_lists_changed_and_one_sided_names():
    a, b = _cache(0), _cache(1).drop("conv 1:input")
    diff = a.diff(b)
    assert set(diff) == set(NAMES)
    assert diff["conv 1:input"] == (a.amax("conv 1:input"), None)
    assert a.diff(_cache(0)) == {}


@pytest.mark.parametrize("amax", [math.inf, -1.0, 0.0, math.nan])
def test_a_cache_with_a_bad_amax_cannot_be_made(amax):
    with pytest.raises(CalibrationError, match="an amax must be a finite float above 0"):
        CalibrationCache({"x:input": amax})


# --- calibrate(): ranges recorded at every quantizable layer's input ---------------------------------

import torch  # noqa: E402

import torchtrt_ext  # noqa: E402


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 4)
        self.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(4, 2))

    def forward(self, x, scale=1.0):
        y = self.conv(x).mean((2, 3))
        return self.head(self.fc(y * scale))


def _batches(n=6, shape=(2, 3, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(*shape, generator=g) * (i + 1),) for i in range(n)]


def test_max_calibration_records_every_layers_input_amax_as_eager_sees_it():
    model = _Net()
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, max(seen.get(n, 0.0), float(a[0].abs().max()))))
             for n, m in (("conv", model.conv), ("fc", model.fc), ("head.1", model.head[1]))]
    with torch.no_grad():
        for (x,) in _batches():
            model(x)
    for h in hooks:
        h.remove()
    cache = torchtrt_ext.calibrate(model, _batches(), progress=False)
    assert cache.names() == ["conv:input", "fc:input", "head.1:input"]
    for name, amax in seen.items():
        assert cache.amax(f"{name}:input") == amax
    assert cache.batches == 6 and cache.method == "max" and model.training  # the model's mode is restored
    assert cache.model_fingerprint == torchtrt_ext.calibrate(_Net(), _batches(2), progress=False).model_fingerprint
    assert cache.batches_hash != torchtrt_ext.calibrate(model, _batches(5), progress=False).batches_hash


def test_percentile_and_entropy_clip_below_the_max_and_keep_dicts_of_kwargs():
    model = _Net()
    batches = [{"x": x, "scale": 2.0} for (x,) in _batches(shape=(8, 3, 32, 32))]  # 147k samples
    by_method = {m: torchtrt_ext.calibrate(model, batches, method=m, progress=False) for m in ("max", "percentile", "entropy")}
    for name in by_method["max"].names():
        top = by_method["max"].amax(name)
        assert 0 < by_method["percentile"].amax(name) <= top
        assert 0 < by_method["entropy"].amax(name) <= top
    # over 147k samples, the 99.99th percentile leaves the top 15 out: below the max
    assert by_method["percentile"].amax("conv:input") < by_method["max"].amax("conv:input")


def test_an_empty_set_or_an_unreached_layer_is_refused():
    with pytest.raises(CalibrationError, match="the calibration set is empty"):
        torchtrt_ext.calibrate(_Net(), [], progress=False)
    model = _Net()
    model.forward = lambda x: model.fc(model.conv(x).mean((2, 3)))  # head.1 never runs
    with pytest.raises(CalibrationError, match=r"1 quantizable layer\(s\) saw no input or only zeros in 6 batches, so they have no range: head.1"):
        torchtrt_ext.calibrate(model, _batches(), progress=False)
    with pytest.raises(CalibrationError, match="unknown calibration method 'kl'"):
        torchtrt_ext.calibrate(_Net(), _batches(), method="kl")


# --- the command line ---------------------------------------------------------------------------------

from torchtrt_ext import cli  # noqa: E402


def build_net():  # the --model factory the CLI test names
    torch.manual_seed(0)
    return _Net()


def build_other():
    return torch.nn.Sequential(torch.nn.Linear(4, 4))


def test_calib_command_shows_diffs_converts_and_validates(tmp_path, capsys):
    cache = torchtrt_ext.calibrate(build_net(), _batches(), progress=False)
    cache.save(tmp_path / "a.txt")
    assert cli.main(["calib", "show", str(tmp_path / "a.txt")]) == 0
    shown = capsys.readouterr().out
    assert "3 entries, method max" in shown and repr(cache.amax("fc:input")) in shown
    assert cli.main(["calib", "convert", str(tmp_path / "a.txt"), str(tmp_path / "a.trt"), "--to", "tensorrt"]) == 0
    assert (tmp_path / "a.trt").read_text() == cache.dumps("tensorrt")
    cache.drop("fc:input").save(tmp_path / "b.txt")
    assert cli.main(["calib", "diff", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]) == 1
    assert f"fc:input: {cache.amax('fc:input')!r} -> None" in capsys.readouterr().out
    assert cli.main(["calib", "validate", str(tmp_path / "a.txt"), "--model", "tests.test_calibration:build_net"]) == 0
    assert cli.main(["calib", "validate", str(tmp_path / "b.txt"), "--model", "tests.test_calibration:build_net"]) == 1
    assert "no amax for 1 tensor(s) the engine quantizes: 'fc:input'" in capsys.readouterr().err
    assert cli.main(["calib", "validate", str(tmp_path / "a.txt"), "--model", "tests.test_calibration:build_other"]) == 1
    assert "the cache was calibrated on another model" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_text(cache.dumps().replace("entries: 3", "entries: three"))
    assert cli.main(["calib", "show", str(tmp_path / "bad.txt")]) == 1
    assert "line 5: the entry count 'three' is not a number" in capsys.readouterr().err
