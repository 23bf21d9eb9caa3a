"""Small models covering what engines must handle, each with a random-input factory.

Used by the CPU and GPU tests and by the stream stress test. Every model is built with random
weights; `inputs(batch, device, dtype)` draws fresh random inputs (never zeros).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Convolutions with BatchNorm (buffers: running mean/var) in eval mode, pooling, a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class EncoderBlock(nn.Module):
    """A pre-norm transformer encoder block: multi-head self-attention (SDPA) and an MLP."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class BufferModel(nn.Module):
    """BatchNorm1d in eval mode plus registered buffers (persistent and not) used in the math."""

    def __init__(self, dim: int = 24):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.register_buffer("scale", torch.rand(dim) + 0.5)
        self.register_buffer("shift", torch.randn(dim), persistent=False)

    def forward(self, x):
        return self.bn(self.fc(x)) * self.scale + self.shift


class MultiIO(nn.Module):
    """Several inputs (one keyword-only) and a nested tuple / dict output."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim)

    def forward(self, x, y, *, scale=None):
        h = self.a(x) + self.b(y)
        if scale is not None:
            h = h * scale
        return h.relu(), {"sum": h.sum(dim=-1), "both": (self.a(y), torch.tanh(h))}


class GraphBreak(nn.Module):
    """A forward that neither dynamo nor export captures whole: a data-dependent Python branch."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:  # data-dependent: dynamo breaks the graph here, export cannot trace it
            h = h * 2
        return self.fc2(torch.sin(h))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[int, torch.device, torch.dtype], tuple[tuple, dict]]


def _randn(*shape: int, device, dtype) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype)


ZOO: dict[str, Case] = {
    c.name: c
    for c in [
        Case("mlp", MLP, lambda b, dev, dt: ((_randn(b, 32, device=dev, dtype=dt),), {})),
        Case("cnn", CNN, lambda b, dev, dt: ((_randn(b, 3, 16, 16, device=dev, dtype=dt),), {})),
        Case("encoder", EncoderBlock, lambda b, dev, dt: ((_randn(b, 12, 64, device=dev, dtype=dt),), {})),
        Case("buffers", BufferModel, lambda b, dev, dt: ((_randn(b, 24, device=dev, dtype=dt),), {})),
        Case(
            "multi_io",
            MultiIO,
            lambda b, dev, dt: (
                (_randn(b, 16, device=dev, dtype=dt), _randn(b, 16, device=dev, dtype=dt)),
                {"scale": _randn(16, device=dev, dtype=dt)},
            ),
        ),
        Case("graph_break", GraphBreak, lambda b, dev, dt: ((_randn(b, 16, device=dev, dtype=dt),), {})),
    ]
}


def build(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A zoo model with random weights and randomised BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = ZOO[name].make()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model.to(device=device, dtype=dtype).eval()


def inputs(name: str, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[tuple, dict]:
    return ZOO[name].inputs(batch, torch.device(device), dtype)


# Tolerances for comparing against eager: the same arithmetic reassociated by a compiler.
TOLERANCE = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}


def assert_matches(actual: Any, expected: Any, dtype: torch.dtype) -> None:
    """Every element of every output within tolerance of eager; same structure; no NaN anywhere."""
    import torch.utils._pytree as pytree

    a_flat, a_spec = pytree.tree_flatten(actual)
    e_flat, e_spec = pytree.tree_flatten(expected)
    assert a_spec == e_spec, f"output structure {a_spec} != eager {e_spec}"
    assert len(e_flat) > 0
    for a, e in zip(a_flat, e_flat):
        assert isinstance(a, torch.Tensor)
        assert not torch.isnan(e).any(), "eager output has NaN: the test input is bad"
        assert e.abs().sum() > 0, "eager output is all zeros: the test cannot tell right from wrong"
        torch.testing.assert_close(a, e, **TOLERANCE[dtype])
