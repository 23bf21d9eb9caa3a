"""Copying new weight values into an engine's tensors, on the caller's current stream."""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.runtime import _C, built_with_cuda


def prepare_sources(destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sources ready to copy without allocating device memory: converted to the destination's dtype on
    their own device, except CUDA sources on the destination's device (the copy kernel converts)."""
    ready = []
    for dst, src in zip(destinations, sources):
        if src.dtype != dst.dtype and not (src.device == dst.device and src.device.type == "cuda"):
            src = src.to(dst.dtype)
        ready.append(src)
    return ready


# Same-device pairs of one dtype, contiguous and of one shape, go to the runtime's one-kernel copy
# (csrc/batched_copy.cu): on the H100 a 2.2 GB refit of ~200 weights took 1.79 ms against a 1.53 ms
# floor, where one copy_ per weight took 2.38 ms, launch-bound (benchmarks/NOTES.md). Other pairs small
# enough go to one multi-tensor copy, the rest to copy_.
_FUSE_BELOW_BYTES = 1 << 20


def copy_weights(destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """Copy on the current stream (asynchronously from CUDA and pinned host memory), converting each
    source to its destination's dtype (see prepare_sources)."""
    if not destinations:
        return
    batch = built_with_cuda
    if batch and destinations[0].is_cuda:
        # The usual refit: every pair same-device, one dtype, contiguous. The runtime checks all pairs
        # (in C++, far cheaper than per-pair checks here) before it enqueues anything, so a refusal
        # leaves nothing copied, and the pairs are then sorted out below.
        try:
            _C.batched_copy(list(destinations), list(sources))
            return
        except ValueError:
            pass
    sources = prepare_sources(destinations, sources)
    with torch.no_grad():
        batched: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        fused_dst, fused_src = [], []
        for dst, src in zip(destinations, sources):
            same = dst.is_cuda and src.device == dst.device and src.dtype == dst.dtype
            if same and batch and dst.shape == src.shape and dst.is_contiguous() and src.is_contiguous():
                pairs = batched.setdefault(dst.device, ([], []))
                pairs[0].append(dst)
                pairs[1].append(src)
            elif same and dst.numel() * dst.element_size() < _FUSE_BELOW_BYTES:
                fused_dst.append(dst)
                fused_src.append(src)
            else:
                dst.copy_(src, non_blocking=True)
        for batch_dst, batch_src in batched.values():  # one device in an engine: one call, one kernel
            _C.batched_copy(batch_dst, batch_src)
        if fused_dst:
            torch._foreach_copy_(fused_dst, fused_src, non_blocking=True)
