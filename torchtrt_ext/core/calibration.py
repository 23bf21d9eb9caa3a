"""Calibration caches: per-tensor activation ranges (amax) by stable names, device-independent, in
two text formats read and written exactly.

torchtrt_ext's format (version 1), one field per line:

    torchtrt_ext calibration cache 1
    method: max
    model: <fingerprint of the model's graph and parameter shapes, or ->
    batches: <number of calibration batches> <sha256 of the calibration set, or ->
    entries: <n>
    <amax as a hex float> <name>          (n lines; a name is the rest of the line)

Hex floats (``float.hex``) make every value round-trip exactly. TensorRT's format is a header
``TRT-<version>-<algorithm>`` and ``<name>: <hex>`` lines, the hex being the float32 bit pattern of
the scale, amax / 127; names are TensorRT's own, so reading and writing take a map between them and
ours. Both readers accept LF or CRLF line ends and trailing blank lines, and refuse anything else with
a CalibrationError giving the line number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import struct
from typing import Iterable, Mapping

from .errors import CalibrationError

SCHEMA_VERSION = 1
MAGIC = "torchtrt_ext calibration cache"
METHODS = ("max", "percentile", "entropy")
INT8_MAX = 127.0
_HEX_FLOAT = re.compile(r"[-+]?0x[0-9a-f]+(\.[0-9a-f]*)?p[-+]?[0-9]+|[-+]?(inf|nan)", re.IGNORECASE)
_TRT_HEADER = re.compile(r"TRT-([0-9]+)-([!-~]+)")
_COUNT = re.compile(r"[0-9]+")
_TRT_SCALE = re.compile(r"[0-9a-fA-F]{1,8}")


@dataclasses.dataclass(frozen=True)
class CalibrationCache:
    """Activation amax per tensor name (module FQN + role), with where they came from. Nothing in it
    is device-specific: one file serves every GPU and the CPU."""

    entries: Mapping[str, float]
    method: str = "max"
    model_fingerprint: str = "-"
    batches: int = 0
    batches_hash: str = "-"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"unknown calibration method {self.method!r}; the methods are {', '.join(METHODS)}")
        for name, amax in self.entries.items():
            _check_amax(name, amax)
            _check_name(name)
        object.__setattr__(self, "entries", dict(self.entries))

    def names(self) -> list[str]:
        return sorted(self.entries)

    def amax(self, name: str) -> float:
        try:
            return self.entries[name]
        except KeyError:
            raise CalibrationError(f"the calibration cache has no entry {name!r} ({len(self.entries)} entries)") from None

    def drop(self, name: str) -> "CalibrationCache":
        """A copy without `name` (an error where it has none)."""
        self.amax(name)
        return dataclasses.replace(self, entries={k: v for k, v in self.entries.items() if k != name})

    def diff(self, other: "CalibrationCache") -> dict[str, tuple[float | None, float | None]]:
        """Each name whose amax differs, or that only one cache has: (ours, theirs), None where absent."""
        names = set(self.entries) | set(other.entries)
        return {
            n: (self.entries.get(n), other.entries.get(n))
            for n in sorted(names)
            if self.entries.get(n) != other.entries.get(n)
        }

    def missing(self, required: Iterable[str]) -> list[str]:
        """The names in `required` this cache has no entry for, sorted."""
        return sorted(set(required) - set(self.entries))

    def require(self, required: Iterable[str]) -> None:
        """A CalibrationError naming every tensor in `required` without an entry (an engine quantizes
        each of them: a missing range is never a silent fallback)."""
        gaps = self.missing(required)
        if gaps:
            listed = ", ".join(repr(n) for n in gaps[:20]) + (f" and {len(gaps) - 20} more" if len(gaps) > 20 else "")
            raise CalibrationError(
                f"the calibration cache has no amax for {len(gaps)} tensor(s) the engine quantizes: {listed}; "
                "calibrate again with inputs that reach them, or pass calibration_coverage='warn' to leave them "
                "unquantized"
            )

    def digest(self) -> str:
        """The sha256 of the cache in torchtrt_ext's format (dumps()): its whole content (entries, method,
        model fingerprint, calibration set), as engine files and the engine cache's key name it."""
        return hashlib.sha256(self.dumps().encode()).hexdigest()

    # --- files --------------------------------------------------------------------------------------

    def dumps(self, format: str = "torchtrt_ext", names: Mapping[str, str] | None = None, version: int = 8601) -> str:
        """The cache as text. format="tensorrt": names mapped through `names` (ours -> TensorRT's; by
        default unchanged), scale = amax / 127 as float32 bits, header TRT-<version>-<algorithm>."""
        if format == "torchtrt_ext":
            lines = [
                f"{MAGIC} {SCHEMA_VERSION}",
                f"method: {self.method}",
                f"model: {self.model_fingerprint}",
                f"batches: {self.batches} {self.batches_hash}",
                f"entries: {len(self.entries)}",
            ]
            lines += [f"{float(self.entries[n]).hex()} {n}" for n in self.names()]
            return "\n".join(lines) + "\n"
        if format == "tensorrt":
            algorithm = {"max": "MaxCalibration", "percentile": "PercentileCalibration", "entropy": "EntropyCalibration2"}
            lines = [f"TRT-{version}-{algorithm[self.method]}"]
            for n in self.names():
                trt_name = (names or {}).get(n, n)
                _check_trt_name(trt_name)
                scale = struct.unpack(">f", struct.pack(">f", self.entries[n] / INT8_MAX))[0]
                if not 0 < scale < math.inf:
                    raise CalibrationError(
                        f"{n!r} has amax {self.entries[n]!r}, whose scale (amax / 127) is {scale} as a float32: "
                        "TensorRT's format cannot hold it (save it in the torchtrt_ext format)"
                    )
                bits = struct.unpack(">I", struct.pack(">f", scale))[0]
                lines.append(f"{trt_name}: {bits:08x}")
            return "\n".join(lines) + "\n"
        raise CalibrationError(f"unknown calibration cache format {format!r}; the formats are torchtrt_ext and tensorrt")

    def save(self, path: str | os.PathLike, format: str = "torchtrt_ext", names: Mapping[str, str] | None = None) -> None:
        """Writes the file whole or not at all (a temporary file renamed into place)."""
        path = os.path.expanduser(os.fspath(path))
        text = self.dumps(format, names)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)

    @classmethod
    def loads(cls, text: str, source: str = "<text>", names: Mapping[str, str] | None = None) -> "CalibrationCache":
        """Either format, told apart by its first line. names (TensorRT's format): TensorRT's names ->
        ours; by default unchanged."""
        lines = _lines(text, source)
        if not lines:
            raise CalibrationError(f"{source}: empty; a calibration cache starts with '{MAGIC} {SCHEMA_VERSION}' or TRT-<version>-<algorithm>")
        if lines[0].startswith("TRT-"):
            return _read_tensorrt(lines, source, names or {})
        return _read_ours(lines, source)

    @classmethod
    def load(cls, path: str | os.PathLike, names: Mapping[str, str] | None = None) -> "CalibrationCache":
        path = os.path.expanduser(os.fspath(path))
        try:
            with open(path, encoding="utf-8", newline="") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None
        return cls.loads(text, path, names)


def _lines(text: str, source: str) -> list[str]:
    """The text's lines without their LF or CRLF ends; trailing blank lines dropped. A lone CR or a
    blank line before the end is an error (a name would silently change)."""
    lines = text.split("\n")
    while lines and lines[-1] in ("", "\r"):
        lines.pop()
    out = []
    for number, line in enumerate(lines, 1):
        if line.endswith("\r"):
            line = line[:-1]
        if "\r" in line:
            raise CalibrationError(f"{source}: line {number}: a carriage return inside the line")
        if not line.strip():
            raise CalibrationError(f"{source}: line {number}: a blank line before the end of the file")
        out.append(line)
    return out


def _field(lines: list[str], number: int, key: str, source: str) -> str:
    if number > len(lines):
        raise CalibrationError(f"{source}: line {number}: missing; expected '{key}: ...'")
    line = lines[number - 1]
    if not line.startswith(f"{key}: "):
        raise CalibrationError(f"{source}: line {number}: expected '{key}: ...', found {line[:80]!r}")
    return line[len(key) + 2 :]


def _read_ours(lines: list[str], source: str) -> CalibrationCache:
    first = lines[0].split(" ")
    if " ".join(first[:-1]) != MAGIC or not _COUNT.fullmatch(first[-1]):
        raise CalibrationError(f"{source}: line 1: not a calibration cache (expected '{MAGIC} {SCHEMA_VERSION}', found {lines[0][:80]!r})")
    if int(first[-1]) != SCHEMA_VERSION:
        raise CalibrationError(
            f"{source}: line 1: schema version {first[-1]}, but this torchtrt_ext reads version {SCHEMA_VERSION}; "
            "calibrate again or convert it with the torchtrt_ext that wrote it"
        )
    method = _field(lines, 2, "method", source)
    if method not in METHODS:
        raise CalibrationError(f"{source}: line 2: unknown method {method!r}; the methods are {', '.join(METHODS)}")
    fingerprint = _field(lines, 3, "model", source)
    batches = _field(lines, 4, "batches", source).split(" ")
    if len(batches) != 2 or not _COUNT.fullmatch(batches[0]):
        raise CalibrationError(f"{source}: line 4: expected 'batches: <count> <hash>', found {lines[3][:80]!r}")
    count = _field(lines, 5, "entries", source)
    if not _COUNT.fullmatch(count):
        raise CalibrationError(f"{source}: line 5: the entry count {count!r} is not a number")
    if len(lines) - 5 != int(count):
        raise CalibrationError(f"{source}: the header says {count} entries, the file has {len(lines) - 5} (truncated or appended to?)")
    entries: dict[str, float] = {}
    for number, line in enumerate(lines[5:], 6):
        value, _, name = line.partition(" ")
        if not _HEX_FLOAT.fullmatch(value) or not name:
            raise CalibrationError(f"{source}: line {number}: expected '<amax as a hex float> <name>', found {line[:80]!r}")
        if name in entries:
            raise CalibrationError(f"{source}: line {number}: {name!r} appears twice")
        try:
            _check_name(name)
            amax = float.fromhex(value)
        except (CalibrationError, OverflowError, ValueError) as exc:
            raise CalibrationError(f"{source}: line {number}: {exc}") from None
        entries[name] = _amax_at(amax, name, source, number)
    return CalibrationCache(entries, method, fingerprint, int(batches[0]), batches[1])


def _read_tensorrt(lines: list[str], source: str, names: Mapping[str, str]) -> CalibrationCache:
    header = _TRT_HEADER.fullmatch(lines[0])
    if header is None:
        raise CalibrationError(f"{source}: line 1: expected 'TRT-<version>-<algorithm>', found {lines[0][:80]!r}")
    algorithm = header.group(2).lower()
    method = "entropy" if "entropy" in algorithm else "percentile" if "percentile" in algorithm else "max"
    entries: dict[str, float] = {}
    for number, line in enumerate(lines[1:], 2):
        trt_name, sep, scale = line.rpartition(": ")  # TensorRT's names may hold ': ' themselves
        if not sep or not trt_name or not _TRT_SCALE.fullmatch(scale):
            raise CalibrationError(f"{source}: line {number}: expected '<tensor name>: <8 hex digits>', found {line[:80]!r}")
        name = names.get(trt_name, trt_name)
        if name in entries:
            raise CalibrationError(f"{source}: line {number}: {name!r} appears twice")
        value = struct.unpack(">f", struct.pack(">I", int(scale, 16)))[0]
        entries[name] = _amax_at(value * INT8_MAX, name, source, number)
    return CalibrationCache(entries, method)


def _amax_at(amax: float, name: str, source: str, number: int) -> float:
    try:
        _check_amax(name, amax)
    except CalibrationError as exc:
        raise CalibrationError(f"{source}: line {number}: {exc}") from None
    return amax


def _check_amax(name: str, amax: float) -> None:
    if not isinstance(amax, float) or not math.isfinite(amax) or amax <= 0:
        raise CalibrationError(f"{name!r} has amax {amax!r}; an amax must be a finite float above 0 (calibrate on inputs that reach it)")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name != name.strip() or len(f"x{name}x".splitlines()) != 1:
        raise CalibrationError(
            f"the name {name!r} cannot be written: names are non-empty, without outer spaces or any character "
            "that ends a line (\\n, \\r, \\x0b, \\x0c, \\x1c-\\x1e, \\x85, \\u2028, \\u2029)"
        )


def _check_trt_name(name: str) -> None:
    _check_name(name)
    if name.endswith(":"):
        raise CalibrationError(f"the TensorRT name {name!r} cannot be written: it would end in ':' before ': '")
