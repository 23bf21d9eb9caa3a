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
    return int(_device_sum(region).item()) % 2**64


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

    def read_regions(self, jobs: Iterable[tuple[dict, torch.Tensor]], staging: list[torch.Tensor] | None = None) -> None:
        """Read regions (entry, into): each padded region into the uint8 tensor `into` (at least
        entry['padded'] bytes, on any device), then check every region's sum on its device.

        Device targets go through the pinned `staging` buffers: one reader thread per buffer (pread
        releases the GIL, so reads from the page cache run in parallel), each chunk's host-to-device
        copy enqueued on the current stream in file order, and a buffer read again only once its
        copy has left it. The sums are compared at the end, with one synchronisation."""
        jobs = [(entry, into[: entry["padded"]]) for entry, into in jobs if entry["padded"]]
        sums: list[tuple[dict, torch.Tensor]] = []
        chunks: list[tuple[int, torch.Tensor, tuple | None]] = []  # file offset, destination, (entry, region) it completes
        for entry, target in jobs:
            offset = self.data_start + entry["offset"]
            if target.device.type == "cpu":
                self._pread(host_view(target), offset)
                sums.append((entry, _device_sum(target)))
                continue
            assert staging, "a device target needs staging buffers"
            size = staging[0].numel()
            for start in range(0, entry["padded"], size):
                end = min(start + size, entry["padded"])
                chunks.append((offset + start, target[start:end], (entry, target) if end == entry["padded"] else None))
        if chunks:
            self._stage(chunks, staging, sums)
        by_device: dict[torch.device, list[tuple[dict, torch.Tensor]]] = {}
        for entry, value in sums:
            by_device.setdefault(value.device, []).append((entry, value))
        for group in by_device.values():
            values = torch.cat([v for _, v in group]).tolist()  # one synchronisation per device
            for (entry, _), value in zip(group, values):
                if value % 2**64 != entry["sum"]:
                    raise self._fail(f"the data of {entry.get('name', 'a blob')!r} does not match its checksum (corrupt file)")

    def _stage(self, chunks: list, staging: list[torch.Tensor], sums: list) -> None:
        from concurrent.futures import ThreadPoolExecutor

        n = len(staging)

        def read(i: int, copied: torch.cuda.Event | None) -> None:
            if copied is not None:
                copied.synchronize()  # the buffer's previous copy has left it (releases the GIL)
            offset, dst, _ = chunks[i]
            self._pread(host_view(staging[i % n][: dst.numel()]), offset)

        pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="torchtrt_ext-read")
        try:
            with torch.cuda.device(chunks[0][1].device):  # copies and events on the target's current stream
                pending = {i: pool.submit(read, i, None) for i in range(min(n, len(chunks)))}
                for i, (_, dst, completes) in enumerate(chunks):
                    pending.pop(i).result()  # a failed read raises here
                    dst.copy_(staging[i % n][: dst.numel()], non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record()
                    if i + n < len(chunks):
                        pending[i + n] = pool.submit(read, i + n, copied)
                    if completes is not None:
                        entry, region = completes
                        sums.append((entry, _device_sum(region)))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _pread(self, view: memoryview, offset: int) -> None:
        fd = self._f.fileno()
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise self._fail("truncated while reading data")
            done += got


def _device_sum(region: torch.Tensor) -> torch.Tensor:
    """The region's checksum, not yet read back: an int64 tensor on the region's device."""
    return torch.sum(region.view(torch.int32), dtype=torch.int64).view(1)


def dtype_of(name: str, path: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise EngineFileError(f"{path}: unknown dtype {name!r} in the tensor index (corrupt file)") from None
