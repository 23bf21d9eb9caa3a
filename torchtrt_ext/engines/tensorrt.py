"""The TensorRT engine kind (through torch_tensorrt): availability probe.

The engine itself arrives in a later issue; this module already decides whether it could run here, so
that ``engine='auto'`` picks correctly and ``engine='tensorrt'`` fails early with the reason.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _import_problem() -> str | None:
    try:
        import torch_tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


def unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot run in this process, or None when it can."""
    problem = _import_problem()
    if problem is not None:
        return f"torch_tensorrt does not import ({problem})"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return "this version of torchtrt_ext does not include the TensorRT engine yet"
