"""``torchtrt-ext demo``: compile a small transformer both ways, check it against eager, report."""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import engines as _engines
from .core.settings import Settings
from .engines import tensorrt as _tensorrt
from .frontends.wrapper import compile as _compile_module

TOLERANCE = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class DemoModel(nn.Module):
    """A two-block transformer encoder with a classification head."""

    def __init__(self, dim: int = 128, heads: int = 4, classes: int = 10):
        super().__init__()
        self.blocks = nn.Sequential(_Block(dim, heads), _Block(dim, heads))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean(dim=1))


def _time_ms(fn, x, device: torch.device, repeats: int = 20) -> float:
    for _ in range(3):
        fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats * 1e3


def run(device: str | None = None, dtype: str = "float32") -> int:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    model = DemoModel().to(dev, dt).eval()
    x = torch.randn(8, 32, 128, device=dev, dtype=dt)
    kind = _engines.resolve_kind(Settings())
    reason = _tensorrt.unavailable_reason()
    params = sum(p.numel() for p in model.parameters())
    print(f"torchtrt_ext demo: torch {torch.__version__}, device {dev}, {dtype}")
    print(f"engine: {kind}" + (f" (TensorRT not used: {reason})" if reason else ""))
    print(f"model: 2-block transformer encoder, {params / 1e6:.2f} M parameters, input {tuple(x.shape)}")

    with torch.no_grad():
        expected = model(x)
        rows = []
        start = time.perf_counter()
        by_backend = torch.compile(model, backend="torchtrt_ext")
        out_backend = by_backend(x)
        rows.append(("torch.compile(backend='torchtrt_ext')", time.perf_counter() - start, out_backend, by_backend))
        start = time.perf_counter()
        wrapped = _compile_module(model, (x,))
        out_wrapped = wrapped(x)
        rows.append(("torchtrt_ext.compile(model)", time.perf_counter() - start, out_wrapped, wrapped))

        eager_ms = _time_ms(model, x, dev)
        print(f"\n{'entry point':40s} {'compile s':>9s} {'max |err|':>10s} {'rel err':>9s} {'ms/call':>8s} {'eager ms':>8s}")
        ok = True
        for name, seconds, out, fn in rows:
            err = (out.float() - expected.float()).abs().max().item()
            rel = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
            good = torch.allclose(out, expected, **TOLERANCE[dt])
            ok &= good
            print(f"{name:40s} {seconds:9.1f} {err:10.2e} {rel:9.2e} {_time_ms(fn, x, dev):8.2f} {eager_ms:8.2f}" + ("" if good else "  MISMATCH"))
    mem = wrapped.engines[0].memory()
    print(f"\nweights: {mem.weight_bytes / 2**20:.2f} MiB on {mem.device}, "
          + ("shared with the model (no copy)" if mem.owned_bytes == 0 else f"{mem.owned_bytes / 2**20:.2f} MiB copied"))
    tol = TOLERANCE[dt]
    print(f"result: {'OK' if ok else 'FAILED'} (every element within rtol={tol['rtol']}, atol={tol['atol']} of eager)")
    return 0 if ok else 1
