"""Where new weights come from: a state_dict, an ``nn.Module``, a ``.safetensors`` file or a torch
checkpoint, all seen through one small interface (names, each tensor's shape and dtype without reading
its data, then the tensor itself).

A ``.safetensors`` file is memory-mapped: its header is checked in full before anything is read (every
tensor inside the file, sizes that match dtype and shape, no overlaps), and each tensor is a view of
the mapping, so the file is never read into memory as a whole.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from typing import Any, Iterable, Mapping, NamedTuple

import torch

from .errors import WeightFileError

# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


class Spec(NamedTuple):
    shape: torch.Size
    dtype: torch.dtype


class WeightSource:
    """Named tensors, with shape and dtype known before a tensor's data is read."""

    description = "weights"

    def names(self) -> list[str]:
        raise NotImplementedError

    def spec(self, name: str) -> Any:
        """Something with the .shape and .dtype of `name` (the tensor itself where it is in memory
        already, else a Spec, without reading its data), or a string saying why it is no tensor."""
        raise NotImplementedError

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def specs(self, names: Iterable[str]) -> dict[str, Any]:
        """spec() of each name, in one call."""
        return {name: self.spec(name) for name in names}

    def close(self) -> None:
        pass

    def __enter__(self) -> "WeightSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class MappingSource(WeightSource):
    def __init__(self, weights: Mapping[str, Any], description: str = "the state_dict"):
        self._weights = weights
        self.description = description

    def names(self) -> list[str]:
        return list(self._weights)

    def spec(self, name: str) -> Any:
        value = self._weights[name]
        if not isinstance(value, torch.Tensor):
            return f"is not a tensor (got {type(value).__name__})"
        return value

    def tensor(self, name: str) -> torch.Tensor:
        return self._weights[name]  # only ever read under no_grad


class SafetensorsSource(WeightSource):
    """A memory-mapped .safetensors file, its header validated in full on open."""

    def __init__(self, path: str):
        self.description = f"safetensors file {path}"
        self._file = open(path, "rb")
        try:
            size = os.fstat(self._file.fileno()).st_size
            self._entries, self._data_start = _read_safetensors_header(self._file, size, path)
            # ACCESS_COPY: writable views for torch.frombuffer, never written back to the file.
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        except BaseException:
            self._file.close()
            raise

    def names(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> "Spec":
        dtype, shape, _, _ = self._entries[name]
        return Spec(torch.Size(shape), dtype)

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        offset = self._data_start + begin
        itemsize = dtype.itemsize
        if offset % itemsize == 0:
            flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // itemsize, offset=offset)
        else:  # unaligned data: one copy of this tensor
            flat = torch.frombuffer(bytearray(self._map[offset : self._data_start + end]), dtype=dtype)
        return flat.view(shape)

    def close(self) -> None:
        # Tensors viewing the mapping keep it alive (mmap refuses to close while exported), so the
        # mapping is left to the garbage collector; the file descriptor can go.
        self._file.close()


def _read_safetensors_header(f, size: int, path: str) -> tuple[dict[str, tuple], int]:
    if size < 8:
        raise WeightFileError(f"{path} is not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > _MAX_HEADER or 8 + header_len > size:
        raise WeightFileError(
            f"{path} is not a valid safetensors file: its header length {header_len} does not fit the "
            f"file's {size} bytes (truncated or not safetensors)"
        )
    raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightFileError(f"{path} is not a valid safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path} is not a valid safetensors file: its header is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    entries: dict[str, tuple] = {}
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
            raise WeightFileError(f"{where} lacks dtype, shape or data_offsets in the header")
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise WeightFileError(f"{where} has dtype {meta['dtype']!r}, which torchtrt_ext does not read")
        shape, offsets = meta["shape"], meta["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise WeightFileError(f"{where} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise WeightFileError(f"{where} has bad data_offsets {offsets!r}")
        begin, end = offsets
        need = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end or end - begin != need:
            raise WeightFileError(
                f"{where}: data_offsets {offsets} hold {end - begin} bytes, but dtype {meta['dtype']} and "
                f"shape {shape} need {need}"
            )
        if end > data_size:
            raise WeightFileError(
                f"{where} ends at data byte {end}, beyond the file's {data_size} data bytes (truncated file)"
            )
        entries[name] = (dtype, shape, begin, end)
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0 and e1 > b1:
            raise WeightFileError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file (corrupt header)")
    return entries, data_start


def open_weights(weights: Any) -> WeightSource:
    """A WeightSource for a state_dict (any mapping of names to tensors), an nn.Module (its state_dict;
    a torch.compile'd module's by its original names), or a path to a .safetensors file or a torch
    checkpoint (a state_dict, or a dict holding one under 'state_dict' or 'model')."""
    if isinstance(weights, WeightSource):
        return weights
    if isinstance(weights, torch.nn.Module):
        module = getattr(weights, "_orig_mod", weights)  # torch.compile's OptimizedModule
        return MappingSource(module.state_dict(), f"the state_dict of {type(module).__name__}")
    if isinstance(weights, Mapping):
        return MappingSource(weights)
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise WeightFileError(f"no weights file at {path}")
        if _is_safetensors(path):
            return SafetensorsSource(path)
        return _checkpoint(path)
    raise TypeError(
        "weights must be a state_dict (a mapping of names to tensors), an nn.Module, or a path to a "
        f".safetensors file or torch checkpoint; got {type(weights).__name__}"
    )


def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"  # 8-byte length, then the JSON header


def _checkpoint(path: str) -> MappingSource:
    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise WeightFileError(f"{path} could not be read as a torch checkpoint or safetensors file: {exc}") from None
    if isinstance(loaded, Mapping) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping):
        raise WeightFileError(f"{path} holds a {type(loaded).__name__}, not a state_dict")
    return MappingSource(loaded, f"checkpoint {path}")
