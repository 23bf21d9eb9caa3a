"""Engine-file integrity (issue 13): positional per-region checksums, the one header schema, and
signatures read back without evaluating anything.

Files are real ones (torchtrt_ext.compile of a small module, then torchtrt_ext.save), corrupted on
purpose in every region; each corruption here keeps the old checksum (the sum of int32 words) the same,
so the old format would have loaded every one of them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import struct
import zlib

import pytest
import sympy
import torch
from torch.export import Dim

import torchtrt_ext
from torchtrt_ext import EngineFileError
from torchtrt_ext.core import engine_file, file_checksum, file_layout
from torchtrt_ext.core import signature as _signature
from torchtrt_ext.operations import files


EngineFile, Header = engine_file.EngineFile, engine_file.Header
InputSignature, parse_size = _signature.InputSignature, _signature.parse_size

PWNED = "__import__('os').system('touch PWNED')"


class _Small(torch.nn.Module):
    """Weights and biases (state tensors) and a non-persistent buffer (a constant): every tensor at least
    128 bytes, so that two 64-byte blocks fit in each."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 32)
        self.register_buffer("shift", torch.randn(32), persistent=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) + self.shift


def _save(tmp, name, device="cpu", **options):
    torch.manual_seed(0)
    model = _Small().to(device).eval()
    x = torch.randn(4, 32, device=device)
    compiled = torchtrt_ext.compile(model, (x,), **options)
    path = tmp / f"{name}.ttx"
    torchtrt_ext.save(compiled, path)
    with torch.no_grad():
        return path, x, compiled(x)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two files that together hold every kind of region: 'plain' (tensors, the graph, Inductor's cache)
    and 'compiled code' (tensors, the graph, the compiled code saved whole: compiled with cache_dir)."""
    torch._dynamo.reset()
    tmp = tmp_path_factory.mktemp("files")
    plain = _save(tmp, "plain")
    code = _save(tmp, "code", cache_dir=str(tmp / "engines"))
    torch._dynamo.reset()
    return {"plain": plain, "compiled code": code}


def _kind(where: str, header: Header) -> str:
    if where.startswith("tensors"):
        return f"{header.tensors[int(where.split('[')[1].split(']')[0])].kind} tensor"
    return {"programs": "graph", "artifacts": "compiled code", "inductor_cache": "Inductor cache"}[where.split("[")[0].split(".")[0]]


def _regions(path):
    """(field, kind, offset in the file, nbytes) of every region with data."""
    with EngineFile(str(path)) as f:
        return [
            (where, _kind(where, f.header), f.data_start + r.offset, r.nbytes)
            for where, r in f.header.regions()
            if r.nbytes
        ]


def _word_sum(data: bytes) -> int:
    """The format-1 checksum: the sum of little-endian int32 words mod 2**64."""
    data += b"\0" * (-len(data) % 4)
    return sum(struct.unpack(f"<{len(data) // 4}i", data)) % 2**64


def _swap(width: int):
    """Swap two unequal `width`-byte pieces of a region."""

    def swap(region: bytearray, rng: random.Random) -> None:
        while True:
            i, j = sorted(rng.sample(range(len(region) // width), 2))
            a, b = region[width * i : width * (i + 1)], region[width * j : width * (j + 1)]
            if a != b:
                region[width * i : width * (i + 1)], region[width * j : width * (j + 1)] = b, a
                return

    return swap


def _plus_minus_k(region: bytearray, rng: random.Random) -> None:
    words = len(region) // 4
    i, j = rng.sample(range(words), 2)
    k = rng.choice([1, 0x10000, 0x12345])
    for w, delta in ((i, k), (j, -k)):
        value = struct.unpack_from("<I", region, 4 * w)[0]
        struct.pack_into("<I", region, 4 * w, (value + delta) % 2**32)


CORRUPTIONS = {"swap two 4-byte words": _swap(4), "+k and -k in two words": _plus_minus_k, "swap two 64-byte blocks": _swap(64)}


def _corrupt_every_region(path, tmp_path, corrupt, load):
    """Each region of `path` corrupted in turn (three times, at random places): every load must raise
    EngineFileError naming the region, while the old word sum of the region stays the same."""
    original = path.read_bytes()
    rng = random.Random(13)
    bad = tmp_path / "bad.ttx"
    regions = _regions(path)
    assert regions
    for where, kind, offset, nbytes in regions:
        for _ in range(3):
            data = bytearray(original)
            region = bytearray(data[offset : offset + nbytes])
            corrupt(region, rng)
            assert region != data[offset : offset + nbytes]
            assert _word_sum(bytes(region)) == _word_sum(bytes(data[offset : offset + nbytes])), "the old sum misses it"
            data[offset : offset + nbytes] = region
            bad.write_bytes(data)
            with pytest.raises(EngineFileError, match="does not match its checksum"):
                load(bad)
    return regions


def test_the_two_files_hold_every_kind_of_region_and_load_intact(saved):
    kinds = {kind for path, _, _ in saved.values() for _, kind, _, _ in _regions(path)}
    assert kinds == {"state tensor", "constant tensor", "graph", "compiled code", "Inductor cache"}
    for path, x, expected in saved.values():
        with torch.no_grad():
            assert torch.equal(torchtrt_ext.load(path)(x), expected)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_swaps_compensating_changes_and_moved_blocks_in_every_region_are_refused(saved, tmp_path, corruption):
    for path, _, _ in saved.values():
        _corrupt_every_region(path, tmp_path, CORRUPTIONS[corruption], torchtrt_ext.load)


@pytest.mark.cuda
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_device_load_checks_each_region_on_the_device_through_small_staging_buffers(tmp_path, monkeypatch, corruption):
    """Weights read to the GPU (their checksums computed there), each region crossing several staging
    chunks; the blobs are checked on the host. Intact: bit-exact; corrupted anywhere: refused."""
    monkeypatch.setattr(files, "STAGING_BYTES", 4096)
    monkeypatch.setattr(files, "STAGING_BUFFERS", 3)
    path, x, expected = _save(tmp_path, "cuda", "cuda")
    with torch.no_grad():
        assert torch.equal(torchtrt_ext.load(path)(x), expected)
    regions = _corrupt_every_region(path, tmp_path, CORRUPTIONS[corruption], torchtrt_ext.load)
    assert any(kind == "state tensor" for _, kind, _, _ in regions)


# --- The checksum itself -------------------------------------------------------------------------------


def _reference(data: bytes) -> int:
    """The checksum as engine_file's comment defines it, term by term."""
    p = file_checksum.CHECKSUM_PRIME
    signed = [b - 256 if b >= 128 else b for b in data + b"\0" * (len(data) % 2)]
    totals = []
    for g in file_checksum.CHECKSUM_GENERATORS:
        total, key = 0, 1
        for i in range(0, len(signed), 2):
            total = (total + (signed[i] + 256 * signed[i + 1]) * key) % p
            key = key * g % p
        totals.append(total)
    return totals[0] << 31 | totals[1]


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data) or bytearray(1), dtype=torch.uint8)[: len(data)]


def test_the_checksum_is_the_documented_positional_sum_and_ignores_zero_padding():
    rng = random.Random(0)
    for n in (1, 2, 3, 4096, 4097, 16 * 4096, 17 * 4096 + 5, 70001):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert file_checksum.checksum(_as_tensor(data)) == _reference(data), n
        assert file_checksum.checksum(_as_tensor(data + bytes(5000))) == file_checksum.checksum(_as_tensor(data))
    extreme = bytes([0x80, 0x7F] * 40000)  # every byte at an end of its range
    assert file_checksum.checksum(_as_tensor(extreme)) == _reference(extreme)


def test_the_generators_are_primitive_roots_so_keys_are_distinct_within_4_gib():
    p = file_checksum.CHECKSUM_PRIME
    factors = [2, 3, 7, 11, 31, 151, 331]  # p - 1 = 2 * 3**2 * 7 * 11 * 31 * 151 * 331
    n = p - 1
    for f in factors:
        while n % f == 0:
            n //= f
    assert n == 1
    for g in file_checksum.CHECKSUM_GENERATORS:
        assert all(pow(g, (p - 1) // f, p) != 1 for f in factors), g
    assert file_checksum.CHECKSUM_BITS == 62


def test_sums_in_pieces_and_by_the_float64_fallback_are_the_same_checksum(monkeypatch):
    data = torch.randint(0, 256, (300 * 4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    whole = file_checksum.checksum_value((file_checksum.region_sums(data).tolist(), data.numel(), 0))
    assert whole == file_checksum.checksum(data)
    parts = [(file_checksum.region_sums(data[s : s + 40960]).tolist(), 40960, s) for s in range(0, data.numel(), 40960)]
    assert file_checksum.checksum_value(*parts) == whole
    keys = file_checksum.keys_on(torch.device("cpu"))
    assert keys.int_mm, "this CPU's int8 GEMM is exact (checked at first use)"
    monkeypatch.setattr(keys, "int_mm", False)
    assert file_checksum.checksum_value((file_checksum.region_sums(data).tolist(), data.numel(), 0)) == whole
    monkeypatch.setattr(file_checksum, "PIECE_ROWS", 64)  # several pieces per region
    monkeypatch.setattr(keys, "row_keys", {})
    monkeypatch.setattr(keys, "int_mm", True)
    assert file_checksum.pieces(data.numel()) == 5
    assert file_checksum.checksum_value((file_checksum.region_sums(data).tolist(), data.numel(), 0)) == whole


@pytest.mark.cuda
def test_the_gpu_computes_the_same_checksum_as_the_cpu():
    gen = torch.Generator().manual_seed(2)
    for n in (1, 4095, 4096, 16 * 4096, 17 * 4096, 1000 * 4096 + 77, 70 * 2**20 + 3):
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        assert file_checksum.checksum(data.cuda()) == file_checksum.checksum(data), n
    assert file_checksum.keys_on(torch.device("cuda", torch.cuda.current_device())).int_mm


# --- The header schema ---------------------------------------------------------------------------------


def _header_json(saved, name="plain") -> dict:
    with EngineFile(str(saved[name][0])) as f:
        return f.header.to_json()


def _set(path, value):
    def change(h):
        *parents, last = path
        for key in parents:
            h = h[key]
        h[last] = value

    return change


def _delete(*path):
    def change(h):
        *parents, last = path
        for key in parents:
            h = h[key]
        del h[last]

    return change


def _shift_region(h):
    h["tensors"][1]["region"]["offset"] += file_layout.ALIGN


def _duplicate_blob_name(h):
    h["inductor_cache"]["name"] = h["programs"][0]["name"]


def _stored_region_in_a_stripped_file(h):
    h["weights_included"] = False


SCHEMA_REFUSALS = {
    "every key replaced": (lambda h: h.clear() or h.update(x=1), r"'\(the header\)' has an unknown key 'x'"),
    "a missing key": (_delete("weights_included"), r"'weights_included' is missing"),
    "a missing nested key": (_delete("tensors", 0, "region", "checksum"), r"'tensors\[0\]\.region\.checksum' is missing"),
    "an unknown key": (_set(("extra",), 1), r"'\(the header\)' has an unknown key 'extra'"),
    "an unknown nested key": (_set(("device", "evil"), 1), r"'device' has an unknown key 'evil'"),
    "a string for a size": (_set(("tensors", 0, "shape", 1), "32"), r"'tensors\[0\]\.shape\[1\]' must be an integer, got str"),
    "a bool for an integer": (_set(("data_size",), True), r"'data_size' must be an integer, got bool"),
    "null where required": (_set(("programs", 0, "name"), None), r"'programs\[0\]\.name' must be a string, got null"),
    "a list of the wrong length": (_set(("forward_parameters", 0), ["x", "POSITIONAL_OR_KEYWORD"]), r"'forward_parameters\[0\]' must be a list of 3"),
    "an unknown parameter kind": (_set(("forward_parameters", 0, 1), "EVAL"), r"'forward_parameters\[0\]\[1\]' 'EVAL' is not a parameter kind"),
    "an unknown dtype": (_set(("tensors", 0, "dtype"), "float128"), r"'tensors\[0\]\.dtype' 'float128' is not a known dtype"),
    "an unknown tensor kind": (_set(("tensors", 0, "kind"), "code"), r"'tensors\[0\]\.kind' 'code' is not one of state, constant"),
    "a size that does not fit the shape": (_set(("tensors", 0, "shape", 0), 65), r"'tensors\[0\]\.region\.nbytes' is 8192; dtype float32 and shape \[65, 32\] need 8320"),
    "a gap between regions": (_shift_region, r"'tensors\[1\]\.region\.offset' is 12288; the regions before it end at 8192"),
    "a wrong padded size": (_set(("tensors", 1, "region", "padded"), 8192), r"'tensors\[1\]\.region\.padded' is 8192 for 256 bytes"),
    "a checksum out of range": (_set(("tensors", 0, "region", "checksum"), 2**62), r"'tensors\[0\]\.region\.checksum' 4611686018427387904 is not a checksum"),
    "a wrong data size": (_set(("data_size",), 0), r"'data_size' is 0; the regions take"),
    "two blobs of one name": (_duplicate_blob_name, r"'inductor_cache\.name' 'program 0' names two blobs"),
    "artifacts that do not match the programs": (_set(("artifacts",), []), r"'artifacts' has 0 entries for 1 programs"),
    "weights in a stripped file": (_stored_region_in_a_stripped_file, r"'tensors\[0\]\.region' is present in a weight-stripped file"),
    "invalid settings": (_set(("settings", "engine"), "bogus"), r"'settings' are not valid settings \(option 'engine' must be one of"),
    "an unknown setting": (_set(("settings", "evil"), 1), r"'settings' are not valid settings"),
    "another format version": (_set(("format_version",), 1), rf"'format_version' is 1, not {file_layout.FORMAT_VERSION} \(the preamble's version\)"),
    "a negative device index": (_set(("device", "index"), -1), r"'device' .* is not a device"),
}


@pytest.mark.parametrize("case", SCHEMA_REFUSALS)
def test_the_header_schema_refuses_each_bad_field_naming_it(saved, case):
    change, message = SCHEMA_REFUSALS[case]
    header = _header_json(saved)
    Header.from_json(json.loads(json.dumps(header)))  # the intact header passes
    change(header)
    with pytest.raises(EngineFileError, match=r"header field " + message):
        Header.from_json(header)


def _rewrite_header(path, document: dict) -> None:
    """The file with its header replaced (CRC and data start made valid), its data unchanged."""
    with EngineFile(str(path)) as f:
        data = path.read_bytes()[f.data_start :]
    raw = json.dumps(document, sort_keys=True).encode()
    start = file_layout.aligned(file_layout.PREAMBLE.size + len(raw))
    preamble = file_layout.PREAMBLE.pack(file_layout.MAGIC, file_layout.FORMAT_VERSION, 0, len(raw), zlib.crc32(raw), 0)
    path.write_bytes(preamble + raw + b"\0" * (start - file_layout.PREAMBLE.size - len(raw)) + data)


def test_a_file_whose_header_breaks_the_schema_is_refused_by_load_naming_the_field(saved, tmp_path):
    bad = tmp_path / "bad.ttx"
    bad.write_bytes(saved["plain"][0].read_bytes())
    document = _header_json(saved)
    _rewrite_header(bad, document)
    torchtrt_ext.load(bad)  # rewritten intact: loads
    document["tensors"][0]["dtype"] = "complex32"
    _rewrite_header(bad, document)
    with pytest.raises(EngineFileError, match=r"bad\.ttx: header field 'tensors\[0\]\.dtype' 'complex32' is not a known dtype \(corrupt file\)"):
        torchtrt_ext.load(bad)


def test_the_header_round_trips_and_the_layout_is_documented_once(saved, monkeypatch):
    document = _header_json(saved, "compiled code")
    assert Header.from_json(document).to_json() == document
    assert sorted(document) == sorted(f.name for f in dataclasses.fields(Header))
    file_layout.check_layout()
    monkeypatch.setattr(file_layout, "__doc__", file_layout.__doc__.replace("    weights_included: bool", "    weights: bool"))
    with pytest.raises(AssertionError, match="docstring lists Header"):
        file_layout.check_layout()


def test_a_file_of_the_old_format_must_be_saved_again(saved, tmp_path):
    data = saved["plain"][0].read_bytes()
    old = tmp_path / "old.ttx"
    old.write_bytes(data[:8] + struct.pack("<I", 1) + data[12:])
    with pytest.raises(EngineFileError) as e:
        torchtrt_ext.load(old)
    assert str(e.value) == (
        f"{old}: engine file format version 1: written by an older torchtrt_ext; this one reads version "
        f"{file_layout.FORMAT_VERSION} only. The file must be saved again (compile the model and torchtrt_ext.save it "
        "with this torchtrt_ext)"
    )


# --- Signatures: nothing read is evaluated -------------------------------------------------------------


def _signature_json(shape, ranges=(("s0", 2, None),)):
    spec = torch.utils._pytree.tree_flatten(((torch.empty(0),), {}))[1]
    return {
        "in_spec": torch.utils._pytree.treespec_dumps(spec),
        "leaves": [{"dtype": "float32", "device": "cpu", "shape": shape, "layout": "contiguous"}],
        "ranges": [list(r) for r in ranges],
    }


def test_a_size_that_would_run_code_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EngineFileError, match=r"size expression \"__import__\('os'\)\.system\('touch PWNED'\)\": '__import__' is not a size symbol"):
        InputSignature.from_json(_signature_json(["s0", PWNED]))
    with pytest.raises(EngineFileError, match="is not a size symbol"):
        InputSignature.from_json(_signature_json(["s0"], ranges=(("s0", 2, None), (PWNED, 1, None))))
    for text in ("s0.__class__", "s0[0]", "lambda: 0", "s0; 1", "2**99", "1/0", "s0 ** s0", "(" * 40 + "s0" + ")" * 40, "9" * 30):
        with pytest.raises(EngineFileError, match="size expression"):
            InputSignature.from_json(_signature_json([text]))
    leaf = {"dtype": "float32", "device": "cpu", "layout": "contiguous"}
    for bad in ({**leaf, "dtype": "Tensor", "shape": [1]}, {**leaf, "shape": [True]}, {"value": [1]},
                {**leaf, "shape": [1], "extra": 0}, {**leaf, "shape": [1], "layout": "__import__('os')"}):
        data = _signature_json([1])
        data["leaves"] = [bad]
        with pytest.raises(EngineFileError):
            InputSignature.from_json(data)
    assert not os.path.exists(tmp_path / "PWNED")


def test_an_engine_file_or_cache_entry_with_such_a_size_is_refused_and_runs_nothing(saved, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    # An engine file whose compiled code's binding holds it (every checksum valid: written by the writer).
    path, x, _ = saved["compiled code"]
    bad = tmp_path / "bad.ttx"
    bad.write_bytes(path.read_bytes())
    with EngineFile(str(bad)) as f:
        header = f.header
        data = bad.read_bytes()
        blobs = [e for e in header.tensors if e.region is not None] + header.blobs()
        regions = [(e, _as_tensor(data[f.data_start + e.region.offset : f.data_start + e.region.offset + e.region.nbytes])) for e in blobs]
    header.artifacts[0].binding["signature"]["leaves"][0]["shape"][0] = PWNED
    engine_file.write(str(bad), header, regions)
    with pytest.raises(EngineFileError, match=r"the binding of graph 0 does not fit .*size expression"):
        torchtrt_ext.load(bad)
    # An engine cache entry holding it: not used, compiled again.
    cache = tmp_path / "engines"
    torch.manual_seed(0)
    model = _Small().eval()
    torchtrt_ext.compile(model, (x,), cache_dir=str(cache))
    (entry,) = cache.iterdir()
    with EngineFile(str(entry)) as f:
        header = f.header
        data = entry.read_bytes()
        blobs = [e for e in header.tensors if e.region is not None] + header.blobs()
        regions = [(e, _as_tensor(data[f.data_start + e.region.offset : f.data_start + e.region.offset + e.region.nbytes])) for e in blobs]
    header.artifacts[0].binding["signature"]["ranges"].append([PWNED, 1, None])
    engine_file.write(str(entry), header, regions)
    with caplog.at_level(logging.WARNING, logger="torchtrt_ext"):
        again = torchtrt_ext.compile(model, (x,), cache_dir=str(cache))
    assert not again.variants[0].from_cache
    assert "not used" in caplog.text and "'__import__' is not a size symbol" in caplog.text
    assert not os.path.exists(tmp_path / "PWNED")


class _Derived(torch.nn.Module):
    def forward(self, x, y):
        return x.sum() + y.sum()


class _Cat(torch.nn.Module):
    def forward(self, x, y):
        return torch.cat([x, x[1:]], 0) + y  # y has 2*s - 1 rows


class _Flat(torch.nn.Module):
    def forward(self, x, y):
        return x.reshape(-1) + y  # y has s0*s1 elements


class _Outer(torch.nn.Module):
    def forward(self, x, y):
        return (x[:, None] * x[None, :]).reshape(-1) + y  # y has s**2 elements


def _exported_signatures():
    b = Dim("b", min=2, max=100)
    auto = Dim.AUTO
    cases = [
        (_Derived(), (torch.randn(8, 3), torch.randn(14, 3)), ({0: b + 1}, {0: 2 * b})),
        (_Derived(), (torch.randn(8, 3), torch.randn(15, 3)), ({0: b}, {0: 2 * b - 1})),
        (_Cat(), (torch.randn(8, 3), torch.randn(15, 3)), ({0: auto, 1: auto}, {0: auto, 1: auto})),
        (_Flat(), (torch.randn(4, 3), torch.randn(12)), ({0: auto, 1: auto}, {0: auto})),
        (_Outer(), (torch.randn(5), torch.randn(25)), ({0: auto}, {0: auto})),
    ]
    for model, args, dynamic in cases:
        ep = torch.export.export(model, args, dynamic_shapes=dynamic)
        users = set(ep.graph_signature.user_inputs)
        vals = [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder" and n.name in users]
        yield InputSignature(ep.call_spec.in_spec, vals, ep.range_constraints), args


def test_every_size_expression_the_writer_emits_for_real_exports_round_trips():
    written = set()
    for signature, args in _exported_signatures():
        data = signature.to_json()
        back = InputSignature.from_json(json.loads(json.dumps(data)))
        assert back.to_json() == data
        assert [leaf.shape for leaf in back.leaves] == [leaf.shape for leaf in signature.leaves]  # sympy-equal
        assert back.ranges == signature.ranges
        spec = torch.utils._pytree.tree_flatten((args, {}))[1]
        for scale in (1, 2):
            call = [torch.randn(*(d * scale if i == 0 else d for i, d in enumerate(a.shape))) for a in args]
            assert back.mismatch(spec, call) == signature.mismatch(spec, call)
        written |= {d for leaf in data["leaves"] for d in leaf["shape"] if isinstance(d, str)}
        written |= {name for name, _, _ in data["ranges"]}
    forms = {
        "b + 1": r"s\d+ \+ 1", "2*b": r"2\*s\d+", "2*b - 1": r"2\*s\d+ - 1",  # derived dims
        "a product": r"s\d+\*s\d+", "a square": r"s\d+\*\*2",  # relations Dim.AUTO found
    }
    for form, pattern in forms.items():
        assert any(re.fullmatch(pattern, d) for d in written), (form, written)


def test_the_grammar_builds_what_sympy_prints():
    from torch.utils._sympy.functions import FloorDiv

    s0, s1 = (sympy.Symbol(n, integer=True, positive=True) for n in ("s0", "s1"))
    symbols = {"s0": s0, "s1": s1}
    for expr in (s0, 2 * s0, s0 + 1, 2 * s0 - 1, 4 - s0, -s0, s0 * s1, s0**2, s0**-2, 1 / s0, sympy.Rational(3, 2) * s0,
                 FloorDiv(s0 - 1, 2), 2 * s0 * s1 + s1**3 - 7):
        assert parse_size(str(expr), symbols) == expr, str(expr)
