"""The engine cache (option ``cache_dir``): compiled graphs kept on disk, keyed by what determines them,
so that a second process compiling the same model skips both torch.export and Inductor's codegen.

An entry is a weight-stripped engine file (engine_file.py) of one input signature: the engine's
compiled code saved whole (Inductor's CompiledArtifact of the lifted graph) with what binds it to a
model (where each weight and input goes, the signature, the output structure, the in-place updates),
the exported graph (read only where a module built from the entry is saved), and Inductor's cache
artifacts (autotuning results). The key hashes: torchtrt_ext, torch and TensorRT versions; the device
and its compute capability; the settings; the call's structure, dtypes and shapes; and the model: its
module classes, the source of their code, and the names, shapes and dtypes of its parameters and
buffers. On a hit the compiled code is loaded and bound to the live model's own tensors: nothing is
exported, traced or compiled. An entry whose code Inductor could not save whole holds the graph
alone, which a hit compiles again (from Inductor's caches where they help).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from typing import Any, Sequence

import torch

from .engines.tensorrt import tensorrt_version
from .settings import Settings

log = logging.getLogger("torchtrt_ext")

# What an entry holds. 2: graphs exported under no_grad, autotuning results included; 3: the compiled code
# saved whole, with its binding.
ENTRY_FORMAT = 3


def _source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):  # built in or defined interactively: its name and its methods' bytecode
        parts = [cls.__qualname__]
        for member in sorted(vars(cls)):
            code = getattr(getattr(cls, member, None), "__code__", None)
            parts.append(code.co_code.hex() if code is not None else member)
        return "".join(parts)


def key(module: torch.nn.Module, spec: Any, flat: Sequence[Any], settings: Settings) -> str:
    from . import __version__

    h = hashlib.sha256()

    def add(*parts: Any) -> None:
        for p in parts:
            h.update(repr(p).encode())
            h.update(b"\0")

    add("torchtrt_ext", __version__, ENTRY_FORMAT, torch.__version__, tensorrt_version())
    add(sorted((k, v) for k, v in settings.as_dict().items() if k not in ("cache_dir", "max_variants")))
    add(str(spec))
    for leaf in flat:
        if isinstance(leaf, torch.Tensor):
            where = leaf.device
            cap = torch.cuda.get_device_capability(where) if where.type == "cuda" else None
            add("tensor", leaf.dtype, tuple(leaf.shape), where.type, where.index, cap)
        else:
            add("value", leaf)
    classes = {}
    for name, sub in module.named_modules():
        classes.setdefault(type(sub), None)
        add(name, type(sub).__qualname__)
    for cls in classes:
        add(_source(cls))
    for name, t in module.state_dict(keep_vars=True).items():
        add(name, t.dtype, tuple(t.shape), t.device.type)
    for name, t in module.named_buffers():
        add(name, t.dtype, tuple(t.shape))
    return h.hexdigest()[:40]


def entry_path(cache_dir: str, digest: str) -> str:
    return os.path.join(cache_dir, f"{digest}.ttx")
