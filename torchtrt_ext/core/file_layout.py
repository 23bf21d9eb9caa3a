"""The engine file's layout, defined once (here) and checked against the code at import: the
preamble, the header schema (dataclasses, each field checked by Header.from_json) and the regions.
The writer and the checked reader: engine_file.py; the region checksum: file_checksum.py.

File (format version 3; little-endian)

    offset 0    preamble, 32 bytes: PREAMBLE_FIELDS (magic b"TTRTEXT\\0", format version, flags 0,
                header length, CRC-32 of the header, reserved 0)
    offset 32   header: UTF-8 JSON of a Header (below), keys sorted
    data        from the first multiple of ALIGN after the header: the regions (each tensor's and each
                blob's bytes), each at a multiple of ALIGN from the data start, zero-padded to the next
                one; in order, they tile the data section exactly (no gap, no overlap, data_size bytes)

Every byte is under a check: the preamble by its magic, version and lengths; the header by its CRC-32
and by Header.from_json, which checks every field; the padding after the header must be zero; each
region, padding included, by its checksum (checksum(): a keyed positional hash, 62 bits), computed
on the device the region is read to.
A file that fails any check is refused with EngineFileError before anything is returned.

Header schema (one JSON object per dataclass; every key required, no other key allowed; the field
lists below are compared with the dataclasses at import)

Header
    torch: str                                  torch.__version__ of the writer
    tensorrt: str | None                        TensorRT's version, null where it did not import
    engine: str                                 the engine kind ("builtin", "tensorrt")
    device: Device                              the device the engines ran on
    settings: dict[str, Any]                    Settings.as_dict(); must build a Settings
    model: str                                  the model's class name
    forward_parameters: list[tuple[str, str, bool]]  forward's parameters: name, inspect kind, has default
    weights_included: bool                      false: a weight-stripped file (constants are kept)
    tensors: list[TensorEntry]                  the weights and constants, each stored once
    programs: list[Blob]                        each graph (torch.export.save, weights left out)
    artifacts: list[Artifact | None]            per program, its compiled code saved whole, or null
    inductor_cache: Blob | None                 torch.compiler.save_cache_artifacts(), or null
    quantization: list[Quantization | None]     per program, its quantization plan (precision int8 or fp8), or
                                                null (precision 'model')
    data_size: int                              bytes in the data section
    format_version: int                         FORMAT_VERSION, as in the preamble
Device
    type: str                                   "cpu", "cuda"
    index: int | None
    name: str | None                            the CUDA device's name, else null
    capability: str | None                      its compute capability ("9.0"), else null
TensorEntry
    name: str                                   names[0]: the name messages use
    names: list[str]                            every name of the tensor (tied weights share one)
    kind: str                                   "state" (state_dict), "constant", or "quantized" (an engine's
                                                quantized weight or its scales, named by a Quantization)
    parameter: bool                             an nn.Parameter
    dtype: str                                  a key of DTYPES
    shape: list[int]
    region: Region | None                       null only for a state or quantized tensor of a weight-stripped
                                                file (a refit re-quantizes the weights it gives)
Blob
    name: str                                   unique among the blobs
    region: Region | None                       never null in a file
Artifact
    name: str
    binding: dict[str, Any]                     what binds the code to a model (wrapper._Variant.binding),
                                                checked where it is used (wrapper._variant_from_file)
    region: Region | None                       never null in a file
Quantization
    format: str                                 "int8" or "fp8": the settings' precision
    calibration: str                            CalibrationCache.digest() of the settings' calibration: the
                                                cache the plan was made with (its text is in the settings)
    sources: list[int]                          the float weights quantized, by index among the graph's
                                                weights, in the order of their quantized slots
    num_weights: int                            the graph's weights before quantization
    num_placeholders: int                       its placeholders before quantization
    layers: list[str]                           the layers quantized, by calibration name
    uncovered: list[str]                        the layers left at the model's dtype (calibration_coverage='warn')
    transposed: list[bool]                      per source, whether its quantized slot holds it transposed
                                                (a Conv1D's (in, out) weight), or empty: none is
    tensors: list[str]                          per source, the names of its quantized weight and of its
                                                float32 scales (tensors of kind "quantized")
Region
    offset: int                                 from the data start; a multiple of ALIGN
    nbytes: int                                 the data's length
    padded: int                                 aligned(nbytes): the bytes the region occupies
    checksum: int                               checksum() of the padded region: 62 bits
"""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import math
import re
import struct
from typing import Any

import torch

from . import json_schema, quantize
from .json_schema import field_error as _field, hints as _hints
from .settings import Settings
from .file_checksum import BLOCK, CHECKSUM_BITS

MAGIC = b"TTRTEXT\0"
# 2: per-region positional checksums (62 bits) in place of word sums; the header schema (Header).
# 3: quantized engines (Header.quantization, tensors of kind 'quantized').
FORMAT_VERSION = 3
ALIGN = 4096
PREAMBLE_FIELDS = (
    ("magic", "8s"),
    ("version", "I"),
    ("flags", "I"),
    ("header_length", "Q"),
    ("header_crc32", "I"),
    ("reserved", "I"),
)
PREAMBLE = struct.Struct("<" + "".join(code for _, code in PREAMBLE_FIELDS))
MAX_HEADER = 256 * 2**20
assert ALIGN % BLOCK == 0, "a padded region is whole checksum rows"

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
    )
}


def host_view(t: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (without numpy, which torch does not need)."""
    assert t.device.type == "cpu" and t.is_contiguous()
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (contiguous copy where needed), on its device."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return t.view(-1).view(torch.uint8) if t.dtype != torch.bool else t.view(-1).to(torch.uint8)


# --- The header schema --------------------------------------------------------------------------------


# The dataclasses below are the schema; the module docstring documents each field (_check_layout
# compares the two at import). Header.from_json is the one place a header is checked.


@dataclasses.dataclass
class Region:
    offset: int
    nbytes: int
    padded: int
    checksum: int


@dataclasses.dataclass
class Device:
    type: str
    index: int | None
    name: str | None = None
    capability: str | None = None


@dataclasses.dataclass
class TensorEntry:
    name: str
    names: list[str]
    kind: str
    parameter: bool
    dtype: str
    shape: list[int]
    region: Region | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def data_nbytes(self) -> int:
        """The bytes its dtype and shape need."""
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclasses.dataclass
class Blob:
    name: str
    region: Region | None = None


@dataclasses.dataclass
class Artifact:
    name: str
    binding: dict[str, Any]
    region: Region | None = None


@dataclasses.dataclass
class Quantization:
    format: str
    calibration: str
    sources: list[int]
    num_weights: int
    num_placeholders: int
    layers: list[str]
    uncovered: list[str]
    transposed: list[bool]
    tensors: list[str]


TENSOR_KINDS = ("state", "constant", "quantized")
PARAMETER_KINDS = ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD", "VAR_POSITIONAL", "KEYWORD_ONLY", "VAR_KEYWORD")
assert all(getattr(inspect.Parameter, k).name == k for k in PARAMETER_KINDS)


@dataclasses.dataclass
class Header:
    """An engine file's header: what files.py writes and reads, checked by from_json."""

    torch: str
    tensorrt: str | None
    engine: str
    device: Device
    settings: dict[str, Any]
    model: str
    forward_parameters: list[tuple[str, str, bool]]
    weights_included: bool
    tensors: list[TensorEntry]
    programs: list[Blob]
    artifacts: list[Artifact | None]
    inductor_cache: Blob | None
    quantization: list[Quantization | None]
    data_size: int = 0
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return json_schema.to_json(self)

    @classmethod
    def from_json(cls, data: Any) -> "Header":
        """The header of JSON data, every field checked: types, required and unknown keys (each
        dataclass's fields, all required), then what the fields must agree on (below). Raises
        EngineFileError naming the field."""
        header = json_schema.from_json(cls, data, "")
        header._check()
        return header

    def regions(self) -> list[tuple[str, Region]]:
        """Every region, with the field that holds it, in file order."""
        entries: list[tuple[str, Any]] = [(f"tensors[{i}]", t) for i, t in enumerate(self.tensors)]
        entries += [(f"programs[{i}]", b) for i, b in enumerate(self.programs)]
        entries += [(f"artifacts[{i}]", a) for i, a in enumerate(self.artifacts) if a is not None]
        entries += [("inductor_cache", self.inductor_cache)] if self.inductor_cache is not None else []
        found = [(f"{where}.region", e.region) for where, e in entries if e.region is not None]
        return sorted(found, key=lambda item: (item[1].offset, item[1].padded))

    def blobs(self) -> list[Blob | Artifact]:
        """The programs, the artifacts present and the Inductor cache: the regions read into host memory."""
        return [*self.programs, *(a for a in self.artifacts if a is not None), *([self.inductor_cache] if self.inductor_cache else [])]

    def _check(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise _field("format_version", f"is {self.format_version}, not {FORMAT_VERSION} (the preamble's version)")
        if not self.device.type or (self.device.index is not None and self.device.index < 0):
            raise _field("device", f"{self.device} is not a device")
        try:
            settings = Settings(**self.settings)
        except (TypeError, ValueError) as exc:  # OptionError and CalibrationError are ValueErrors
            raise _field("settings", f"are not valid settings ({exc})") from None
        for i, (name, kind, _) in enumerate(self.forward_parameters):
            if kind not in PARAMETER_KINDS:
                raise _field(f"forward_parameters[{i}][1]", f"{kind!r} is not a parameter kind ({', '.join(PARAMETER_KINDS)})")
        names: set[str] = set()
        for i, t in enumerate(self.tensors):
            where = f"tensors[{i}]"
            if not t.names or t.names[0] != t.name:
                raise _field(f"{where}.names", f"{t.names!r} does not start with the tensor's name {t.name!r}")
            for name in t.names:
                if name in names:
                    raise _field(f"{where}.names", f"{name!r} names two tensors")
                names.add(name)
            if t.kind not in TENSOR_KINDS:
                raise _field(f"{where}.kind", f"{t.kind!r} is not one of {', '.join(TENSOR_KINDS)}")
            if t.dtype not in DTYPES:
                raise _field(f"{where}.dtype", f"{t.dtype!r} is not a known dtype")
            if any(d < 0 for d in t.shape):
                raise _field(f"{where}.shape", f"{t.shape} has a negative size")
            stored = self.weights_included or t.kind == "constant"  # state and quantized tensors: with the weights
            if (t.region is not None) != stored:
                raise _field(f"{where}.region", "is missing" if stored else "is present in a weight-stripped file")
            if t.region is not None and t.region.nbytes != t.data_nbytes:
                raise _field(f"{where}.region.nbytes", f"is {t.region.nbytes}; dtype {t.dtype} and shape {t.shape} need {t.data_nbytes}")
        if not self.programs:
            raise _field("programs", "is empty")
        self._check_quantization(settings)
        if len(self.artifacts) != len(self.programs):
            raise _field("artifacts", f"has {len(self.artifacts)} entries for {len(self.programs)} programs")
        blobs: set[str] = set()
        for where, blob in [(f"programs[{i}]", b) for i, b in enumerate(self.programs)] + [
            (f"artifacts[{i}]", a) for i, a in enumerate(self.artifacts) if a is not None
        ] + ([("inductor_cache", self.inductor_cache)] if self.inductor_cache is not None else []):
            if blob.name in blobs:
                raise _field(f"{where}.name", f"{blob.name!r} names two blobs")
            blobs.add(blob.name)
            if blob.region is None:
                raise _field(f"{where}.region", "is missing")
        end = 0
        for where, r in self.regions():
            if r.offset != end:
                raise _field(f"{where}.offset", f"is {r.offset}; the regions before it end at {end} (a gap or an overlap)")
            if r.nbytes < 0 or r.padded != aligned(r.nbytes):
                raise _field(f"{where}.padded", f"is {r.padded} for {r.nbytes} bytes; it must be {aligned(max(r.nbytes, 0))}")
            if not 0 <= r.checksum < 2**CHECKSUM_BITS or (r.nbytes == 0 and r.checksum != 0):
                raise _field(f"{where}.checksum", f"{r.checksum} is not a checksum of {r.nbytes} bytes")
            end += r.padded
        if self.data_size != end:
            raise _field("data_size", f"is {self.data_size}; the regions take {end} bytes")

    def _check_quantization(self, settings: Settings) -> None:
        """One plan per program where the settings quantize (none elsewhere), made with the settings'
        calibration cache, its tensors present with the format's dtypes and matching shapes."""
        if len(self.quantization) != len(self.programs):
            raise _field("quantization", f"has {len(self.quantization)} entries for {len(self.programs)} programs")
        quantized = {t.name: t for t in self.tensors if t.kind == "quantized"}
        named: set[str] = set()
        for i, q in enumerate(self.quantization):
            where = f"quantization[{i}]"
            if (q is None) == settings.quantized:
                raise _field(where, f"is {'missing' if q is None else 'present'}, but the settings' precision is {settings.precision!r}")
            if q is None:
                continue
            if q.format != settings.precision:
                raise _field(f"{where}.format", f"{q.format!r} is not the settings' precision {settings.precision!r}")
            if q.calibration != settings.calibration.digest():
                raise _field(f"{where}.calibration", "is not the digest of the settings' calibration cache (a plan made with another cache)")
            if len(set(q.sources)) != len(q.sources) or not all(0 <= s < q.num_weights <= q.num_placeholders for s in q.sources):
                raise _field(f"{where}.sources", f"{q.sources} are not distinct weights of {q.num_weights} (of {q.num_placeholders} placeholders)")
            if len(q.tensors) != 2 * len(q.sources):
                raise _field(f"{where}.tensors", f"has {len(q.tensors)} names for {len(q.sources)} sources (a weight and its scales each)")
            dtype = str(quantize.quant_format(q.format).dtype).removeprefix("torch.")
            for k in range(0, len(q.tensors), 2):
                weight, scales = (quantized.get(n) for n in q.tensors[k : k + 2])
                if weight is None or scales is None:
                    missing = q.tensors[k] if weight is None else q.tensors[k + 1]
                    raise _field(f"{where}.tensors", f"names {missing!r}, which is no tensor of kind 'quantized'")
                if weight.dtype != dtype or not 2 <= len(weight.shape) <= 5:  # linear (out, in); conv (out, in / groups, *kernel)
                    raise _field(f"{where}.tensors", f"names {weight.name!r} of {weight.dtype} {weight.shape}; an {q.format} weight is {dtype}, "
                                 "2-D (linear) to 5-D (3-D convolution)")
                if scales.dtype != "float32" or scales.shape != weight.shape[:1]:
                    raise _field(f"{where}.tensors", f"names {scales.name!r} of {scales.dtype} {scales.shape} as the scales of a {weight.shape} weight: they are float32 {weight.shape[:1]}")
            named.update(q.tensors)
        unnamed = sorted(quantized.keys() - named)
        if unnamed:
            raise _field("tensors", f"hold quantized tensors that no quantization plan names: {', '.join(map(repr, unnamed))}")


_SCHEMA = (Header, Device, TensorEntry, Blob, Artifact, Quantization, Region)


def check_layout() -> None:
    """The module docstring's schema lists exactly each dataclass's fields, in order, with their types;
    the preamble is 32 bytes. Run at import: the layout is documented once and cannot drift."""
    assert PREAMBLE.size == 32, "the preamble is 32 bytes"
    for cls in _SCHEMA:
        _hints(cls)  # every annotation resolves
    if __doc__ is None:  # python -OO strips docstrings: nothing to compare
        return
    doc = __doc__.split("Header schema", 1)[1]
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in doc.splitlines():
        if re.fullmatch(r"[A-Z][A-Za-z]*", line.strip()) and not line.startswith(" "):
            current = sections.setdefault(line.strip(), [])
        elif current is not None and (m := re.match(r"    (\w+): (.+?)(?:\s{2,}|$)", line)):
            current.append((m.group(1), m.group(2).strip()))
    for cls in _SCHEMA:
        fields = [(f.name, str(f.type)) for f in dataclasses.fields(cls)]
        documented = sections.get(cls.__name__)
        if documented != fields:
            raise AssertionError(f"engine_file's docstring lists {cls.__name__} as {documented}, the dataclass has {fields}")
    if set(sections) != {cls.__name__ for cls in _SCHEMA}:
        raise AssertionError(f"engine_file's docstring documents {sorted(sections)}")


check_layout()


