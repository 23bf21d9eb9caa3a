"""``torchtrt_ext.weight_streaming(model)``: the streaming engines of a compiled model, with their
device budget readable and settable at run time (no recompile)."""

from __future__ import annotations

from typing import Any

import torch

from ..core import registry
from ..core.errors import TorchTRTExtError
from ..core.settings import Budget
from ..engines.streamed import StreamedEngine
from .program import CompiledProgram


class WeightStreaming:
    """``ws = torchtrt_ext.weight_streaming(model); ws.device_budget = "40%"``."""

    def __init__(self, engines: list[StreamedEngine]):
        if not engines:
            raise TorchTRTExtError(
                "this model has no weight-streaming engines: compile it with weight_streaming=True and call it once"
            )
        self._engines = engines

    @property
    def total_bytes(self) -> int:
        return sum(e.total_bytes for e in self._engines)

    @property
    def device_budget(self) -> int:
        return sum(e.placement.budget for e in self._engines)

    @device_budget.setter
    def device_budget(self, budget: int | str) -> None:
        total = self.total_bytes
        wanted = Budget.parse(budget).resolve(total, self._engines[0].device)
        for e in self._engines:  # shared in proportion to each engine's weights
            e.place(wanted * e.total_bytes // total if total else 0)

    @property
    def resident_bytes(self) -> int:
        return sum(e.placement.resident_bytes for e in self._engines)

    @property
    def ring_bytes(self) -> int:
        """Device bytes of one execution slot's ring buffers, over all the engines."""
        return sum(e.ring_bytes for e in self._engines)


def weight_streaming(compiled: Any) -> WeightStreaming:
    """The weight-streaming control of what torchtrt_ext.compile returned, or of a model compiled with
    backend='torchtrt_ext' (or that module's OptimizedModule)."""
    if isinstance(compiled, CompiledProgram):
        engines = compiled.engines
    elif isinstance(compiled, torch.nn.Module):
        engines = registry.engines_of(getattr(compiled, "_orig_mod", compiled))
    else:
        raise TypeError(f"weight_streaming takes a compiled model, got {type(compiled).__name__}")
    return WeightStreaming([e for e in engines if isinstance(e, StreamedEngine)])
