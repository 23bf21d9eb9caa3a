"""``torchtrt_ext.calibrate``: run a model over calibration batches and record the activation range
(amax) at the input of every quantizable layer, keyed by the layer's module name and role
("layers.0.mlp.up_proj:input"), as a CalibrationCache.

Methods: "max" (the largest |x| seen), "percentile" (the 99.99th percentile of |x| over all batches,
from a histogram) and "entropy" (TensorRT's KL-divergence threshold on the same histogram). The
histograms have HISTOGRAM_BINS bins over [0, the largest |x| seen], widened (bins merged in pairs)
when a later batch reaches further.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterable

import torch
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from ..core.calibration import METHODS, CalibrationCache
from ..core.errors import CalibrationError

HISTOGRAM_BINS = 2048
PERCENTILE = 99.99
QUANT_LEVELS = 128  # int8's non-negative levels: the entropy method's target bins
QUANTIZABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def quantizable_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers whose inputs an engine quantizes, by module name: linear and convolution layers,
    and transformers' Conv1D (GPT-2's linear layers)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZABLE) or type(module).__name__ == "Conv1D":
            found[name] = module
    return found


def fingerprint(model: torch.nn.Module) -> str:
    """The model's structure: each module's name and class, each parameter's and buffer's name and
    shape. The same architecture at any weights, on any device and in any dtype has the same
    fingerprint: a calibration recorded on the float32 model serves its fp16 or bf16 copy."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"m {name} {type(module).__module__}.{type(module).__qualname__}\n".encode())
    for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, t in items:
            h.update(f"{kind} {name} {tuple(t.shape)}\n".encode())
    return h.hexdigest()[:32]


def check_fingerprint(cache: CalibrationCache, model: torch.nn.Module) -> None:
    """A CalibrationError where `cache` was recorded for another model (its fingerprint differs: another
    structure or parameter shapes); a cache without a fingerprint ('-', as TensorRT's format
    reads) is taken as it is."""
    if cache.model_fingerprint in ("-", fingerprint(model)):
        return
    raise CalibrationError(
        f"the calibration cache was recorded for another model (fingerprint {cache.model_fingerprint}, but "
        f"this {type(model).__name__} is {fingerprint(model)}: another structure or parameter shapes); "
        "calibrate this model with torchtrt_ext.calibrate"
    )


class _Histogram:
    """|x| of one tensor across batches: its maximum and a histogram over [0, edge)."""

    def __init__(self) -> None:
        self.amax = 0.0
        self.edge = 0.0
        self.counts: torch.Tensor | None = None

    def add(self, x: torch.Tensor, keep_histogram: bool) -> None:
        x = x.detach().abs().float()
        top = float(x.max()) if x.numel() else 0.0
        self.amax = max(self.amax, top)
        if not keep_histogram or top == 0.0:
            return
        if self.counts is None:
            self.edge, self.counts = top, torch.zeros(HISTOGRAM_BINS, dtype=torch.float64)
        while top > self.edge:  # widen: merge bins in pairs, doubling the range
            self.counts = torch.cat([self.counts.view(-1, 2).sum(1), torch.zeros(HISTOGRAM_BINS // 2, dtype=torch.float64)])
            self.edge *= 2
        self.counts += torch.histc(x.flatten().cpu(), HISTOGRAM_BINS, 0.0, self.edge).double()

    def threshold(self, method: str) -> float:
        if method == "max" or self.counts is None:
            return self.amax
        if method == "percentile":
            cumulative = torch.cumsum(self.counts, 0)
            index = int(torch.searchsorted(cumulative, cumulative[-1] * PERCENTILE / 100))
            return min(self.amax, (index + 1) * self.edge / HISTOGRAM_BINS)
        return min(self.amax, _entropy_threshold(self.counts) * self.edge / HISTOGRAM_BINS)


def _entropy_threshold(counts: torch.Tensor) -> int:
    """TensorRT's entropy calibration: the number of bins i (from 128 up) whose clipped distribution,
    quantized to 128 levels, loses the least information (KL divergence) against the original."""
    hist = counts.double()
    best, best_i = math.inf, len(hist)
    for i in range(QUANT_LEVELS, len(hist) + 1, 16):
        reference = hist[:i].clone()
        reference[i - 1] += hist[i:].sum()  # clipped outliers land in the last bin
        chunks = torch.tensor_split(hist[:i], QUANT_LEVELS)
        expanded = []
        for chunk in chunks:
            nonzero = (chunk > 0).double()
            share = chunk.sum() / nonzero.sum() if nonzero.sum() > 0 else 0.0
            expanded.append(nonzero * share)
        candidate = torch.cat(expanded)
        p = reference / reference.sum()
        q = candidate / candidate.sum() if candidate.sum() > 0 else candidate
        mask = p > 0
        if bool((q[mask] == 0).any()):
            continue
        divergence = float((p[mask] * torch.log(p[mask] / q[mask])).sum())
        if divergence < best:
            best, best_i = divergence, i
    return best_i


def calibrate(model: torch.nn.Module, batches: Iterable[Any], method: str = "max", progress: bool = True) -> CalibrationCache:
    """Run `model` (in eval mode, without gradients) over `batches` (argument tuples or keyword
    dicts) and return each quantizable layer's input amax. Refuses an empty calibration set and a
    layer no batch reached or that only saw zeros (its amax would be 0): both are CalibrationErrors."""
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; the methods are {', '.join(METHODS)}")
    layers = quantizable_layers(model)
    if not layers:
        raise CalibrationError(f"{type(model).__name__} has no quantizable layer (linear or convolution)")
    seen = {name: _Histogram() for name in layers}
    digest, count = hashlib.sha256(), 0

    def hook(name: str):
        def record(module: torch.nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                seen[name].add(args[0], method != "max")

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="torchtrt_ext calibrate", unit="batch", disable=not progress):
                args, kwargs = (batch, {}) if isinstance(batch, tuple) else ((), batch) if isinstance(batch, dict) else ((batch,), {})
                _digest(digest, (args, kwargs))
                model(*args, **kwargs)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes:
            m.training = mode
    if count == 0:
        raise CalibrationError("the calibration set is empty: pass an iterable of argument tuples or keyword dicts")
    unreached = sorted(name for name, h in seen.items() if h.amax == 0.0)
    if unreached:
        raise CalibrationError(
            f"{len(unreached)} quantizable layer(s) saw no input or only zeros in {count} batches, so they have no "
            f"range: {', '.join(unreached[:10])}{' ...' if len(unreached) > 10 else ''}; calibrate with inputs that reach them"
        )
    entries = {f"{name}:input": h.threshold(method) for name, h in seen.items()}
    return CalibrationCache(entries, method, fingerprint(model), count, digest.hexdigest()[:32])


def _digest(h: "hashlib._Hash", value: Any) -> None:
    """The calibration set's hash: every tensor's dtype, shape and bytes, every other leaf's repr."""
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(leaf).encode())
