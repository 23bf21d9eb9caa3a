"""Engine kinds behind one interface, and the choice between them."""

from __future__ import annotations

import logging
from typing import Sequence

from ..core.errors import EngineUnavailableError, TorchTRTExtError
from ..core.writes import written_inputs
from ..core.lifting import LiftedGraph
from ..core.settings import Settings
from . import tensorrt
from .base import Engine, MemoryUse
from .builtin import BuiltinEngine
from .quantized import SavedQuantization
from .streamed import StreamedEngine

log = logging.getLogger("torchtrt_ext")

__all__ = ["Engine", "MemoryUse", "BuiltinEngine", "StreamedEngine", "auto_choice", "resolve_kind", "build_engine", "needed_writes", "SavedQuantization"]


def auto_choice() -> str:
    """What engine='auto' picks here, and why: the line resolve_kind says once at INFO."""
    reason = tensorrt.unavailable_reason()
    kind = "builtin" if reason is not None else "tensorrt"
    return f"torchtrt_ext: engine='auto' picked {kind!r}" + (f" ({reason})" if reason else "")


def resolve_kind(settings: Settings) -> str:
    """The engine kind to build: settings.engine, with 'auto' resolved. Says at INFO (once) what auto chose."""
    if settings.engine == "builtin" or settings.quantized:  # quantized engines are built-in ones (Settings refuses 'tensorrt')
        return "builtin"
    reason = tensorrt.unavailable_reason()
    if settings.engine == "tensorrt":
        if reason is not None:
            raise EngineUnavailableError(
                f"engine='tensorrt' cannot be used: {reason}. Install torch-tensorrt (with TensorRT) "
                "for this torch and a CUDA device, or use engine='builtin' (or 'auto', which falls back "
                "to the built-in engine)"
            )
        return "tensorrt"
    _say_once(auto_choice())
    return "builtin" if reason is not None else "tensorrt"


_said: set[str] = set()


def needed_writes(lifted: LiftedGraph, settings: Settings) -> list[int]:
    """The inputs the graph writes in place, where an engine built with `settings` needs to know them:
    with cuda_graphs, whose runtime captures a written input at its own address (one graph per address)
    instead of on a copy that would take the writes. Nothing else in an engine reads them, so without
    cuda_graphs the analysis (for a dynamo graph, a run on fake tensors) is skipped: [] there."""
    return written_inputs(lifted) if settings.cuda_graphs else []


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.info(message)


def build_engine(
    lifted: LiftedGraph,
    settings: Settings,
    artifact: bytes | None = None,
    keep_artifact: bool = False,
    like: Engine | None = None,
    writes: Sequence[int] | None = None,
    saved: SavedQuantization | None = None,
) -> Engine:
    """artifact / keep_artifact: see BuiltinEngine (the engine cache's compiled code, saved whole).
    like: an engine of the same graph; the new one computes with lifted's weights, sharing the compiled
    code where the engine kind can (a resident built-in engine), else compiled anew. writes: the inputs
    the compiled code writes in place, as the caller knows them (the wrapper finds them itself: it
    copies written values back); None: found here from the graph where the engine needs them, else none.
    saved: a quantized engine's plan and quantized weights from an engine file (resident engines only:
    files hold no weight-streaming engine)."""
    kind = resolve_kind(settings)
    if writes is None:
        writes = needed_writes(lifted, settings)
    if kind == "builtin" and settings.weight_streaming:
        if artifact is not None or keep_artifact or saved is not None:
            raise TorchTRTExtError("weight-streaming engines are compiled per segment; they have no compiled artifact or saved plan")
        return StreamedEngine(lifted, settings, writes=writes)  # owns its weights' copies: nothing to share with `like`
    if kind == "builtin":
        return BuiltinEngine(
            lifted, settings, artifact, keep_artifact, compiled_from=like if isinstance(like, BuiltinEngine) else None, writes=writes,
            saved=saved,
        )
    raise EngineUnavailableError(f"engine kind {kind!r} is not available")  # pragma: no cover
