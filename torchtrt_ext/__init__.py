"""torchtrt_ext: inference engines for PyTorch that are safe on any CUDA stream.

Two ways in:
  * ``torch.compile(model, backend="torchtrt_ext", options={...})``
  * ``torchtrt_ext.compile(model, example_inputs=(...), **options)`` -> an ``nn.Module``

Layers, each importing only from those below it (checked by import-linter, pyproject.toml):
  cli -> demo -> frontends (backend, wrapper, load) -> operations (refit, weight-streaming control,
  files, engine cache) -> engines (built-in, streamed, TensorRT) -> core (settings, lifting,
  signatures, weight sources, the runtime binding, errors).
"""

from __future__ import annotations

from .core import runtime as _runtime  # noqa: F401  (fails loudly when the C++ runtime is missing)
from .core.calibration import CalibrationCache
from .core.errors import (
    CalibrationError,
    EngineFileError,
    EngineUnavailableError,
    InputError,
    OptionError,
    RefitError,
    TorchTRTExtError,
    WeightFileError,
)
from .core.registry import engines_of
from .core.settings import Settings, describe_options, option_names
from .core.version import __version__
from .engines import Engine, MemoryUse
from .frontends.backend import BACKEND_NAME, register as _register_backend, torchtrt_ext_backend
from .frontends.loading import load
from .frontends.wrapper import CompiledModule, compile
from .operations.calibrate import calibrate
from .operations.files import inspect as inspect_file, save
from .operations.refit import RefitReport, refit
from .operations.weight_streaming import WeightStreaming, weight_streaming

__all__ = [
    "calibrate",
    "CalibrationCache",
    "CalibrationError",
    "BACKEND_NAME",
    "CompiledModule",
    "Engine",
    "EngineFileError",
    "EngineUnavailableError",
    "InputError",
    "MemoryUse",
    "OptionError",
    "RefitError",
    "RefitReport",
    "Settings",
    "TorchTRTExtError",
    "WeightFileError",
    "__version__",
    "compile",
    "describe_options",
    "engines_of",
    "inspect_file",
    "load",
    "option_names",
    "refit",
    "save",
    "torchtrt_ext_backend",
    "weight_streaming",
    "WeightStreaming",
]

_register_backend()
