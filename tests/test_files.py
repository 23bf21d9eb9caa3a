"""Engine files: round trips, weight-stripped files, and every corruption refused cleanly."""

import os
import random
import struct

import pytest
import torch

import torchtrt_ext
from tests import zoo
from tests.conftest import CPU_AND_CUDA
from torchtrt_ext import EngineFileError, RefitError, TorchTRTExtError
from torchtrt_ext.cli import main as cli


def _compiled(name, device="cpu", **options):
    model = zoo.build(name, device)
    args, kwargs = zoo.inputs(name, 4, device)
    return model, torchtrt_ext.compile(model, args, kwargs, **options), (args, kwargs)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", ["cnn", "encoder", "buffers", "multi_io"])
def test_load_of_save_matches_the_compiled_module(name, device, tmp_path):
    model, compiled, (args, kwargs) = _compiled(name, device)
    path = tmp_path / "m.ttx"
    size = torchtrt_ext.save(compiled, path)
    assert size == os.path.getsize(path)
    loaded = torchtrt_ext.load(path)
    with torch.no_grad():
        for batch in (4, 6):
            a, k = zoo.inputs(name, batch, device)
            zoo.assert_matches(loaded(*a, **k), compiled(*a, **k), torch.float32)
            zoo.assert_matches(loaded(*a, **k), model(*a, **k), torch.float32)
    assert next(iter(loaded.engines[0].named_weights().values())).device.type == device


def test_saved_weights_are_the_engines_current_ones_and_stripped_files_need_a_refit(tmp_path):
    model, compiled, (args, _) = _compiled("mlp")
    new = zoo.build("mlp", seed=4)
    torchtrt_ext.refit(compiled, new.state_dict())
    torchtrt_ext.save(compiled, tmp_path / "full.ttx")
    torchtrt_ext.save(compiled, tmp_path / "stripped.ttx", include_weights=False)
    assert torch.equal(torchtrt_ext.load(tmp_path / "full.ttx")(*args), compiled(*args))
    stripped = torchtrt_ext.load(tmp_path / "stripped.ttx")
    with pytest.raises(RefitError, match=r"weight-stripped engine file .* torchtrt_ext.refit\(module, checkpoint\) first"):
        stripped(*args)
    torchtrt_ext.refit(stripped, new.state_dict())
    assert torch.equal(stripped(*args), compiled(*args))
    assert "weights stripped" in torchtrt_ext.inspect_file(tmp_path / "stripped.ttx")


def test_a_stripped_file_with_non_persistent_buffers_is_complete_after_a_state_dict_refit(tmp_path):
    model, compiled, (args, _) = _compiled("buffers")
    torchtrt_ext.save(compiled, tmp_path / "stripped.ttx", include_weights=False)
    stripped = torchtrt_ext.load(tmp_path / "stripped.ttx")
    torchtrt_ext.refit(stripped, model.state_dict())  # holds no 'shift': the file kept it
    assert torch.equal(stripped(*args), compiled(*args))


def test_every_flipped_bit_and_every_truncation_is_refused_cleanly(tmp_path):
    """1,000 single-bit flips at random offsets, then 100 truncations: every byte of the file is under
    a check, so each must be a clean EngineFileError (never a crash, never a wrong result)."""
    _, compiled, (args, _) = _compiled("mlp")
    path = tmp_path / "m.ttx"
    torchtrt_ext.save(compiled, path)
    original = path.read_bytes()
    rng = random.Random(0)
    bad = tmp_path / "bad.ttx"
    for _ in range(1000):
        data = bytearray(original)
        offset = rng.randrange(len(data))
        data[offset] ^= 1 << rng.randrange(8)
        bad.write_bytes(data)
        with pytest.raises(EngineFileError):
            torchtrt_ext.load(bad)
    for _ in range(100):
        bad.write_bytes(original[: rng.randrange(len(original))])
        with pytest.raises(EngineFileError, match="truncated|not a torchtrt_ext engine file|does not match"):
            torchtrt_ext.load(bad)
    assert torch.equal(torchtrt_ext.load(path)(*args), compiled(*args))  # the intact file still loads


@pytest.mark.cuda
def test_a_device_load_through_many_small_staging_buffers_is_exact_and_refuses_flips(tmp_path, monkeypatch):
    """Staging buffers far smaller than the weights: every region crosses several chunks and every
    buffer is reused many times by its reader thread; the result must be bit-exact, and a flipped bit
    in any region must be refused."""
    from torchtrt_ext.operations import files

    monkeypatch.setattr(files, "STAGING_BYTES", 4096)
    monkeypatch.setattr(files, "STAGING_BUFFERS", 3)
    _, compiled, (args, _) = _compiled("mlp", "cuda")
    path = tmp_path / "m.ttx"
    torchtrt_ext.save(compiled, path)
    loaded = torchtrt_ext.load(path)
    for name, value in compiled.engines[0].named_weights().items():
        assert torch.equal(loaded.engines[0].named_weights()[name], value), name
    assert torch.equal(loaded(*args), compiled(*args))
    original = path.read_bytes()
    rng = random.Random(1)
    bad = tmp_path / "bad.ttx"
    for _ in range(100):
        data = bytearray(original)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        bad.write_bytes(data)
        with pytest.raises(EngineFileError):
            torchtrt_ext.load(bad)


def test_clear_errors_for_wrong_files_versions_and_devices(tmp_path):
    _, compiled, _ = _compiled("mlp")
    path = tmp_path / "m.ttx"
    torchtrt_ext.save(compiled, path)
    data = path.read_bytes()
    cases = {
        "magic": (b"NOTTRTX\0" + data[8:], "not a torchtrt_ext engine file (bad magic bytes)"),
        "older": (
            data[:8] + struct.pack("<I", 1) + data[12:],
            "engine file format version 1: written by an older torchtrt_ext; this one reads version 3 only. "
            "The file must be saved again",
        ),
        "newer": (
            data[:8] + struct.pack("<I", 4) + data[12:],
            "engine file format version 4: written by a newer torchtrt_ext; this one reads version 3",
        ),
        "trailing": (data + b"\0", "has trailing bytes: the header describes"),
        "empty": (b"", "truncated: 0 bytes, shorter than the 32-byte preamble"),
    }
    for case, (content, message) in cases.items():
        bad = tmp_path / f"{case}.ttx"
        bad.write_bytes(content)
        with pytest.raises(EngineFileError) as e:
            torchtrt_ext.load(bad)
        assert str(e.value).startswith(f"{bad}: {message}"), case
    with pytest.raises(EngineFileError, match="no engine file at"):
        torchtrt_ext.load(tmp_path / "absent.ttx")
    with pytest.raises(EngineFileError, match=r"was saved from an engine on cpu; it loads on cpu devices only, not on cuda"):
        torchtrt_ext.load(path, device="cuda")


def test_save_refuses_what_it_cannot_write_and_leaves_no_partial_file(tmp_path):
    with pytest.raises(TorchTRTExtError, match="has no compiled graph yet"):
        torchtrt_ext.save(torchtrt_ext.compile(zoo.build("mlp")), tmp_path / "x.ttx")
    graph_break = torchtrt_ext.compile(zoo.build("graph_break"), zoo.inputs("graph_break", 4)[0])
    with pytest.raises(TorchTRTExtError, match=r"runs through dynamo \(graph breaks\)"):
        torchtrt_ext.save(graph_break, tmp_path / "x.ttx")
    with pytest.raises(TypeError, match="save takes what torchtrt_ext.compile returned"):
        torchtrt_ext.save(zoo.build("mlp"), tmp_path / "x.ttx")
    _, compiled, _ = _compiled("mlp")
    with pytest.raises(OSError):
        torchtrt_ext.save(compiled, tmp_path / "no" / "such" / "dir.ttx")
    assert os.listdir(tmp_path) == []


def test_inspect_command_prints_the_header_and_refuses_corrupt_files(tmp_path, capsys):
    _, compiled, _ = _compiled("mlp")
    path = tmp_path / "m.ttx"
    torchtrt_ext.save(compiled, path)
    assert cli(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "torchtrt_ext engine file, format version 3" in out and "fc1.weight: float32 (64, 32) 8192 bytes" in out
    assert "weights: 29248 bytes" in out
    path.write_bytes(path.read_bytes()[:100])
    assert cli(["inspect", str(path)]) == 1
    assert "truncated" in capsys.readouterr().err


_CACHE_SCRIPT = """
import os, sys, torch, torchtrt_ext
import torch._inductor.compile_fx as compile_fx_module
from tests import zoo
cache, second, saved = sys.argv[1], sys.argv[2] == "2", sys.argv[3]
real = (compile_fx_module.compile_fx, torch.export.load, torch.export.export)


def refuse(what):
    def call(*args, **kwargs):
        raise AssertionError(what + " was called on an engine cache hit")
    return call


def compiled_from_cache(name, seed, must_hit):
    model = zoo.build(name, seed=seed)
    args, kwargs = zoo.inputs(name, 4)
    if must_hit:  # a hit traces and compiles nothing
        compile_fx_module.compile_fx = refuse("compile_fx")
        torch.export.load, torch.export.export = refuse("torch.export.load"), refuse("torch.export.export")
    try:
        compiled = torchtrt_ext.compile(model, args, kwargs, cache_dir=cache)
    finally:
        compile_fx_module.compile_fx, torch.export.load, torch.export.export = real
    variant = compiled.variants[0]
    assert variant.from_cache == must_hit and variant.engine.artifact is not None, (name, variant.from_cache)
    with torch.no_grad():
        for batch in (4, 3, 9):  # fresh random inputs; the batch size is symbolic (dynamic_batch)
            args, kwargs = zoo.inputs(name, batch)
            zoo.assert_matches(compiled(*args, **kwargs), model(*args, **kwargs), torch.float32)
    assert len(compiled.variants) == 1
    return model, compiled, args, kwargs


# Process 1 fills the cache; process 2 binds the entries to its own models (other seeds: same shapes,
# other values) and must get right outputs for its own weights.
compiled_from_cache("mlp", 5 if second else 0, must_hit=second)
model, compiled, args, kwargs = compiled_from_cache("multi_io", 2 if second else 1, must_hit=second)
if second:
    with torch.no_grad():
        other = zoo.build("multi_io", seed=7)
        torchtrt_ext.refit(compiled, other.state_dict())
        zoo.assert_matches(compiled(*args, **kwargs), other(*args, **kwargs), torch.float32)
        third = zoo.build("multi_io", seed=8)
        model.load_state_dict(third.state_dict())  # followed by the engine (auto weight-follow)
        zoo.assert_matches(compiled(*args, **kwargs), third(*args, **kwargs), torch.float32)
        torchtrt_ext.save(compiled, saved)  # reads the graph from the entry (torch.export.load) now
        loaded = torchtrt_ext.load(saved)
        assert loaded.variants[0].engine.artifact is not None  # the saved file holds the compiled code too
        zoo.assert_matches(loaded(*args, **kwargs), third(*args, **kwargs), torch.float32)
    assert len(os.listdir(cache)) == 2
    compiled_from_cache("cnn", 0, must_hit=False)  # another model: a miss, a new entry
    assert len(os.listdir(cache)) == 3
print("done")
"""


def test_a_second_process_reuses_the_engine_cache_traces_nothing_and_is_keyed_by_the_model(tmp_path):
    """Each process has its own empty Inductor cache: only our cache_dir is shared. Process 2 gets its
    engines from the entries' compiled code (compile_fx, torch.export.load and torch.export.export
    refuse to run while it compiles), bound to its own models' weights; refit, auto weight-follow and
    save (the saved file loaded back) work on what it got; another model is a miss."""
    import subprocess
    import sys

    cache = str(tmp_path / "engines")
    for run in (1, 2):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{run}"), "PYTHONPATH": os.getcwd()}
        done = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, cache, str(run), str(tmp_path / "saved.ttx")],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split()[-1] == "done"


_real_export_load = torch.export.load


def _refuse_compiling(monkeypatch):
    import torch._inductor.compile_fx as compile_fx_module

    def refuse(*args, **kwargs):
        raise AssertionError("traced or compiled where the compiled code should have been loaded")

    monkeypatch.setattr(compile_fx_module, "compile_fx", refuse)
    monkeypatch.setattr(torch.export, "load", refuse)
    monkeypatch.setattr(torch.export, "export", refuse)


class _Counting(torch.nn.Module):
    """Updates a buffer and an input in place; its layer is used twice under two names (tied)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.again = self.fc
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("total", torch.zeros(8))

    def forward(self, x, acc):
        self.calls += 1
        y = self.again(self.fc(x))
        self.total.add_(y.sum(0))
        acc.mul_(0.5).add_(y)
        return {"y": y * self.calls, "scaled": (y.sum(), x.shape[0] * y)}


def test_a_cache_hit_binds_in_place_updates_tied_weights_and_output_structure(tmp_path, monkeypatch):
    cache = str(tmp_path / "engines")
    torch.manual_seed(0)
    first = _Counting()
    torchtrt_ext.compile(first, (torch.randn(4, 8), torch.randn(4, 8)), cache_dir=cache)
    model, twin = _Counting(), _Counting()
    twin.load_state_dict(model.state_dict())
    with monkeypatch.context() as patched:
        _refuse_compiling(patched)
        compiled = torchtrt_ext.compile(model, (torch.randn(4, 8), torch.randn(4, 8)), cache_dir=cache)
    (variant,) = compiled.variants
    assert variant.from_cache and variant.engine.artifact is not None
    assert compiled.engines[0].named_weights()["again.weight"] is compiled.engines[0].named_weights()["fc.weight"]
    with torch.no_grad():
        for batch in (4, 6):
            x, acc = torch.randn(batch, 8), torch.randn(batch, 8)
            acc_twin = acc.clone()
            zoo.assert_matches(compiled(x, acc), twin(x, acc_twin), torch.float32)
            torch.testing.assert_close(acc, acc_twin)
    torch.testing.assert_close(model.total, twin.total)
    assert float(model.calls) == float(twin.calls) == 2


def test_static_shapes_hit_too_and_another_shape_is_another_entry(tmp_path, monkeypatch):
    cache = tmp_path / "engines"
    model = zoo.build("buffers")
    (x,), _ = zoo.inputs("buffers", 4)
    torchtrt_ext.compile(model, (x,), cache_dir=str(cache), dynamic_batch=False)
    with monkeypatch.context() as patched:
        _refuse_compiling(patched)
        compiled = torchtrt_ext.compile(model, (x,), cache_dir=str(cache), dynamic_batch=False)
    assert compiled.variants[0].from_cache
    (x,), _ = zoo.inputs("buffers", 4)
    with torch.no_grad():
        zoo.assert_matches(compiled(x), model(x), torch.float32)
        (y,), _ = zoo.inputs("buffers", 5)
        zoo.assert_matches(compiled(y), model(y), torch.float32)  # a second variant, compiled and stored
    assert [v.from_cache for v in compiled.variants] == [True, False]
    assert len(list(cache.iterdir())) == 2


def test_where_inductor_cannot_save_the_code_the_entry_holds_the_graph_and_a_hit_compiles_it(tmp_path, monkeypatch, caplog):
    from torchtrt_ext.engines import builtin

    def unsaveable(artifact):
        raise RuntimeError("no aot_autograd artifacts")

    cache = str(tmp_path / "engines")
    model = zoo.build("mlp")
    args, _ = zoo.inputs("mlp", 4)
    with monkeypatch.context() as patched:
        patched.setattr(builtin, "_artifact_bytes", unsaveable)
        torchtrt_ext.compile(model, args, cache_dir=cache)
    assert "could not save the compiled code whole" in caplog.text
    again = torchtrt_ext.compile(model, args, cache_dir=cache)
    variant = again.variants[0]
    assert variant.from_cache and variant.engine.artifact is None  # the graph path: torch.export.load + compile_fx
    args, _ = zoo.inputs("mlp", 7)
    with torch.no_grad():
        zoo.assert_matches(again(*args), model(*args), torch.float32)


def test_save_of_a_cache_compiled_module_loads_its_compiled_code(tmp_path, monkeypatch):
    model, compiled, (args, kwargs) = _compiled("encoder", cache_dir=str(tmp_path / "engines"))
    full, stripped = tmp_path / "full.ttx", tmp_path / "stripped.ttx"
    torchtrt_ext.save(compiled, full)
    torchtrt_ext.save(compiled, stripped, include_weights=False)
    assert "1 with compiled code" in torchtrt_ext.inspect_file(str(full))
    with monkeypatch.context() as patched:
        _refuse_compiling(patched)
        patched.setattr(torch.export, "load", _real_export_load)  # load() reads the model's structure from the graph
        loaded = torchtrt_ext.load(full)
        empty = torchtrt_ext.load(stripped)
    assert loaded.variants[0].engine.artifact is not None
    (x,), _ = zoo.inputs("encoder", 3)
    with torch.no_grad():
        zoo.assert_matches(loaded(x), model(x), torch.float32)
        with pytest.raises(RefitError, match="weight-stripped"):
            empty(x)
        torchtrt_ext.refit(empty, model.state_dict())
        zoo.assert_matches(empty(x), model(x), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("options", [dict(cuda_graphs=True, dynamic_batch=False), dict(refit_double_buffer=True)],
                         ids=["cuda_graphs", "double_buffer"])
def test_a_cuda_cache_hit_runs_refits_and_follows_weights(tmp_path, monkeypatch, options):
    cache, dtype = str(tmp_path / "engines"), torch.float16
    torchtrt_ext.compile(zoo.build("encoder", "cuda", dtype), zoo.inputs("encoder", 4, "cuda", dtype)[0], cache_dir=cache, **options)
    model = zoo.build("encoder", "cuda", dtype, seed=1)
    with monkeypatch.context() as patched:
        _refuse_compiling(patched)
        compiled = torchtrt_ext.compile(model, zoo.inputs("encoder", 4, "cuda", dtype)[0], cache_dir=cache, **options)
    assert compiled.variants[0].from_cache and compiled.variants[0].engine.artifact is not None
    with torch.no_grad():
        for batch in (4,) if "dynamic_batch" in options else (4, 7):
            for _ in range(2):  # CUDA-graph mode: captured, then replayed
                (x,), _ = zoo.inputs("encoder", batch, "cuda", dtype)
                zoo.assert_matches(compiled(x), model(x), dtype)
        other = zoo.build("encoder", "cuda", dtype, seed=2)
        torchtrt_ext.refit(compiled, other.state_dict())
        zoo.assert_matches(compiled(x), other(x), dtype)
        third = zoo.build("encoder", "cuda", dtype, seed=3)
        model.load_state_dict(third.state_dict())  # followed by the engine
        zoo.assert_matches(compiled(x), third(x), dtype)
    assert len(compiled.variants) == 1


def _region(path, name):
    from torchtrt_ext.core.engine_file import EngineFile

    with EngineFile(str(path)) as f:
        for entry in f.header.blobs():
            if entry.name == name:
                return f.data_start + entry.region.offset, entry.region.nbytes
    raise KeyError(name)


def _rewrite(path, change):
    """Write the entry again with `change(header, blobs)` applied, every checksum valid."""
    from torchtrt_ext.core import engine_file
    from torchtrt_ext.core.engine_file import EngineFile

    with EngineFile(str(path)) as f:
        header = f.header
        entries = [e for e in header.tensors if e.region is not None] + header.blobs()
        data = path.read_bytes()
        blobs = {e.name: data[f.data_start + e.region.offset : f.data_start + e.region.offset + e.region.nbytes] for e in entries}
    change(header, blobs)
    engine_file.write(str(path), header, [(e, torch.frombuffer(bytearray(blobs[e.name]) or bytearray(1), dtype=torch.uint8)[: len(blobs[e.name])]) for e in entries])


def _garbage_code(header, blobs):
    blobs["artifact 0"] = b"not Inductor's binary format" * 10


def _other_dtype(header, blobs):
    header.artifacts[0].binding["signature"]["leaves"][0]["dtype"] = "float64"


def _missing_weight(header, blobs):
    header.artifacts[0].binding["lifted"]["weights"][0][1] = "no.such.weight"


@pytest.mark.parametrize(
    "damage",
    ["a flipped bit in the middle", "a flipped bit in the compiled code", "a flipped bit in the graph",
     "compiled code of another format", "a binding for other inputs", "a binding naming a missing weight"],
)
def test_a_corrupt_or_mismatched_engine_cache_entry_costs_a_recompile_never_a_wrong_engine(tmp_path, caplog, damage):
    cache = tmp_path / "engines"
    model = zoo.build("mlp")
    args, _ = zoo.inputs("mlp", 4)
    torchtrt_ext.compile(model, args, cache_dir=str(cache))
    (entry,) = cache.iterdir()
    if "flipped" in damage:
        data = bytearray(entry.read_bytes())
        if damage.endswith("middle"):
            at = len(data) // 2
        else:
            start, size = _region(entry, "artifact 0" if damage.endswith("code") else "program 0")
            at = start + size // 2
        data[at] ^= 0x10
        entry.write_bytes(data)
    else:
        _rewrite(entry, {"compiled code of another format": _garbage_code, "a binding for other inputs": _other_dtype,
                         "a binding naming a missing weight": _missing_weight}[damage])
    again = torchtrt_ext.compile(model, args, cache_dir=str(cache))
    assert not again.variants[0].from_cache
    assert "engine cache entry" in caplog.text and "not used" in caplog.text
    with torch.no_grad():
        zoo.assert_matches(again(*args), model(*args), torch.float32)
    third = torchtrt_ext.compile(model, args, cache_dir=str(cache))  # the entry was written again
    assert third.variants[0].from_cache and third.variants[0].engine.artifact is not None


_PEAK_SCRIPT = """
import sys, torch
from torchtrt_ext.operations.files import read
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS:")
contents = read(sys.argv[1])
contents.load_inductor_cache()
eps = [contents.program(i) for i in range(len(contents.header.programs))]
print(status("VmHWM:") - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_loading_on_the_host_reads_each_byte_once_into_its_place(tmp_path):
    """A CPU load's peak memory is the weights themselves plus small change: no whole-file buffer, no
    second copy (a plain read-then-copy would need twice the weights)."""
    import subprocess
    import sys

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(16)]).eval()  # 256 MiB
    compiled = torchtrt_ext.compile(model, (torch.randn(2, 2048),), dynamic_batch=False)
    path = tmp_path / "big.ttx"
    torchtrt_ext.save(compiled, path)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    del model, compiled
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr[-2000:]
    growth = int(done.stdout.split()[-1])
    assert weights <= growth <= weights + 96 * 2**20, f"peak growth {growth / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB of weights"
