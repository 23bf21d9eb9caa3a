"""The engine file's writer and its checked reader. The layout (preamble, header schema, regions)
is defined once, in file_layout.py; the region checksum in file_checksum.py."""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, BinaryIO, Iterable

import torch

from . import file_checksum
from .errors import EngineFileError
from .file_checksum import checksum, checksum_value, pieces, region_sums
from .file_layout import (  # noqa: F401  (the layout's names, for the writer and reader and their callers)
    ALIGN,
    DTYPES,
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER,
    PREAMBLE,
    Artifact,
    Blob,
    Device,
    Header,
    Quantization,
    Region,
    TensorEntry,
    aligned,
    host_view,
    tensor_bytes,
)

# --- Writing and reading ------------------------------------------------------------------------------


def write(path: str, header: Header, regions: Iterable[tuple[Any, torch.Tensor]]) -> int:
    """Write a file. Regions are (entry, uint8 data on any device), each entry a TensorEntry, Blob or
    Artifact of `header`, in file order; their Region (offset, sizes, checksum) and the header's
    data_size are filled in here, and the header is checked as a reader will check it. One region at a
    time goes through host memory. Written under a temporary name and renamed: a failed save leaves no
    file."""
    regions = list(regions)
    offset = 0
    for entry, data in regions:
        n = data.numel()
        entry.region = Region(offset=offset, nbytes=n, padded=aligned(n), checksum=checksum(data) if n else 0)
        offset += aligned(n)
    header.data_size = offset
    header.format_version = FORMAT_VERSION
    document = header.to_json()
    Header.from_json(document)  # what this writes, a reader accepts
    raw = json.dumps(document, sort_keys=True).encode()
    body_start = aligned(PREAMBLE.size + len(raw))
    tmp = f"{path}.partial"
    try:
        with open(tmp, "wb") as f:
            f.write(PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(raw), zlib.crc32(raw), 0))
            f.write(raw)
            f.write(b"\0" * (body_start - PREAMBLE.size - len(raw)))
            for entry, data in regions:
                if entry.region.nbytes:
                    host = data.cpu().contiguous()
                    f.write(host_view(host))
                f.write(b"\0" * (entry.region.padded - entry.region.nbytes))
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

    def _read_header(self) -> tuple[Header, int]:
        if self.size < PREAMBLE.size:
            raise self._fail(f"truncated: {self.size} bytes, shorter than the {PREAMBLE.size}-byte preamble")
        magic, version, flags, header_len, crc, reserved = PREAMBLE.unpack(self._f.read(PREAMBLE.size))
        if magic != MAGIC:
            raise self._fail("not a torchtrt_ext engine file (bad magic bytes)")
        if version < FORMAT_VERSION:
            raise self._fail(
                f"engine file format version {version}: written by an older torchtrt_ext; this one reads version "
                f"{FORMAT_VERSION} only. The file must be saved again (compile the model and torchtrt_ext.save it "
                "with this torchtrt_ext)"
            )
        if version > FORMAT_VERSION:
            raise self._fail(
                f"engine file format version {version}: written by a newer torchtrt_ext; this one reads version "
                f"{FORMAT_VERSION} (upgrade torchtrt_ext to load it)"
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
            document = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
            raise self._fail(f"the header is not JSON ({exc}) (corrupt file)") from None
        try:
            header = Header.from_json(document)
        except EngineFileError as exc:
            raise self._fail(f"{exc} (corrupt file)") from None
        data_start = aligned(PREAMBLE.size + header_len)
        expected = data_start + header.data_size
        if self.size != expected:
            kind = "truncated" if self.size < expected else "has trailing bytes"
            raise self._fail(f"{kind}: the header describes {expected} bytes, the file has {self.size}")
        self._f.seek(PREAMBLE.size + header_len)
        if any(self._f.read(data_start - PREAMBLE.size - header_len)):
            raise self._fail("the padding after the header is not zero (corrupt file)")
        return header, data_start

    def read_regions(self, jobs: Iterable[tuple[Any, torch.Tensor]], staging: list[torch.Tensor] | None = None) -> None:
        """Read regions (entry, into): each entry's padded region (entry.region) into the uint8 tensor
        `into` (at least region.padded bytes, on any device), then check every region's checksum, each
        computed on the device it was read to.

        Device targets go through the pinned `staging` buffers: one reader thread per buffer (pread
        releases the GIL, so reads from the page cache run in parallel), each chunk's host-to-device
        copy enqueued on the current stream in file order, and a buffer read again only once its copy
        has left it. A region's sums are enqueued on that stream once its last chunk is copied, into
        one buffer per device; they are read back and compared at the end, with one synchronisation
        per device."""
        jobs = [(entry, into[: entry.region.padded]) for entry, into in jobs if entry.region.padded]
        counts: dict[torch.device, int] = {}
        slots = []
        for entry, target in jobs:
            first = counts.get(target.device, 0)
            counts[target.device] = first + pieces(entry.region.padded)
            slots.append((target.device, first, counts[target.device]))
        sums = {device: torch.empty(n, 2, 8, 2, dtype=torch.int64, device=device) for device, n in counts.items()}
        chunks: list[tuple[int, torch.Tensor, tuple | None]] = []  # file offset, destination, (region, its sums) it completes
        for (entry, target), (device, first, end) in zip(jobs, slots):
            offset = self.data_start + entry.region.offset
            if target.device.type == "cpu":
                self._pread(host_view(target), offset)
                region_sums(target, out=sums[device][first:end])
                continue
            assert staging, "a device target needs staging buffers"
            size = staging[0].numel()
            for start in range(0, entry.region.padded, size):
                stop = min(start + size, entry.region.padded)
                done = (target, sums[device][first:end]) if stop == entry.region.padded else None
                chunks.append((offset + start, target[start:stop], done))
        if chunks:
            self._stage(chunks, staging)
        values = {device: found.tolist() for device, found in sums.items()}  # one synchronisation per device
        for (entry, _), (device, first, end) in zip(jobs, slots):
            if checksum_value((values[device][first:end], entry.region.padded, 0)) != entry.region.checksum:
                raise self._fail(f"the data of {entry.name!r} does not match its checksum (corrupt file)")

    def _stage(self, chunks: list, staging: list[torch.Tensor]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        n = len(staging)

        def read(i: int, copied: torch.cuda.Event | None) -> None:
            if copied is not None:
                copied.synchronize()  # the buffer's previous copy has left it (releases the GIL)
            offset, dst, _ = chunks[i]
            self._pread(host_view(staging[i % n][: dst.numel()]), offset)

        pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="torchtrt_ext-read")
        try:
            with torch.cuda.device(chunks[0][1].device):  # copies, events and sums on the target's current stream
                pending = {i: pool.submit(read, i, None) for i in range(min(n, len(chunks)))}
                file_checksum.keys_on(chunks[0][1].device)  # built (its GEMM checked) while the first chunks are read
                for i, (_, dst, completes) in enumerate(chunks):
                    pending.pop(i).result()  # a failed read raises here
                    dst.copy_(staging[i % n][: dst.numel()], non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record()
                    if i + n < len(chunks):
                        pending[i + n] = pool.submit(read, i + n, copied)
                    if completes is not None:
                        region, out = completes
                        region_sums(region, out=out)
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
