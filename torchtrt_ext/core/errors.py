"""The exceptions torchtrt_ext raises. Each message names the fault and, where there is one, the fix."""

from __future__ import annotations


class TorchTRTExtError(Exception):
    """Base class of every error raised by torchtrt_ext."""


class OptionError(TorchTRTExtError, ValueError):
    """An option passed to the backend or to ``torchtrt_ext.compile`` is unknown or has a bad value."""


class EngineUnavailableError(TorchTRTExtError, RuntimeError):
    """The requested engine kind cannot run in this process (missing package, no CUDA device)."""


class InputError(TorchTRTExtError, ValueError):
    """A call passed inputs the engine cannot take (wrong device, mixed devices, wrong structure)."""


class RefitError(TorchTRTExtError, ValueError):
    """New weights were refused; the engines are unchanged. ``failures`` maps each failing name to why."""

    def __init__(self, message: str, failures: dict[str, str] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})


class WeightFileError(TorchTRTExtError, ValueError):
    """A weights file is missing, truncated, corrupt or of an unknown format; nothing was loaded from it."""


class EngineFileError(TorchTRTExtError, ValueError):
    """An engine file is missing, truncated, corrupt, of another format version or for another device;
    nothing was loaded from it."""


class CalibrationError(TorchTRTExtError, ValueError):
    """A calibration cache is malformed, of another schema version or model, has a non-finite or
    non-positive amax, or misses a tensor the engine quantizes; the message names which."""
