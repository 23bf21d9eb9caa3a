"""``torchtrt_ext.load``: a compiled module from an engine file (read and checked by
operations.files), with the loaded graphs as its variants."""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import torch

from ..core.settings import Settings
from ..operations import files
from .wrapper import CompiledModule

log = logging.getLogger("torchtrt_ext")


def load(path: str, device: str | torch.device | None = None) -> Any:
    """Load a file written by ``torchtrt_ext.save`` as a compiled module, on `device` (default: the
    device it was saved from; the device type must be the same). Every check is made before anything
    is returned; a failing file raises EngineFileError and leaves nothing behind."""
    start = time.perf_counter()
    contents = files.read(str(path), device)
    header, n = contents.header, len(contents.header.programs)
    log.info(
        "torchtrt_ext: %s read in %.1f s; %d graph(s), %d with compiled code%s",
        path,
        time.perf_counter() - start,
        n,
        sum(contents.artifact(i) is not None for i in range(n)),
        " (the rest compile from Inductor's cached artifacts)" if header.inductor_cache else "",
    )
    contents.load_inductor_cache()
    module = contents.program(0).module()  # the model's structure, holding the file's tensors
    for part in module.modules():  # the engines compute eval mode (an exported module refuses .eval())
        part.training = False
    compiled = CompiledModule(module, Settings(**header.settings))
    signature = _signature(header.forward_parameters, compiled.forward_signature)
    compiled.add_loaded(contents, signature, header.weights_included)
    log.info(
        "torchtrt_ext: loaded %s in %.1f s%s",
        path,
        time.perf_counter() - start,
        "" if header.weights_included else " (weights stripped: refit it)",
    )
    return compiled


def _signature(saved: Any, fallback: inspect.Signature) -> inspect.Signature:
    if not isinstance(saved, list):
        return fallback
    try:
        return inspect.Signature(
            [
                inspect.Parameter(
                    name, getattr(inspect.Parameter, kind), default=None if has_default else inspect.Parameter.empty
                )
                for name, kind, has_default in saved
            ]
        )
    except (TypeError, ValueError, AttributeError):
        return fallback
