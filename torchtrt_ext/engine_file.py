"""The engine file: one definition of its layout, its writer and its checked reader.

    offset 0   preamble, 32 bytes: magic b"TTRTEXT\\0", format version (u32), flags (u32, 0),
               header length (u64), CRC-32 of the header (u32), reserved (u32, 0)
    offset 32  header: UTF-8 JSON (versions, device, settings, the tensor index, the blobs)
    data       from the first multiple of ALIGN after the header: every tensor and blob at an ALIGN
               multiple, zero-padded to the next one; each padded region carries a checksum

Every byte is covered: the preamble by its magic, version, length and the header CRC; the header by its
CRC; each data region, padding included, by the sum of its little-endian int32 words (mod 2**64),
which any single flipped bit changes and which the device computes as fast as it copies. A file that
fails any check is refused with EngineFileError before anything is returned.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import zlib
from typing import Any, BinaryIO, Iterable

import torch

from .errors import EngineFileError

MAGIC = b"TTRTEXT\0"
FORMAT_VERSION = 1
ALIGN = 4096
PREAMBLE = struct.Struct("<8sIIQII")  # magic, version, flags, header length, header CRC-32, reserved
assert PREAMBLE.size == 32, "the preamble is 32 bytes"
MAX_HEADER = 256 * 2**20

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


def checksum(region: torch.Tensor) -> int:
    """Sum of the region's int32 words mod 2**64 (region: uint8, length a multiple of 4, any device)."""
    total = int(torch.sum(region.view(torch.int32), dtype=torch.int64).item())
    return total % 2**64


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (contiguous copy where needed), on its device."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return t.view(-1).view(torch.uint8) if t.dtype != torch.bool else t.view(-1).to(torch.uint8)


def _sum_of(data: torch.Tensor) -> int:
    """The checksum of `data` zero-padded to any multiple of 4 bytes (zero words add nothing)."""
    if data.numel() % 4:
        data = torch.cat([data, torch.zeros(4 - data.numel() % 4, dtype=torch.uint8, device=data.device)])
    return checksum(data) if data.numel() else 0


def write(path: str, header: dict, regions: Iterable[tuple[dict, torch.Tensor]]) -> int:
    """Write a file. Regions are (entry, uint8 data on any device), each entry a dict already listed in
    `header`; their offset, nbytes, padded size and sum are filled in here. One region at a time goes
    through host memory. Written under a temporary name and renamed: a failed save leaves no file."""
    regions = list(regions)
    offset = 0
    for entry, data in regions:
        entry.update(offset=offset, nbytes=data.numel(), padded=aligned(data.numel()), sum=_sum_of(data))
        offset += aligned(data.numel())
    header["data_size"] = offset
    raw = json.dumps(header, sort_keys=True).encode()
    body_start = aligned(PREAMBLE.size + len(raw))
    tmp = f"{path}.partial"
    try:
        with open(tmp, "wb") as f:
            f.write(PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(raw), zlib.crc32(raw), 0))
            f.write(raw)
            f.write(b"\0" * (body_start - PREAMBLE.size - len(raw)))
            for entry, data in regions:
                if entry["nbytes"]:
                    host = data.cpu().contiguous()
                    f.write(host_view(host))
                f.write(b"\0" * (entry["padded"] - entry["nbytes"]))
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return size


class EngineFile:
    """An opened, header-checked engine file. Data regions are checked as they are read."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise EngineFileError(f"no engine file at {path}")
        self.size = os.path.getsize(path)
        self._f: BinaryIO = open(path, "rb")
        try:
            self.header, self.data_start = self._read_header()
        except BaseException:
            self._f.close()
            raise

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "EngineFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _fail(self, what: str) -> EngineFileError:
        return EngineFileError(f"{self.path}: {what}")

    def _read_header(self) -> tuple[dict, int]:
        if self.size < PREAMBLE.size:
            raise self._fail(f"truncated: {self.size} bytes, shorter than the {PREAMBLE.size}-byte preamble")
        magic, version, flags, header_len, crc, reserved = PREAMBLE.unpack(self._f.read(PREAMBLE.size))
        if magic != MAGIC:
            raise self._fail("not a torchtrt_ext engine file (bad magic bytes)")
        if version != FORMAT_VERSION:
            raise self._fail(
                f"engine file format version {version}; this torchtrt_ext reads version {FORMAT_VERSION} "
                "(save the engine again with this version)"
            )
        if flags != 0 or reserved != 0:
            raise self._fail(f"unknown flags {flags:#x} / reserved {reserved:#x} in the preamble (corrupt file)")
        if header_len > MAX_HEADER or PREAMBLE.size + header_len > self.size:
            raise self._fail(
                f"truncated or corrupt: the header length {header_len} does not fit the file's {self.size} bytes"
            )
        raw = self._f.read(header_len)
        if zlib.crc32(raw) != crc:
            raise self._fail("the header's checksum does not match (corrupt file)")
        try:
            header = json.loads(raw)
            data_start = aligned(PREAMBLE.size + header_len)
            expected = data_start + int(header["data_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise self._fail(f"the header is not a valid engine header ({exc})") from None
        if self.size != expected:
            kind = "truncated" if self.size < expected else "has trailing bytes"
            raise self._fail(f"{kind}: the header describes {expected} bytes, the file has {self.size}")
        self._f.seek(PREAMBLE.size + header_len)
        if any(self._f.read(data_start - PREAMBLE.size - header_len)):
            raise self._fail("the padding after the header is not zero (corrupt file)")
        return header, data_start

    def read_region(self, entry: dict, into: torch.Tensor, staging: list[torch.Tensor] | None = None) -> None:
        """Read one region (padded) into the uint8 tensor `into` (at least entry['padded'] bytes, on
        any device), in chunks of the staging buffers' size (pinned host buffers for a device target,
        used in turn so a read overlaps the previous copy), then check its sum on `into`'s device."""
        padded = entry["padded"]
        if padded == 0:
            return
        self._f.seek(self.data_start + entry["offset"])
        target = into[:padded]
        if target.device.type == "cpu":
            got = self._f.readinto(host_view(target))
            if got != padded:
                raise self._fail("truncated while reading data")
        else:
            assert staging, "a device target needs staging buffers"
            events = [None] * len(staging)
            done = 0
            turn = 0
            while done < padded:
                buf = staging[turn % len(staging)]
                if events[turn % len(staging)] is not None:
                    events[turn % len(staging)].synchronize()  # its previous copy has left the buffer
                n = min(buf.numel(), padded - done)
                got = self._f.readinto(host_view(buf[:n]))
                if got != n:
                    raise self._fail("truncated while reading data")
                target[done : done + n].copy_(buf[:n], non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                events[turn % len(staging)] = event
                done += n
                turn += 1
        if checksum(target) != entry["sum"]:
            raise self._fail(f"the data of {entry.get('name', 'a blob')!r} does not match its checksum (corrupt file)")


def dtype_of(name: str, path: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise EngineFileError(f"{path}: unknown dtype {name!r} in the tensor index (corrupt file)") from None
