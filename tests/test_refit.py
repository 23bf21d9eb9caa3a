"""Refit: new weights without recompiling, atomic on failure, followed automatically by the wrapper."""

import copy
import json
import struct

import pytest
import safetensors.torch
import torch

import torchtrt_ext
from tests import zoo
from tests.conftest import CPU_AND_CUDA

from torchtrt_ext import RefitError, WeightFileError


def _compiled(name, device, **options):
    model = zoo.build(name, device)
    args, kwargs = zoo.inputs(name, 4, device)
    return model, torchtrt_ext.compile(model, args, kwargs, **options), (args, kwargs)


def _weights(name, device, seed):
    """A new random state_dict for zoo model `name` (the same model built from another seed)."""
    return zoo.build(name, device, seed=seed).state_dict()


def _snapshot(compiled):
    return [{k: v.clone() for k, v in e.named_weights().items()} for e in compiled.engines]


def _assert_unchanged(compiled, snapshot, call, expected):
    for engine, before in zip(compiled.engines, snapshot):
        after = engine.named_weights()
        assert after.keys() == before.keys()
        for name in before:
            assert torch.equal(after[name], before[name]), f"{name} changed although the refit failed"
    assert torch.equal(call(), expected)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("source", ["state_dict", "module", "safetensors", "checkpoint"])
def test_refit_equals_a_fresh_compile_with_the_new_weights(device, source, tmp_path):
    model, compiled, (args, kwargs) = _compiled("cnn", device)
    new = _weights("cnn", device, seed=1)
    if source == "state_dict":
        weights = new
    elif source == "module":
        weights = zoo.build("cnn", device, seed=1)
    elif source == "safetensors":
        weights = tmp_path / "w.safetensors"
        safetensors.torch.save_file({k: v.cpu().contiguous() for k, v in new.items()}, str(weights))
    else:
        weights = tmp_path / "w.pt"
        torch.save({"state_dict": {k: v.cpu() for k, v in new.items()}}, weights)
    report = torchtrt_ext.refit(compiled, weights)
    assert report.engines == 1 and "conv1.weight" in report.updated and report.missing == ()
    assert report.unused == ()

    fresh_model = zoo.build("cnn", device, seed=1)
    fresh = torchtrt_ext.compile(fresh_model, args, kwargs)
    with torch.no_grad():
        for batch in (4, 7):
            a, k = zoo.inputs("cnn", batch, device)
            out, want = compiled(*a, **k), fresh(*a, **k)
            if device == "cpu":
                assert torch.equal(out, want), "refit and a fresh compile of the same weights differ"
            else:
                # Two compiles on the GPU may take different convolution algorithms (cuDNN picks by the
                # workspace free at the time: other test processes' memory; TF32 by default for float32
                # convolutions), which round differently: the tolerance against eager. A weight left out
                # of the refit moves outputs by orders of magnitude more.
                zoo.assert_matches(out, want, torch.float32)
            zoo.assert_matches(out, fresh_model(*a, **k), torch.float32)
    assert compiled.original is model  # no recompile, same module


def test_a_wrapper_refit_reads_the_model_tensors_without_walking_the_module_tree():
    """A refit's host time is its cost on the GPU (the copies are one kernel): through the wrapper the
    model's tensors come from the watched slots. Walking the module tree (named_parameters) took half of
    a 22-layer Llama's refit on the host. The model still takes the new values."""
    model = zoo.build("mlp", "cpu")
    x = zoo.inputs("mlp", 4, "cpu")[0][0]
    compiled = torchtrt_ext.compile(model, (x,))
    walks = []
    for sub in model.modules():
        original = sub.named_modules
        sub.named_modules = lambda *a, _original=original, **k: walks.append(1) or _original(*a, **k)
    new = _weights("mlp", "cpu", seed=3)
    report = torchtrt_ext.refit(compiled, new)
    assert walks == [] and set(report.updated) == set(new)
    for name, value in model.state_dict().items():
        assert torch.equal(value, new[name]), name
    with torch.no_grad():
        zoo.assert_matches(compiled(x), zoo.build("mlp", "cpu", seed=3)(x), torch.float32)
    # A submodule replaced after the compile: its tensors are none of the engine's, and take the values too
    model.fc3 = torch.nn.Linear(model.fc3.in_features, model.fc3.out_features)
    new = _weights("mlp", "cpu", seed=4)
    torchtrt_ext.refit(compiled, new)
    for name, value in model.state_dict().items():
        assert torch.equal(value, new[name]), name
    with torch.no_grad():
        zoo.assert_matches(compiled(x), model(x), torch.float32)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_refit_through_the_torch_compile_backend(device):
    model = zoo.build("graph_break", device)  # two graphs: two engines share the refit
    compiled = torch.compile(model, backend="torchtrt_ext")
    x = zoo.inputs("graph_break", 4, device)[0][0]
    with torch.no_grad():
        compiled(x)
        new_model = zoo.build("graph_break", device, seed=3)
        report = torchtrt_ext.refit(compiled, new_model.state_dict())
        assert report.engines == 2
        for _ in range(3):
            x = zoo.inputs("graph_break", 4, device)[0][0]
            zoo.assert_matches(compiled(x), new_model(x), torch.float32)
        torchtrt_ext.refit(model, _weights("graph_break", device, seed=4))  # the model itself works too
        zoo.assert_matches(compiled(x), zoo.build("graph_break", device, seed=4)(x), torch.float32)


def test_floating_point_values_convert_to_the_engine_dtype():
    model, compiled, (args, kwargs) = _compiled("mlp", "cpu")
    new = {k: v.double() for k, v in _weights("mlp", "cpu", seed=2).items()}
    torchtrt_ext.refit(compiled, new)
    zoo.assert_matches(compiled(*args), zoo.build("mlp", "cpu", seed=2)(*args), torch.float32)
    assert all(w.dtype == torch.float32 for w in compiled.engines[0].named_weights().values())


def test_strict_false_keeps_missing_weights_and_ignores_unknown_names():
    model, compiled, (args, _) = _compiled("mlp", "cpu")
    new = _weights("mlp", "cpu", seed=2)
    partial = {"fc1.weight": new["fc1.weight"], "not.a.weight": torch.zeros(3)}
    report = torchtrt_ext.refit(compiled, partial, strict=False)
    assert report.updated == ("fc1.weight",) and report.unused == ("not.a.weight",)
    assert "fc2.weight" in report.missing
    expected = copy.deepcopy(model)
    assert torch.equal(expected.fc1.weight, new["fc1.weight"])  # the model shares the engine's memory
    zoo.assert_matches(compiled(*args), expected(*args), torch.float32)


FAILURES = {
    "missing": (
        lambda sd: {k: v for k, v in sd.items() if k != "fc2.bias"},
        "fc2.bias: missing from the new weights (pass strict=False to keep its current value)",
    ),
    "unknown": (
        lambda sd: {**sd, "fc9.weight": torch.zeros(2)},
        "fc9.weight: is not a weight of the compiled model (pass strict=False to ignore it)",
    ),
    "shape": (
        lambda sd: {**sd, "fc1.weight": torch.zeros(32, 64)},
        "fc1.weight: has shape (32, 64), but the engine's weight has shape (64, 32)",
    ),
    "dtype": (
        lambda sd: {**sd, "fc1.bias": torch.zeros(64, dtype=torch.int64)},
        "fc1.bias: has dtype torch.int64, which cannot become the engine's torch.float32",
    ),
    "not_a_tensor": (
        lambda sd: {**sd, "fc3.bias": [0.0] * 16},
        "fc3.bias: is not a tensor (got list)",
    ),
}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("case", sorted(FAILURES))
def test_a_refused_refit_names_the_fault_and_changes_nothing(device, case):
    model, compiled, (args, _) = _compiled("mlp", device)
    expected = compiled(*args).clone()
    snapshot = _snapshot(compiled)
    make, line = FAILURES[case]
    new = _weights("mlp", device, seed=5)
    with pytest.raises(RefitError) as e:
        torchtrt_ext.refit(compiled, make(new))
    assert str(e.value) == "refit refused, the engines are unchanged; 1 weight(s) failed:\n  " + line
    assert list(e.value.failures) == [line.split(":")[0]]
    _assert_unchanged(compiled, snapshot, lambda: compiled(*args), expected)


def test_every_failing_name_is_listed_at_once():
    model, compiled, (args, _) = _compiled("mlp", "cpu")
    new = _weights("mlp", "cpu", seed=5)
    new["fc1.weight"] = torch.zeros(1)
    del new["fc2.weight"]
    with pytest.raises(RefitError) as e:
        torchtrt_ext.refit(compiled, new)
    assert sorted(e.value.failures) == ["fc1.weight", "fc2.weight"]


def _write_safetensors(path, header: dict, data: bytes, header_len: int | None = None):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len))
        f.write(raw)
        f.write(data)


BAD_FILES = {
    "truncated": (
        lambda p, sd: (safetensors.torch.save_file(sd, str(p)), p.write_bytes(p.read_bytes()[:-100])),
        "is not a valid safetensors file (Error while deserializing header: incomplete metadata, file not fully covered)",
    ),
    "header_length": (
        lambda p, sd: _write_safetensors(p, {}, b"", header_len=10**9),
        "is not a valid safetensors file (Error while deserializing header: header too large)",
    ),
    "not_json": (
        lambda p, sd: p.write_bytes(struct.pack("<Q", 5) + b"{abcd" + b"\0" * 16),
        "is not a valid safetensors file (Error while deserializing header: invalid JSON in header",
    ),
    "size_mismatch": (
        lambda p, sd: _write_safetensors(p, {"fc1.bias": {"dtype": "F32", "shape": [64], "data_offsets": [0, 128]}}, b"\0" * 128),
        "is not a valid safetensors file (Error while deserializing header: invalid shape, data type, or offset for tensor",
    ),
    "unknown_dtype": (
        lambda p, sd: _write_safetensors(p, {"fc1.bias": {"dtype": "Q4", "shape": [64], "data_offsets": [0, 32]}}, b"\0" * 32),
        "is not a valid safetensors file (Error while deserializing header: invalid JSON in header: unknown variant `Q4`",
    ),
    "overlap": (
        lambda p, sd: _write_safetensors(
            p,
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            b"\0" * 24,
        ),
        "is not a valid safetensors file (Error while deserializing header: invalid offset for tensor `b`)",
    ),
    "garbage": (lambda p, sd: p.write_bytes(b"\x01" * 64), "could not be read as a torch checkpoint or safetensors file"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_weights_file_is_a_clear_error_and_changes_nothing(case, tmp_path):
    model, compiled, (args, _) = _compiled("mlp", "cpu")
    expected = compiled(*args).clone()
    snapshot = _snapshot(compiled)
    path = tmp_path / ("w.safetensors" if case != "garbage" else "w.bin")
    make, text = BAD_FILES[case]
    make(path, {k: v.contiguous() for k, v in _weights("mlp", "cpu", seed=6).items()})
    with pytest.raises(WeightFileError, match=text.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        torchtrt_ext.refit(compiled, path)
    _assert_unchanged(compiled, snapshot, lambda: compiled(*args), expected)
    with pytest.raises(WeightFileError, match="no weights file at"):
        torchtrt_ext.refit(compiled, tmp_path / "absent.safetensors")


def test_refit_none_refuses_and_identical_takes_only_the_build_time_values():
    _, frozen, _ = _compiled("mlp", "cpu", refit="none")
    with pytest.raises(RefitError, match=r"compiled with refit='none'.*compile with refit='refit'"):
        torchtrt_ext.refit(frozen, _weights("mlp", "cpu", seed=0))
    model, same, (args, _) = _compiled("mlp", "cpu", refit="identical")
    expected = same(*args).clone()
    torchtrt_ext.refit(same, {k: v.clone() for k, v in model.state_dict().items()})  # equal values: fine
    snapshot = _snapshot(same)
    with pytest.raises(RefitError, match="fc1.weight: differs from the weight the engine was built with"):
        torchtrt_ext.refit(same, _weights("mlp", "cpu", seed=7))
    _assert_unchanged(same, snapshot, lambda: same(*args), expected)


def test_refit_before_any_engine_exists_says_to_call_first():
    compiled = torchtrt_ext.compile(zoo.build("mlp"))
    with pytest.raises(RefitError, match="has no torchtrt_ext engines yet.*call the compiled module once"):
        torchtrt_ext.refit(compiled, _weights("mlp", "cpu", seed=1))
    with pytest.raises(TypeError, match="refit takes what torchtrt_ext.compile returned"):
        torchtrt_ext.refit(42, {})
    with pytest.raises(TypeError, match="weights must be a state_dict"):
        torchtrt_ext.refit(_compiled("mlp", "cpu")[1], 3.5)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_double_buffered_refits_alternate_buffers_and_stay_correct(device):
    model, compiled, (args, _) = _compiled("cnn", device, refit_double_buffer=True)
    engine = compiled.engines[0]
    weight_bytes = engine.memory().weight_bytes
    assert engine.memory().owned_bytes == 0
    for seed in (1, 2, 3, 4):
        new = _weights("cnn", device, seed)
        partial = {k: v for k, v in new.items() if k != "head.bias"}  # one weight kept across refits
        torchtrt_ext.refit(compiled, partial, strict=False)
        expected = zoo.build("cnn", device, seed=seed)
        expected.head.bias.data.copy_(zoo.build("cnn", device, seed=0).head.bias)
        zoo.assert_matches(compiled(*args), expected(*args), torch.float32)
    assert engine.memory().owned_bytes == weight_bytes  # the second buffer, and nothing more


def test_double_buffer_out_of_memory_leaves_the_engine_unchanged(monkeypatch):
    model, compiled, (args, _) = _compiled("mlp", "cpu", refit_double_buffer=True)
    expected = compiled(*args).clone()
    snapshot = _snapshot(compiled)

    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(torch, "empty_like", no_memory)
    with pytest.raises(RefitError, match=r"out of memory allocating the second weight buffer \(.* MiB\).*unchanged"):
        torchtrt_ext.refit(compiled, _weights("mlp", "cpu", seed=1))
    monkeypatch.undo()
    _assert_unchanged(compiled, snapshot, lambda: compiled(*args), expected)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_wrapper_follows_load_state_dict_in_place_updates_and_reassignment(device):
    model, compiled, (args, _) = _compiled("mlp", device)
    engine = compiled.engines[0]
    reference = zoo.build("mlp", device)
    with torch.no_grad():
        compiled.load_state_dict(_weights("mlp", device, seed=1))  # in place, through the wrapper
        reference.load_state_dict(_weights("mlp", device, seed=1))
        zoo.assert_matches(compiled(*args), reference(*args), torch.float32)

        for p, q in zip(model.parameters(), reference.parameters()):  # an optimizer-like step
            p.mul_(0.5).add_(0.1)
            q.mul_(0.5).add_(0.1)
        zoo.assert_matches(compiled(*args), reference(*args), torch.float32)

        model.fc2.weight = torch.nn.Parameter(torch.randn(64, 64, device=device))  # reassignment
        reference.fc2.weight = torch.nn.Parameter(model.fc2.weight.detach().clone())
        zoo.assert_matches(compiled(*args), reference(*args), torch.float32)
        assert engine.named_weights()["fc2.weight"].data_ptr() == model.fc2.weight.data_ptr()  # read in place

        model.load_state_dict(_weights("mlp", device, seed=2), assign=True)  # on the original, by assignment
        reference.load_state_dict(_weights("mlp", device, seed=2))
        zoo.assert_matches(compiled(*args), reference(*args), torch.float32)
    assert compiled.engines == [engine]  # never recompiled


def test_wrapper_refuses_weights_it_cannot_follow_and_changes_nothing():
    model, compiled, (args, _) = _compiled("mlp", "cpu")
    expected = compiled(*args).clone()
    original = model.fc1.weight
    model.fc1.weight = torch.nn.Parameter(torch.zeros(64, 33))
    with pytest.raises(RefitError) as e:
        compiled(*args)
    assert str(e.value) == (
        "MLP's weights changed in a way the compiled engines cannot follow; compile the model again with "
        "torchtrt_ext.compile:\n  fc1.weight: is now (64, 33) torch.float32 on cpu, but the engine was "
        "compiled for (64, 32) torch.float32 on cpu"
    )
    model.fc1.weight = original
    assert torch.equal(compiled(*args), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("double_buffer", [False, True])
def test_refit_keeps_cuda_graphs_working(double_buffer):
    model, compiled, (args, _) = _compiled("encoder", "cuda", cuda_graphs=True, refit_double_buffer=double_buffer)
    engine = compiled.engines[0]
    with torch.no_grad():
        compiled(*args)
        for seed in (1, 2, 3):
            torchtrt_ext.refit(compiled, _weights("encoder", "cuda", seed))
            zoo.assert_matches(compiled(*args), zoo.build("encoder", "cuda", seed=seed)(*args), torch.float32)
    assert engine.graphs_captured == (2 if double_buffer else 1)  # per weight buffer, never more


@pytest.mark.cuda
def test_fp32_checkpoint_into_an_fp16_engine_and_pinned_sources():
    model = zoo.build("mlp", "cuda", dtype=torch.float16)
    x = torch.randn(4, 32, device="cuda", dtype=torch.float16)
    compiled = torchtrt_ext.compile(model, (x,))
    new = {k: v.pin_memory() for k, v in zoo.build("mlp", "cpu", seed=3).state_dict().items()}
    torchtrt_ext.refit(compiled, new)
    zoo.assert_matches(compiled(x), zoo.build("mlp", "cuda", dtype=torch.float16, seed=3)(x), torch.float16)


@pytest.mark.cuda
def test_double_buffer_out_of_device_memory_leaves_the_engine_unchanged():
    torch.cuda.empty_cache()
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.Linear(4096, 4096)).cuda().eval()
    x = torch.randn(2, 4096, device="cuda")
    compiled = torchtrt_ext.compile(model, (x,), refit_double_buffer=True)
    expected = compiled(x).clone()
    snapshot = _snapshot(compiled)
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    # This process may allocate 16 MiB more than it holds now, less than the 128 MiB of weights. A cap
    # on this process's allocator, not a hog of the device's free memory, which would starve other
    # test processes running at the same time.
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (16 << 20)) / total)
    try:
        with pytest.raises(RefitError, match="out of memory allocating the second weight buffer"):
            torchtrt_ext.refit(compiled, new)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    _assert_unchanged(compiled, snapshot, lambda: compiled(x), expected)


@pytest.mark.cuda
def test_refit_of_large_and_small_cuda_weights():
    """Weights above and below the fused-copy threshold, from CUDA sources, fp16 into fp16 (one batched
    kernel) and fp32 into fp16 (converted): equal to a fresh compile with the new weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 64)).cuda().half().eval()
    x = torch.randn(8, 1024, device="cuda", dtype=torch.float16)
    compiled = torchtrt_ext.compile(model, (x,), dynamic_batch=False)
    torch.manual_seed(1)
    fresh_model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 64)).cuda().half().eval()
    new = {k: v.float() if k.startswith("2.") else v.clone() for k, v in fresh_model.state_dict().items()}
    torchtrt_ext.refit(compiled, new)
    fresh = torchtrt_ext.compile(fresh_model, (x,), dynamic_batch=False)
    with torch.no_grad():
        assert torch.equal(compiled(x), fresh(x))
        for name, value in fresh_model.state_dict().items():
            assert torch.equal(compiled.engines[0].named_weights()[name], value), name


@pytest.mark.cuda
def test_runtime_device_copies_match_and_check_every_pair_first():
    from torchtrt_ext.core.runtime import _C

    src = [torch.randn(1000, device="cuda"), torch.randn(3, 5, device="cuda", dtype=torch.float16)]
    dst = [torch.empty_like(t) for t in src]
    _C.copy_async(dst, src)
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    before = [d.clone() for d in dst]
    with pytest.raises(ValueError, match="pair 1 is not two contiguous tensors of one dtype and size"):
        _C.copy_async(dst, [src[0] * 2, src[1].t()])
    assert all(torch.equal(d, b) for d, b in zip(dst, before))  # nothing copied
    with pytest.raises(ValueError, match="copy_async: wait and record need a stream"):
        _C.copy_async(dst, src, None, None, _C.Event(0))
    assert all(torch.equal(d, b) for d, b in zip(dst, before))


def _nonzero(numel, dtype, device="cuda"):
    """Random values, none of them zero (a copy that writes nothing or zeros cannot pass)."""
    if dtype.is_floating_point:
        return (torch.rand(numel, device=device) + 0.5).to(dtype)  # [0.5, 1.5): no zero in fp16/bf16 either
    return torch.randint(1, 127, (numel,), device=device, dtype=dtype)


# (dtype, elements): 1 element, 7 bytes, 16 bytes, 65537 bytes, 64 KiB exactly, 3 MiB + 5 bytes, 2 MiB +
# 6 bytes in fp16 (several tiles, a tail), no bytes at all.
_BATCHED_CASES = [
    (torch.float32, 1),
    (torch.int8, 7),
    (torch.float16, 8),
    (torch.int8, 65537),
    (torch.bfloat16, 32768),
    (torch.int8, 3 * 2**20 + 5),
    (torch.float16, 2**20 + 3),
    (torch.float32, 0),
]


def _batched_pairs():
    """Destinations pre-filled with other random values, plus sliced destinations whose base tensors
    (returned with the slice bounds) must keep every byte around the slice: at a 2-element (8-byte)
    offset, so not 16-byte aligned (a memcpy); at a 16-byte offset with a 1-byte tail (the kernel, which
    must not write past it); whole, from a source at a 3-byte offset (a memcpy); at a 2-element fp16
    offset (4 bytes, a memcpy)."""
    torch.manual_seed(0)
    src = [_nonzero(n, dtype) for dtype, n in _BATCHED_CASES]
    dst = [_nonzero(n, dtype) for dtype, n in _BATCHED_CASES]
    bases = []
    for dtype, offset, n, src_offset in [
        (torch.float32, 2, 1000, 0),
        (torch.int8, 16, 65537, 0),
        (torch.int8, 0, 1000, 3),
        (torch.float16, 2, 4099, 2),
    ]:
        base = _nonzero(offset + n + 64, dtype)
        dst.append(base[offset : offset + n])
        src.append(_nonzero(src_offset + n, dtype)[src_offset:])
        bases.append((base, base.clone(), offset, offset + n))
    return dst, src, bases


def _assert_copied(dst, src, bases):
    for i, (d, s) in enumerate(zip(dst, src)):
        assert torch.equal(d, s), f"pair {i} ({s.dtype}, {s.numel()} elements) differs from its source"
    for base, before, start, end in bases:
        assert torch.equal(base[:start], before[:start]) and torch.equal(base[end:], before[end:]), "bytes around a slice changed"


@pytest.mark.cuda
def test_batched_copy_copies_every_pair_exactly_in_one_call():
    from torchtrt_ext.core.runtime import _C

    dst, src, bases = _batched_pairs()
    assert [(d.data_ptr() % 16, s.data_ptr() % 16) for d, s in zip(dst[-4:], src[-4:])] == [(8, 0), (0, 0), (0, 3), (4, 4)]
    assert all(not torch.equal(d, s) for d, s in zip(dst, src) if d.numel())
    torch.cuda.synchronize()
    _C.batched_copy(dst, src)
    torch.cuda.synchronize()
    _assert_copied(dst, src, bases)
    _C.batched_copy([], [])  # nothing to do


@pytest.mark.cuda
def test_batched_copy_runs_on_the_current_stream():
    """The sources are written on a side stream after a long wait there: only a copy ordered on that
    stream (not on the default one, which is idle) reads the new values."""
    from torchtrt_ext.core.runtime import _C

    dst, values, bases = _batched_pairs()
    src = [torch.empty_like(v).copy_(-v) for v in values]  # stale values until the side stream writes them
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # tens of milliseconds: the default stream would long be done
        for s, v in zip(src, values):
            s.copy_(v)
        _C.batched_copy(dst, src)
        assert not side.query()  # enqueued without waiting for the device
    side.synchronize()
    _assert_copied(dst, values, bases)


@pytest.mark.cuda
def test_batched_copy_checks_every_pair_before_copying():
    from torchtrt_ext.core.runtime import _C

    src = [torch.randn(1000, device="cuda") + 5, torch.randn(3, 5, device="cuda", dtype=torch.float16) + 5]
    dst = [torch.zeros_like(t) for t in src]
    faults = {
        "pair 1 has a source that is not contiguous": [src[0], src[1].t().contiguous().t()],
        r"pair 1 has dtypes that differ \(destination Half, source Float\)": [src[0], src[1].float()],
        r"pair 1 has sizes that differ \(15 elements in the destination, 14 in the source\)": [src[0], src[1].flatten()[:14]],
        "pair 1 has its source on cpu and its destination on cuda:0": [src[0], src[1].cpu()],
    }
    for message, sources in faults.items():
        with pytest.raises(ValueError, match=message):
            _C.batched_copy(dst, sources)
    with pytest.raises(ValueError, match="pair 0 has a destination that is not contiguous"):
        _C.batched_copy([torch.zeros(5, 3, device="cuda").t()], [torch.zeros(3, 5, device="cuda")])
    with pytest.raises(ValueError, match="pair 0 has its destination on cpu, not on a CUDA device"):
        _C.batched_copy([torch.zeros(2)], [torch.zeros(2)])
    torch.cuda.synchronize()
    assert all(not d.any() for d in dst)  # nothing copied, not even pair 0


def test_batched_copy_refuses_lists_of_different_lengths():
    from torchtrt_ext.core.runtime import _C

    with pytest.raises(ValueError, match=r"batched_copy: dst and src differ in length \(2 and 1 tensors\)"):
        _C.batched_copy([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)])
    _C.batched_copy([], [])  # nothing to copy: fine in every build


def test_batched_copy_refuses_cpu_tensors():
    from torchtrt_ext.core.runtime import _C, built_with_cuda

    message = "pair 0 has its destination on cpu, not on a CUDA device" if built_with_cuda else "batched_copy: this build has no CUDA"
    dst = torch.zeros(4)
    with pytest.raises(ValueError, match=message):
        _C.batched_copy([dst], [torch.ones(4)])
    assert not dst.any()


def test_copy_without_cuda_pairs_never_calls_the_batched_copy():
    """CPU pairs take copy_ (the CPU build's batched_copy would refuse them)."""
    from torchtrt_ext.engines.copy import copy_weights

    dst, src = [torch.zeros(3), torch.zeros(2, 2)], [torch.arange(3.0), torch.ones(2, 2)]
    copy_weights(dst, src)
    assert all(torch.equal(d, s) for d, s in zip(dst, src))


def test_strict_refit_needs_the_state_dict_only_and_keeps_non_persistent_buffers():
    model, compiled, (args, _) = _compiled("buffers", "cpu")
    shift = model.shift.clone()
    new = zoo.build("buffers", seed=3)
    report = torchtrt_ext.refit(compiled, new.state_dict())  # holds no 'shift' (not persistent)
    assert "shift" in report.missing and "shift" not in report.updated
    assert torch.equal(compiled.engines[0].named_weights()["shift"], shift)
    new.shift.copy_(shift)
    zoo.assert_matches(compiled(*args), new(*args), torch.float32)
