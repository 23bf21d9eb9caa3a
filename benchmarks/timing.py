"""Timing helpers shared by the benchmarks: warm up, interleave the variants, take medians."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_ms(
    variants: dict[str, Callable[[], Any]], device: torch.device, *, warmup: int = 5, rounds: int = 7, calls: int = 10
) -> dict[str, dict[str, float]]:
    """Per variant: 'latency' = median over calls of (call + synchronize), host overhead included;
    'throughput' = median over rounds of the time per call when `calls` run back to back;
    'round_latency' = per round, the median of that round's calls (for ratios taken round by round).

    Rounds interleave the variants (A B C A B C ...), so clock and thermal drift hit all alike.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync(device)
    single: dict[str, list[float]] = {name: [] for name in variants}
    batched: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                sync(device)
                single[name].append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            batched[name].append((time.perf_counter() - start) * 1e3 / calls)
    return {
        name: {
            "latency": statistics.median(single[name]),
            "throughput": statistics.median(batched[name]),
            "throughput_min": min(batched[name]),
            "latency_spread": _spread(single[name]),
            "round_latency": [statistics.median(single[name][r * calls : (r + 1) * calls]) for r in range(rounds)],
        }
        for name in variants
    }


def _spread(values: list[float]) -> float:
    """Half the distance between the 25th and 75th percentiles, relative to the median."""
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / 2 / statistics.median(values)


def host_us(fn: Callable[[], Any], calls: int, repeats: int = 5) -> float:
    """Median host time per call in microseconds, no synchronisation inside the timed loop."""
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        results.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(results)


def host_us_interleaved(variants: dict[str, Callable[[], Any]], calls: int, rounds: int = 9) -> dict[str, float]:
    """Median host time per call in microseconds for each variant, the variants timed in turn within
    each round (A B C A B C ...), so drift in the host's speed hits all of them alike."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            results[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in results.items()}


def step_and_host_s(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float]:
    """Medians over the same calls (after one warm-up) of (seconds until the work is done, seconds
    until fn returns). Where the second is close to the first, the host's work (checks, launches) is
    what bounds the step, not the device."""
    return step_and_host_interleaved_s({"fn": fn}, device, repeats)["fn"]


def step_and_host_interleaved_s(
    variants: dict[str, Callable[[], Any]], device: torch.device, rounds: int
) -> dict[str, tuple[float, float]]:
    """step_and_host_s for several variants, one call of each in turn per round (A B A B ...), so that
    drift in the host's speed (large on the GPU machine: 2-3x within one process) hits all alike."""
    for fn in variants.values():
        fn()
    sync(device)
    totals: dict[str, list[float]] = {name: [] for name in variants}
    hosts: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            returned = time.perf_counter()
            sync(device)
            totals[name].append(time.perf_counter() - start)
            hosts[name].append(returned - start)
    return {name: (statistics.median(totals[name]), statistics.median(hosts[name])) for name in variants}
