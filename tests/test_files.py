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
    from torchtrt_ext import files

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
        "version": (
            data[:8] + struct.pack("<I", 2) + data[12:],
            "engine file format version 2; this torchtrt_ext reads version 1 (save the engine again with this version)",
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
    assert "torchtrt_ext engine file, format version 1" in out and "fc1.weight: float32 (64, 32) 8192 bytes" in out
    assert "weights: 29248 bytes" in out
    path.write_bytes(path.read_bytes()[:100])
    assert cli(["inspect", str(path)]) == 1
    assert "truncated" in capsys.readouterr().err


_CACHE_SCRIPT = """
import sys, torch, torchtrt_ext
from tests import zoo
name, cache, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = zoo.build(name, seed=seed)
args, kwargs = zoo.inputs(name, 4)
compiled = torchtrt_ext.compile(model, args, kwargs, cache_dir=cache)
zoo.assert_matches(compiled(*args, **kwargs), model(*args, **kwargs), torch.float32)
print("from_cache", compiled._variants[0].from_cache)
"""


def _in_fresh_process(tmp_path, run, *argv):
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{run}"), "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()[-1] == "True"


def test_engine_cache_is_reused_by_a_second_process_and_keyed_by_the_model(tmp_path):
    """Each process has its own empty Inductor cache: only our cache_dir is shared. The second process
    binds the cached graph to its own model's weights (another seed: same shapes, other values)."""
    cache = str(tmp_path / "engines")
    assert not _in_fresh_process(tmp_path, 1, "mlp", cache, "0")
    assert len(os.listdir(cache)) == 1
    assert _in_fresh_process(tmp_path, 2, "mlp", cache, "5")  # a hit, and right for its own weights
    assert not _in_fresh_process(tmp_path, 3, "cnn", cache, "0")  # another model: a miss
    assert len(os.listdir(cache)) == 2


def test_a_corrupt_engine_cache_entry_costs_a_recompile_never_a_wrong_engine(tmp_path, caplog):
    cache = tmp_path / "engines"
    model = zoo.build("mlp")
    args, _ = zoo.inputs("mlp", 4)
    torchtrt_ext.compile(model, args, cache_dir=str(cache))
    (entry,) = cache.iterdir()
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x10
    entry.write_bytes(data)
    again = torchtrt_ext.compile(model, args, cache_dir=str(cache))
    assert not again._variants[0].from_cache
    assert "engine cache entry" in caplog.text and "not used" in caplog.text
    zoo.assert_matches(again(*args), model(*args), torch.float32)


_PEAK_SCRIPT = """
import sys, torch
from torchtrt_ext.files import read_programs
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS:")
header, eps = read_programs(sys.argv[1])
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
