"""The TensorRT engine kind (through torch_tensorrt): availability probe.

The engine itself arrives in a later issue; this module already decides whether it could run here, so
that ``engine='auto'`` picks correctly and ``engine='tensorrt'`` fails early with the reason.
"""

from __future__ import annotations

import functools

import torch

from ..core.errors import OptionError


@functools.cache
def _import_problem() -> str | None:
    try:
        import torch_tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.cache
def tensorrt_version() -> str | None:
    """The TensorRT version in this process, or None where TensorRT does not import (files and the
    engine cache record it: engines built with one version are not reused with another)."""
    try:
        import tensorrt

        return tensorrt.__version__
    except Exception:
        return None


def unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot run in this process, or None when it can."""
    problem = _import_problem()
    if problem is not None:
        return f"torch_tensorrt does not import ({problem})"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return "this version of torchtrt_ext does not include the TensorRT engine yet"


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def compile_settings(settings, tensorrt_version: str) -> dict:
    """Our settings as ``torch_tensorrt.dynamo.compile`` keywords (names read from torch_tensorrt 2.11's
    ``_settings.py``): refit='none' -> immutable_weights (no REFIT flag), 'refit' -> BuilderFlag.REFIT,
    'identical' -> BuilderFlag.REFIT_IDENTICAL; weight_streaming -> enable_weight_streaming (the budget
    is applied at run time, through the engine's weight_streaming_budget_v2).

    TensorRT before 10.8 crashed ("misaligned address") running an engine built with REFIT while it
    streamed weights; REFIT_IDENTICAL worked. That combination is refused here, before any build."""
    if settings.weight_streaming and settings.refit == "refit" and _version(tensorrt_version) < (10, 8):
        raise OptionError(
            f"TensorRT {tensorrt_version} crashes ('misaligned address') when an engine built with REFIT "
            "streams its weights (fixed in 10.8): use refit='identical' (REFIT_IDENTICAL works with weight "
            "streaming), refit='none', or TensorRT >= 10.8"
        )
    if settings.weight_streaming and settings.cuda_graphs:
        raise OptionError(
            "the TensorRT engine does not capture weight streaming in CUDA graphs (TensorRT streams the weights "
            "itself, and torchtrt_ext has not been tested capturing that): use engine='builtin', or drop one of "
            "cuda_graphs and weight_streaming"
        )
    return {
        "immutable_weights": settings.refit == "none",
        "refit_identical_engine_weights": settings.refit == "identical",
        "enable_weight_streaming": settings.weight_streaming,
    }
