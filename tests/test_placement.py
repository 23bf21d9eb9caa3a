"""Weight-streaming placement, a pure function of weight sizes and segments: tested without graphs."""

from __future__ import annotations

import random

from torchtrt_ext.engines.streamed.placement import ALIGN, aligned, place


def _check(sizes, segments, budget):
    p = place(sizes, segments, budget)
    assert p.resident_bytes == sum(sizes[w] for w in p.resident) <= budget
    for k, ws in enumerate(segments):
        assert set(p.streamed[k]) == set(ws) - p.resident  # each streams exactly what is not resident
        spans = sorted(zip(p.offsets[k], p.streamed[k]))
        for (o, w), (o2, _) in zip(spans, spans[1:]):
            assert o % ALIGN == 0 and o + sizes[w] <= o2  # aligned, no overlap
        assert all(o + sizes[w] <= p.ring_bytes for o, w in spans)
    return p


def test_zero_and_full_budgets():
    sizes = [1000, 2000, 3000, 4000]
    segments = [[0, 1], [2], [3]]
    none = _check(sizes, segments, 0)
    assert not none.resident and none.ring_bytes == max(aligned(1000) + aligned(2000), aligned(3000), aligned(4000))
    full = _check(sizes, segments, sum(sizes))
    assert full.resident == {0, 1, 2, 3} and full.ring_bytes == 0


def test_shared_weights_then_the_first_segment_go_resident_first():
    sizes = [500, 100, 100, 5000, 5000]
    segments = [[1, 0], [2, 0], [3], [4]]  # weight 0 is read by two segments
    p = _check(sizes, segments, 500)
    assert p.resident == {0}
    p = _check(sizes, segments, 650)
    assert p.resident == {0, 1}  # then the first segment's


def test_the_budget_lowers_the_most_streamed_segment():
    sizes = [10] + [100] * 8
    segments = [[0], [1, 2, 3, 4], [5], [6], [7], [8]]  # segment 1 streams 400 bytes, the others 100
    p = _check(sizes, segments, 10 + 300)
    loads = [sum(sizes[w] for w in ws) for ws in p.streamed]
    assert max(loads) == 100  # the 300 bytes went to the heaviest segment


def test_random_cases_hold_every_invariant():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 30)
        sizes = [rng.randint(0, 10_000) for _ in range(n)]
        segments = [rng.sample(range(n), rng.randint(1, n)) for _ in range(rng.randint(1, 8))]
        _check(sizes, segments, rng.randint(0, sum(sizes)))
