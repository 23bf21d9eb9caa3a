"""The engine file's region checksum (the design: checksum's docstring).

Computed on the device a region is read to, in pieces as the staging reader delivers them."""

from __future__ import annotations

import threading

import torch

# --- Checksums (the design: checksum's docstring) -------------------------------------------------

CHECKSUM_PRIME = 2**31 - 1
CHECKSUM_GENERATORS = (16807, 48271)
CHECKSUM_BITS = 62
BLOCK = 4096  # bytes per row of the GEMM; ALIGN is a multiple, so a padded region is whole rows
SMALL_BLOCK = 128  # the row width for regions of at most 16 rows of BLOCK
PIECE_ROWS = 2**16  # rows summed in one piece (int64 sums below 2**57); 256 MiB of BLOCK rows
_DIGITS, _DIGIT_BASE = 5, 128
_COLUMNS = 16  # per generator 8 columns: 5 digits and 3 zero ones (the CUDA int8 GEMM wants a multiple of 8)
assert BLOCK % SMALL_BLOCK == 0 and SMALL_BLOCK % 8 == 0  # and file_layout checks ALIGN % BLOCK == 0


def _powers(g: int, n: int) -> torch.Tensor:
    """g**i mod p for i < n (n a multiple of 64), as int64: a 64-wide table of low powers times one of
    high powers (each product below 2**62)."""
    p = CHECKSUM_PRIME
    low = torch.tensor([pow(g, t, p) for t in range(64)], dtype=torch.int64)
    high = torch.tensor([pow(g, 64 * h, p) for h in range(n // 64)], dtype=torch.int64)
    return (high[:, None] * low[None, :]).remainder_(p).reshape(-1)


def _key_columns() -> torch.Tensor:
    """KEYS transposed: (_COLUMNS, BLOCK) int8. Column 8s+d (d < 5) holds digit d of generator s's byte
    keys g**(j//2) * 256**(j%2) mod p in balanced base 128: key = sum_d digit_d * 128**d (mod p)."""
    p = CHECKSUM_PRIME
    columns = torch.zeros(_COLUMNS, BLOCK, dtype=torch.int8)
    for s, g in enumerate(CHECKSUM_GENERATORS):
        lane = _powers(g, BLOCK // 2)
        value = torch.stack([lane, lane * 256 % p], 1).reshape(-1)  # byte 2i: the lane's key; 2i+1: 256 times it
        value = torch.where(value > p // 2, value - p, value)  # |value| <= 2**30
        for d in range(_DIGITS):
            digit = value.remainder(_DIGIT_BASE)
            digit = torch.where(digit >= _DIGIT_BASE // 2, digit - _DIGIT_BASE, digit)
            columns[8 * s + d] = digit.to(torch.int8)
            value = (value - digit) // _DIGIT_BASE
        assert not value.any(), "5 digits of base 128 hold every key"
    return columns


class _DeviceKeys:
    """What a device needs to compute checksums: the key matrix, each row width's row keys (built on the
    host, copied), and whether its int8 GEMM is exact."""

    def __init__(self, device: torch.device):
        self.device = device
        self.columns = _KEY_COLUMNS.to(device)  # (_COLUMNS, BLOCK) contiguous: .t() is the column-major KEYS
        self.row_keys: dict[int, torch.Tensor] = {}
        self._retired: list[torch.Tensor] = []
        self.int_mm = self._int_mm_is_exact()
        self.keys64: torch.Tensor | None = None  # the float64 GEMM's keys, made where it is needed

    def keys(self, width: int) -> torch.Tensor:
        """(width, _COLUMNS) int8, column-major: the keys of a row's first `width` bytes."""
        return self.columns[:, :width].t()

    def rows(self, width: int, n: int) -> torch.Tensor:
        """(n, 2, 1, 2) int64: for rows 0..n-1 of width `width`, each generator's row key g**(width/2 *
        row) mod p as its low and high 16 bits. Built on the host (as many rows as the largest piece so
        far, rounded up to a power of two) and copied."""
        table = self.row_keys.get(width)
        if table is None or table.shape[0] < n:
            if table is not None:  # work queued on another stream may still read it: never freed
                self._retired.append(table)
            size = max(64, 1 << (n - 1).bit_length())
            halves = []
            for g in CHECKSUM_GENERATORS:
                key = _powers(pow(g, width // 2, CHECKSUM_PRIME), size)
                halves.append(torch.stack([key & 0xFFFF, key >> 16], 1))
            table = self.row_keys[width] = torch.stack(halves, 1)[:, :, None, :].contiguous().to(self.device)
        return table[:n]

    def _int_mm_is_exact(self) -> bool:
        """torch._int_mm against an exact int64 product on the host, on rows that drive every column's
        sums to its extremes (where a kernel adding products in 16 bits would saturate) and random rows,
        at both row widths."""
        if not hasattr(torch, "_int_mm") or self.device.type not in ("cpu", "cuda"):
            return False
        for width, (rows, expected) in _self_test().items():
            try:
                got = torch._int_mm(rows.to(self.device), self.keys(width)).cpu()
            except (RuntimeError, NotImplementedError):
                return False
            if not torch.equal(got.to(torch.int64), expected):
                return False
        return True


_KEY_COLUMNS = _key_columns()
_SELF_TEST: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _self_test() -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per row width, int8 rows that drive every column's sums to its extremes (where a kernel adding
    products in 16 bits would saturate) and random ones, with their exact digit sums (int64 on the
    host). Made once."""
    if not _SELF_TEST:
        extreme = torch.where(_KEY_COLUMNS > 0, 127, -128).to(torch.int8)  # (_COLUMNS, BLOCK): each column's largest sum
        noise = torch.randint(-128, 128, (16, BLOCK), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
        rows = torch.cat([extreme, -1 - extreme, noise])  # -1 - x: each column's smallest
        for width in (BLOCK, SMALL_BLOCK):
            part = rows[:, :width].contiguous()
            _SELF_TEST[width] = (part, part.to(torch.int64) @ _KEY_COLUMNS[:, :width].t().to(torch.int64))
    return _SELF_TEST


_device_keys: dict[torch.device, _DeviceKeys] = {}
_device_keys_lock = threading.Lock()


def keys_on(device: torch.device) -> _DeviceKeys:
    with _device_keys_lock:
        found = _device_keys.get(device)
        if found is None:
            found = _device_keys[device] = _DeviceKeys(device)
        return found


def _width(nbytes: int) -> int:
    return BLOCK if nbytes > 16 * BLOCK else SMALL_BLOCK


def pieces(nbytes: int) -> int:
    """How many pieces region_sums sums a region of `nbytes` in."""
    return -(-nbytes // (PIECE_ROWS * _width(nbytes)))


def region_sums(region: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The checksum's sums of `region` (flat uint8, a multiple of SMALL_BLOCK bytes, any device), not yet
    read back: (pieces(len), 2, 8, 2) int64 on its device, written into `out` where given. checksum_value
    finishes them on the host."""
    assert region.dtype == torch.uint8 and region.dim() == 1 and region.numel() % SMALL_BLOCK == 0
    keys = keys_on(region.device)
    nbytes = region.numel()
    if out is None:
        out = torch.empty(pieces(nbytes), 2, 8, 2, dtype=torch.int64, device=region.device)
    if nbytes == 0:
        return out
    if region.device.type == "cuda" and region.data_ptr() % 16:
        region = region.clone()  # the int8 GEMM reads 16-byte aligned rows
    width = _width(nbytes)
    step = PIECE_ROWS * width
    for i, start in enumerate(range(0, nbytes, step)):
        rows = region[start : start + step].view(torch.int8).view(-1, width)
        n = rows.shape[0]
        if keys.int_mm and (rows.device.type != "cuda" or n > 16):  # the CUDA kernel wants more than 16 rows
            digit_sums = torch._int_mm(rows, keys.keys(width))
        else:  # exact: every partial sum is an integer below 2**25
            if keys.keys64 is None:
                keys.keys64 = keys.columns.t().to(torch.float64).contiguous()
            digit_sums = (rows.to(torch.float64) @ keys.keys64[:width]).to(torch.int64)
        torch.sum(digit_sums.view(n, 2, 8, 1) * keys.rows(width, n), 0, out=out[i])
    return out


def _finish(sums: list, nbytes: int, start: int = 0) -> list[int]:
    """Each generator's S_g (mod p) of a region's read-back sums; start: the region's offset in a larger
    region it is a piece of (even)."""
    p = CHECKSUM_PRIME
    totals = [0] * len(CHECKSUM_GENERATORS)
    step = PIECE_ROWS * _width(nbytes)
    for i, piece in enumerate(sums):
        for s, g in enumerate(CHECKSUM_GENERATORS):
            value = sum(_DIGIT_BASE**d * (piece[s][d][0] + (piece[s][d][1] << 16)) for d in range(_DIGITS))
            totals[s] = (totals[s] + value * pow(g, (start + i * step) // 2, p)) % p
    return totals


def checksum_value(*parts: tuple[list, int, int]) -> int:
    """The 62-bit checksum of a region from its parts' read-back sums: (region_sums(part).tolist(), the
    part's length, its offset in the region); one part (sums, nbytes, 0) for a region summed whole."""
    totals = [0] * len(CHECKSUM_GENERATORS)
    for sums, nbytes, start in parts:
        totals = [(a + b) % CHECKSUM_PRIME for a, b in zip(totals, _finish(sums, nbytes, start))]
    return totals[0] << 31 | totals[1]


def checksum(data: torch.Tensor) -> int:
    """The checksum of `data` (flat uint8, any length, any device) zero-padded to whole rows: the
    checksum of its padded region in the file.

    A region's checksum is a keyed positional hash: the region is read as 16-bit lanes y_i (i counted
    from the region's start; y_i = b_2i + 256*b_2i+1 with b the bytes read as int8, a one-to-one map of
    the lane's 16 bits onto 65,536 integers), and for two generators g (16807 and 48271, both primitive
    roots of the prime p = 2**31 - 1), S_g = sum_i y_i * g**i mod p. The checksum is S_16807 * 2**31 +
    S_48271 (62 bits). Zero bytes add nothing, so a region's zero padding does not change it.

    What it catches, with certainty (within a region of less than 4 GiB, where the keys g**i are all
    distinct mod p): any change confined to one 32-bit word (every bit flip), since it changes S_g by
    (d0 + g*d1) * g**i with |d0|, |d1| < 2**16, which is 0 for both generators only where d0 = d1 = 0;
    a swap of two unequal 16-bit lanes, and a compensating +k/-k pair of lanes ((y - y')(g**j - g**i) is
    never 0 mod p); a swap of two unequal 32-bit words (it changes S_g by (g**j - g**i)(d0 + g*d1), and
    the two generators cannot both be roots of a nonzero d0 + z*d1). Other changes (a +k/-k pair of
    32-bit words with carries, a moved block) go unnoticed only where both S_g hit their old values: a
    polynomial of the changed lanes' differences vanishing at both generators, about 1 in 2**62 for
    data not built for it.

    How it runs at memory speed, in three torch ops per piece of a region (on a GPU: one int8 GEMM and
    two elementwise kernels, so that a process's first load has few kernels to load):
    1. The region is viewed as rows of W bytes (W = BLOCK; 128 for regions of 16 rows or fewer, as the
       CUDA int8 GEMM wants more than 16 rows). Byte j of a row has the key g**(j//2) * 256**(j%2) mod p,
       written as 5 digits in [-64, 63] of base 128: a fixed int8 matrix KEYS (BLOCK x 16; columns 8s+d
       for generator s, digit d; the others zero). One int8 GEMM, torch._int_mm (tensor cores on a GPU,
       VNNI/AMX on a CPU), gives each row's digit sums in one read of the data, exactly (int32; at most
       4096 * 128 * 64 = 2**25 in size).
    2. Each row's sums are multiplied by its row key g**(W/2 * row) mod p, split in 16-bit halves (each
       product below 2**41, int64), and
    3. summed over the rows of the piece (at most PIECE_ROWS = 2**16: below 2**57).
    The host finishes (Python integers): it folds the digits (128**d), the halves (2**16) and the piece's
    own key g**(start/2), mod p. The digits stay within 7 bits so that an int8 kernel that adds pairs of
    products in 16 bits (x86 without VNNI) cannot saturate; before a device's first use, its GEMM is
    checked against an exact int64 product on the host, on rows built to drive every column to its
    extremes, and where it differs (or cannot run) an exact float64 GEMM (every partial sum an integer
    below 2**53) stands in. The integers are the same on every device and either path, so writer and
    reader agree wherever each runs, and a reader may sum a region in pieces (region_sums of a piece,
    with its start) as it stages them.

    Why a GEMM rather than elementwise passes (16-bit lanes times int64 keys, summed per row): each
    such pass writes and reads 8 bytes per 2-byte lane. Measured on an H200 over 66 regions of 128 MiB
    (8.86 GB): the int8 GEMM design 5.0 ms (1760 GB/s; a device-to-device copy runs at 1983 GB/s, the
    format-1 word sum took 12.6 ms), the elementwise design 135 GB/s (66 ms), the float64 fallback
    15 GB/s. On a 2-core x86 host (AMX/VNNI) the GEMM design sums about 10-14 GB/s, the elementwise one
    0.5 GB/s.
    """
    n = data.numel()
    whole = n // BLOCK * BLOCK
    parts = [(region_sums(data[:whole]).tolist(), whole, 0)] if whole else []
    if whole < n:
        tail = torch.zeros(BLOCK, dtype=torch.uint8, device=data.device)
        tail[: n - whole] = data[whole:]
        parts.append((region_sums(tail).tolist(), BLOCK, whole))
    return checksum_value(*parts)


