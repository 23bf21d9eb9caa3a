"""Weight streaming, step 2: which weights stay resident on the device for a budget, and where the
streamed ones go in a ring buffer. A pure function of weight sizes and the segments' weights.

Order of placement: weights read by several segments first (streamed, they would be copied once per
segment), then the first segment's (nothing runs before it to hide their copy), then the rest where it
lowers the most-streamed segment, so that the copies spread evenly under the compute.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Sequence

ALIGN = 256  # bytes: every weight in a ring buffer starts at a multiple of this


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclasses.dataclass(frozen=True)
class Placement:
    budget: int
    resident: frozenset[int]
    resident_bytes: int
    streamed: list[list[int]]  # per segment: the weights it streams
    offsets: list[list[int]]  # per segment: ring-buffer offsets of those weights
    ring_bytes: int  # one ring buffer


def place(sizes: Sequence[int], segments: Sequence[Sequence[int]], budget: int) -> Placement:
    """Keep up to `budget` bytes of the weights (sizes by weight index) resident; each segment streams
    the weights it reads (`segments`: per segment, the weight indices it uses) that are not."""
    uses: dict[int, int] = {}
    for ws in segments:
        for w in set(ws):
            uses[w] = uses.get(w, 0) + 1
    resident: set[int] = set()
    left = budget

    def take(ws: Sequence[int]) -> None:
        nonlocal left
        for w in sorted(ws, key=lambda w: -sizes[w]):
            if w not in resident and sizes[w] <= left:
                resident.add(w)
                left -= sizes[w]

    take([w for w, n in uses.items() if n > 1])
    if segments:
        take(segments[0])
    per_seg = [sorted(set(ws), key=lambda w: -sizes[w]) for ws in segments]
    # The rest of the budget: repeatedly, the largest weight that still fits, of the segment that
    # streams the most. Equal loads are lowered in an order that spreads over the program (0, 1/2,
    # 1/4, 3/4, ...): where weights are too coarse for every segment to stream alike, heavier and
    # lighter segments then alternate, and the ring banks the light ones' slack.
    users: dict[int, list[int]] = {}
    for k, ws in enumerate(per_seg):
        for w in ws:
            users.setdefault(w, []).append(k)
    load = [sum(sizes[w] for w in ws if w not in resident) for ws in per_seg]
    rank = {k: r for r, k in enumerate(sorted(range(len(per_seg)), key=_radical_inverse))}
    heap = [(-load[k], rank[k], k) for k in range(len(per_seg)) if load[k]]
    heapq.heapify(heap)
    while heap and left > 0:
        negative, _, k = heapq.heappop(heap)
        if -negative != load[k]:
            continue  # stale: the segment's load changed since this entry was pushed
        fit = next((w for w in per_seg[k] if w not in resident and sizes[w] <= left), None)
        if fit is None:
            continue  # nothing of this segment fits any more
        resident.add(fit)
        left -= sizes[fit]
        for j in users[fit]:
            load[j] -= sizes[fit]
            if load[j]:
                heapq.heappush(heap, (-load[j], rank[j], j))
    streamed, offsets = [], []
    ring = 0
    for ws in per_seg:
        mine = [w for w in ws if w not in resident]
        offs, at = [], 0
        for w in mine:
            offs.append(at)
            at += aligned(sizes[w])
        streamed.append(mine)
        offsets.append(offs)
        ring = max(ring, at)
    return Placement(budget, frozenset(resident), sum(sizes[w] for w in resident), streamed, offsets, ring)


def _radical_inverse(k: int) -> float:
    """k's binary digits mirrored after the point: 0, 1/2, 1/4, 3/4, 1/8, ... (van der Corput)."""
    value, scale = 0.0, 0.5
    while k:
        value += scale * (k & 1)
        k >>= 1
        scale /= 2
    return value
