"""torchtrt_ext: inference engines for PyTorch that are safe on any CUDA stream.

Two ways in:
  * ``torch.compile(model, backend="torchtrt_ext", options={...})``
  * ``torchtrt_ext.compile(model, example_inputs=(...), **options)`` -> an ``nn.Module``
"""

from __future__ import annotations

from . import _runtime  # noqa: F401  (fails loudly when the C++ runtime is missing)
from .backend import BACKEND_NAME, register as _register_backend, torchtrt_ext_backend
from .engines import Engine, MemoryUse
from .errors import EngineFileError, EngineUnavailableError, InputError, OptionError, RefitError, TorchTRTExtError, WeightFileError
from .files import inspect as inspect_file, load, save
from .refit import RefitReport, refit
from .streaming import WeightStreaming, weight_streaming
from .registry import engines_of
from .settings import Settings, describe_options, option_names
from .wrapper import CompiledModule, compile

__version__ = "0.1.0"

__all__ = [
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
