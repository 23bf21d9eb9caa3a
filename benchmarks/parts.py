"""Benchmarks made of parts, picked by an environment variable (LLM_PARTS, QUANT_PARTS): one runner."""

from __future__ import annotations

import os
from typing import Callable, Mapping

import torch

from .timing import sync

Part = Callable[[torch.device, bool], list]


def run_parts(variable: str, parts: Mapping[str, Part], device: torch.device, quick: bool) -> list[dict]:
    """The parts named in the environment variable (all by default), in that order; after each, the
    device is synchronized and its cached memory freed for the next."""
    chosen = [p.strip() for p in os.environ.get(variable, ",".join(parts)).split(",") if p.strip()]
    unknown = [p for p in chosen if p not in parts]
    if unknown:
        raise ValueError(f"unknown {variable} {unknown}; known: {', '.join(parts)}")
    rows: list[dict] = []
    for part in chosen:
        rows += parts[part](device, quick)
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
