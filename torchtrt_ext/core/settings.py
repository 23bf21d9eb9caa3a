"""Typed, validated settings shared by the ``torch.compile`` backend and the drop-in wrapper.

Unknown names and bad values are errors that name the option and list what is valid: nothing is
silently dropped.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Mapping

import torch

from .calibration import CalibrationCache
from .errors import OptionError

ENGINE_KINDS = ("auto", "builtin", "tensorrt")
FRONTENDS = ("auto", "export", "dynamo")
REFIT_MODES = ("none", "refit", "identical")
PRECISIONS = ("model", "int8", "fp8")
COVERAGE = ("error", "warn")


def _option(
    default: Any,
    doc: str,
    *,
    choices: tuple[str, ...] | None = None,
    minimum: int | None = None,
    wrapper_only: bool = False,
):
    metadata = {"doc": doc, "choices": choices, "minimum": minimum, "wrapper_only": wrapper_only}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Settings:
    engine: str = _option(
        "auto",
        "which engine runs the graph: 'builtin' (PyTorch + Inductor), 'tensorrt' (torch_tensorrt), "
        "or 'auto' (TensorRT when it imports and a CUDA device is present, else builtin)",
        choices=ENGINE_KINDS,
    )
    cuda_graphs: bool = _option(
        False,
        "capture the engine as CUDA graphs (one per stream and input signature) and replay them without "
        "the GIL; for small batches. Weights are read in place, never copied into the graphs",
    )
    refit: str = _option(
        "refit",
        "weight updates without recompiling: 'refit' (any new values of the same names and shapes, by "
        "torchtrt_ext.refit or, in the drop-in wrapper, by changing the model's weights), 'identical' (only "
        "the build-time values: for weight-stripped engines), or 'none' (refused; TensorRT may then fold "
        "the weights into the engine)",
        choices=REFIT_MODES,
    )
    refit_double_buffer: bool = _option(
        False,
        "stage refitted weights in a second device buffer and switch at one point, so calls in flight on "
        "other streams finish with the old weights and none sees a mix; costs one more copy of the weights",
    )
    weight_streaming: bool = _option(
        False,
        "keep only part of the weights on the device (see weight_streaming_budget) and stream the rest from "
        "pinned host memory while the graph runs; the model may stay on the CPU, the inputs give the device. "
        "Static shapes. With cuda_graphs, a whole call (copies included) is one graph. With precision, the "
        "quantized weights and their scales stream, not the float weights they replace",
    )
    weight_streaming_budget: int | str = _option(
        "auto",
        "with weight_streaming: device bytes for resident weights, as bytes, a percentage of the weights "
        "('40%') or 'auto' (what fits in free device memory now, less 1 GiB); changeable at run time with "
        "torchtrt_ext.weight_streaming(model)",
    )
    precision: str = _option(
        "model",
        "the linear layers' arithmetic: 'model' (or None: the model's own dtype), 'int8' or 'fp8' (e4m3): "
        "weights quantized per output channel, activations per tensor with the ranges in `calibration`; "
        "built-in engine. The engine owns the quantized weights; the model's stay as they are. Goes with "
        "weight_streaming, cache_dir and torchtrt_ext.save",
        choices=PRECISIONS,
    )
    calibration: "CalibrationCache | str | None" = _option(
        None,
        "with precision 'int8' or 'fp8': the activation ranges, a CalibrationCache (torchtrt_ext.calibrate) "
        "or the path of a saved one",
    )
    calibration_coverage: str = _option(
        "error",
        "with precision 'int8' or 'fp8', a linear layer the calibration has no range for: 'error' (a "
        "CalibrationError naming them) or 'warn' (a warning naming them; they run at the model's dtype)",
        choices=COVERAGE,
    )
    frontend: str = _option(
        "auto",
        "how the drop-in wrapper captures the graph: 'export' (torch.export), 'dynamo' (torch.compile's "
        "tracer, allows graph breaks) or 'auto' (export, falling back to dynamo when export fails)",
        choices=FRONTENDS,
        wrapper_only=True,
    )
    dynamic_batch: bool = _option(
        True, "drop-in wrapper with torch.export: let dimension 0 of every tensor input vary", wrapper_only=True
    )
    cache_dir: str = _option(
        "",
        "drop-in wrapper: a folder for the engine cache; a process that compiles the same model (same code, "
        "weight shapes, input shapes, settings, device and versions; quantized: the same precision and "
        "calibration cache) reuses the compiled graphs. '' = off",
        wrapper_only=True,
    )
    max_variants: int = _option(
        8,
        "drop-in wrapper: most input signatures compiled before a new one is an error",
        minimum=1,
        wrapper_only=True,
    )

    def __post_init__(self) -> None:
        if isinstance(self.cache_dir, os.PathLike):
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        if self.precision is None:
            object.__setattr__(self, "precision", "model")
        object.__setattr__(self, "calibration", _calibration(self.calibration))
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))
        _check_quantization(self)
        if self.cache_dir:  # the README's "~/.cache/torchtrt_ext" is the user's home, not a folder named "~"
            object.__setattr__(self, "cache_dir", os.path.expanduser(self.cache_dir))
        if not self.weight_streaming and self.weight_streaming_budget != "auto":
            raise OptionError("option 'weight_streaming_budget' applies only with weight_streaming=True")
        object.__setattr__(self, "_budget", Budget.parse(self.weight_streaming_budget))

    @property
    def budget(self) -> "Budget":
        """weight_streaming_budget, parsed (here only)."""
        return self.__dict__["_budget"]

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any] | None = None, *, for_backend: bool = False, **more: Any
    ) -> "Settings":
        """Build settings from an options mapping (``torch.compile(..., options=...)``) and keywords.

        for_backend: the torch.compile backend refuses the options that only the drop-in wrapper uses.
        """
        if options is not None and not isinstance(options, Mapping):
            raise OptionError(
                f"options must be a dict of option name to value, got {type(options).__name__}. "
                f"Valid options: {', '.join(option_names())}"
            )
        merged = dict(options or {})
        for name, value in more.items():
            if name in merged:
                raise OptionError(f"option {name!r} was given twice (in options and as a keyword)")
            merged[name] = value
        for name in merged:
            if not isinstance(name, str) or name not in _FIELDS:
                raise OptionError(_unknown_message(name))
            if for_backend and _FIELDS[name].metadata["wrapper_only"]:
                raise OptionError(
                    f"option {name!r} applies to torchtrt_ext.compile(...) only, not to the "
                    "torch.compile backend (which always captures with dynamo)"
                )
        return cls(**merged)

    def replace(self, **changes: Any) -> "Settings":
        for name in changes:
            if name not in _FIELDS:
                raise OptionError(_unknown_message(name))
        return dataclasses.replace(self, **changes)

    @property
    def quantized(self) -> bool:
        """Whether engines quantize their linear layers (precision 'int8' or 'fp8')."""
        return self.precision != "model"

    def as_dict(self) -> dict[str, Any]:
        """Plain values (JSON data): the calibration as its text, which Settings(calibration=...) reads."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if values["calibration"] is not None:
            values["calibration"] = values["calibration"].dumps()
        return values


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


@dataclasses.dataclass(frozen=True)
class Budget:
    """A weight-streaming budget, parsed once: bytes, a share of the streamable weights, or 'auto'
    (what fits in free device memory, less 1 GiB for activations and the ring)."""

    bytes: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, value: Any) -> "Budget":
        form = "must be bytes (int), a percentage like '40%' or 'auto'"
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise OptionError(f"weight_streaming_budget {form}, got {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise OptionError(f"weight_streaming_budget must not be negative, got {value}")
            return cls(bytes=value)
        text = value.strip()
        if text == "auto":
            return cls()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                percent = -1.0
            if not 0.0 <= percent <= 100.0:
                raise OptionError(f"weight_streaming_budget {value!r} must be a percentage from 0% to 100%")
            return cls(percent=percent)
        raise OptionError(f"weight_streaming_budget {value!r} {form}")

    def resolve(self, total: int, device: torch.device) -> int:
        """Bytes to keep resident, of `total` streamable bytes, on `device`."""
        if self.percent is not None:
            return int(total * self.percent / 100.0)
        if self.bytes is None:
            free, _ = torch.cuda.mem_get_info(device)
            return max(0, min(total, free - (1 << 30)))
        if self.bytes > total:
            raise OptionError(
                f"weight_streaming_budget {self.bytes} is above the {total} bytes of streamable weights; "
                f"use at most {total} (or '100%')"
            )
        return self.bytes


def option_names() -> list[str]:
    return sorted(_FIELDS)


def describe_options() -> str:
    """One line per option: name, type, default and what it does."""
    lines = []
    for f in dataclasses.fields(Settings):
        kind = "|".join(repr(c) for c in f.metadata["choices"]) if f.metadata["choices"] else f.type
        lines.append(f"{f.name} ({kind}, default {f.default!r}): {f.metadata['doc']}")
    return "\n".join(lines)


def _unknown_message(name: Any) -> str:
    close = difflib.get_close_matches(str(name), option_names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown option {name!r}.{hint} Valid options: {', '.join(option_names())}"


def _calibration(value: Any) -> CalibrationCache | None:
    """The calibration option as a cache: a CalibrationCache as is, a path loaded, a cache's text (as
    Settings.as_dict writes it) read. A file that cannot be read is a CalibrationError naming it."""
    if value is None or isinstance(value, CalibrationCache):
        return value
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise OptionError(
            f"option 'calibration' must be a CalibrationCache, the path of a saved one, or None, got "
            f"{type(value).__name__} {value!r}"
        )
    if "\n" in value:
        return CalibrationCache.loads(value, "<the calibration option's text>")
    if not os.path.isfile(os.path.expanduser(value)):
        raise OptionError(f"option 'calibration': no file {value!r}; pass a CalibrationCache or the path of a saved one")
    return CalibrationCache.load(value)


def _check_quantization(s: Settings) -> None:
    """The options that go with precision, checked together."""
    if not s.quantized:
        for name, default in (("calibration", None), ("calibration_coverage", "error")):
            if getattr(s, name) != default:
                raise OptionError(f"option {name!r} applies only with precision 'int8' or 'fp8' (precision is 'model')")
        return
    if s.calibration is None:
        raise OptionError(
            f"precision={s.precision!r} needs calibration=: a CalibrationCache from torchtrt_ext.calibrate(model, "
            "batches), or the path of a saved one"
        )
    if s.engine == "tensorrt":
        raise OptionError(
            f"option 'engine' does not go with precision={s.precision!r}: quantized engines are built-in engines; use "
            "engine='builtin' or 'auto'"
        )


def _check_value(f: dataclasses.Field, value: Any) -> None:
    if f.name == "calibration":
        return  # checked (and loaded) by _calibration
    expected = {"bool": bool, "int": int, "str": str, "int | str": (int, str)}[f.type]
    # bool is a subclass of int: an int option refuses True/False, a bool option refuses 0/1.
    if not isinstance(value, expected) or (expected in (int, (int, str)) and isinstance(value, bool)):
        kind = "an int or a str" if f.type == "int | str" else ("an " if f.type[0] in "aeiou" else "a ") + f.type
        raise OptionError(f"option {f.name!r} must be {kind}, got {type(value).__name__} {value!r}")
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise OptionError(
            f"option {f.name!r} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
        )
    minimum = f.metadata["minimum"]
    if minimum is not None and value < minimum:
        raise OptionError(f"option {f.name!r} must be at least {minimum}, got {value!r}")
