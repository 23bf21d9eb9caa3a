"""The engine cache (option ``cache_dir``): compiled graphs kept on disk, keyed by what determines them,
so that a second process compiling the same model skips both torch.export and Inductor's codegen.

An entry is a weight-stripped engine file (engine_file.py) of one input signature: the engine's
compiled code saved whole (Inductor's CompiledArtifact of the lifted graph) with what binds it to a
model (where each weight and input goes, the signature, the output structure, the in-place updates),
the exported graph (read only where a module built from the entry is saved), and Inductor's cache
artifacts (autotuning results); a quantized engine's entry holds its quantization plan too (its quantized
weights are made from the live model's on a hit). The key hashes: torchtrt_ext's version and a digest of its own code, torch's and
TensorRT's versions; the device and its compute capability; the settings (a quantized engine's precision and its
calibration cache's digest among them); the call's structure, dtypes and shapes; and the model: its
module classes, the source of their code, and the names, shapes and dtypes of its parameters and
buffers. On a hit the compiled code is loaded and bound to the live model's own tensors: nothing is
exported, traced or compiled. An entry whose code Inductor could not save whole holds the graph
alone, which a hit compiles again (from Inductor's caches where they help).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import types
from typing import Any, Sequence

import torch

from ..core.settings import Settings
from ..core.signature import layout_of
from ..core.version import __version__
from ..engines.tensorrt import tensorrt_version

log = logging.getLogger("torchtrt_ext")

# What an entry holds and how its key is made (bumped when either changes). 5: quantized engines (the
# entry's quantization plan; the key's precision and calibration digest). 6: the key holds
# torchtrt_ext's own code (package_digest).
ENTRY_FORMAT = 6


@functools.lru_cache(maxsize=None)
def package_digest() -> str:
    """A digest of torchtrt_ext's own Python code and runtime library: the passes, lowering and Inductor
    settings that made an entry's compiled code. Its version alone stays the same across changes that
    alter the code it compiles (a quantized graph's rounding, say), which must miss. Taken once a
    process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for folder, dirs, names in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(names):
            if name.endswith((".py", ".so", ".pyd")):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _skipped(obj: Any) -> bool:
    """Code whose version the key holds already (torch's), or that has no Python code."""
    name = getattr(obj, "__module__", None) or ""
    return name == "builtins" or name.split(".")[0] in ("torch", "torchtrt_ext")


def code_digest(classes: Sequence[type]) -> str:
    """A hash of the Python code that the classes' methods can run: each method's code object (its
    bytecode, constants, nested functions and names), and, followed by name through the functions'
    globals, every Python function and class they use, transitively: a module-level helper that
    forward calls is part of the key, and a change to it is a miss. torch's own code is keyed by its
    version. Never runs the code; reads code objects only."""
    h = hashlib.sha256()
    seen: set[int] = set()
    todo: list[tuple[Any, dict]] = []

    def visit(obj: Any, scope: dict) -> None:
        obj = getattr(obj, "__func__", obj)  # methods: their functions
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, property):
            for part in (obj.fget, obj.fset, obj.fdel):
                if part is not None:
                    visit(part, scope)
            return
        if id(obj) in seen or _skipped(obj):
            return
        if isinstance(obj, types.FunctionType):
            seen.add(id(obj))
            todo.append((obj.__code__, obj.__globals__))
        elif isinstance(obj, type):
            seen.add(id(obj))
            h.update(obj.__qualname__.encode())
            for base in obj.__mro__[1:]:
                visit(base, scope)
            for member in sorted(vars(obj)):
                visit(vars(obj)[member], scope)

    for cls in classes:
        visit(cls, {})
    while todo:
        code, scope = todo.pop()
        h.update(code.co_code)
        h.update(repr(code.co_names).encode())
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                todo.append((const, scope))
            else:
                h.update(repr(const).encode())
        for name in code.co_names:  # globals, and attributes of imported modules, by name
            value = scope.get(name)
            if isinstance(value, types.ModuleType):
                for attribute in code.co_names:
                    member = getattr(value, attribute, None)
                    if member is not None and getattr(member, "__module__", None) == value.__name__:
                        visit(member, scope)
            elif value is not None:
                visit(value, scope)
    return h.hexdigest()


def key(module: torch.nn.Module, spec: Any, flat: Sequence[Any], settings: Settings) -> str:
    h = hashlib.sha256()

    def add(*parts: Any) -> None:
        for p in parts:
            h.update(repr(p).encode())
            h.update(b"\0")

    add("torchtrt_ext", __version__, ENTRY_FORMAT, package_digest(), torch.__version__, tensorrt_version())
    add(sorted((k, v) for k, v in settings.as_dict().items() if k not in ("cache_dir", "max_variants", "calibration")))
    # Quantized engines: the precision and the calibration cache's whole content (another cache, or the
    # same at another precision, is another engine: other activation scales baked into its code)
    add("quantization", settings.precision, settings.calibration.digest() if settings.calibration is not None else None)
    add(str(spec))
    for leaf in flat:
        if isinstance(leaf, torch.Tensor):
            where = leaf.device
            cap = torch.cuda.get_device_capability(where) if where.type == "cuda" else None
            add("tensor", leaf.dtype, tuple(leaf.shape), layout_of(leaf) or "contiguous", where.type, where.index, cap)
        else:
            add("value", leaf)
    classes = {}
    for name, sub in module.named_modules():
        classes.setdefault(type(sub), None)
        add(name, type(sub).__qualname__)
    add(code_digest(list(classes)))
    for name, t in module.state_dict(keep_vars=True).items():
        add(name, t.dtype, tuple(t.shape), t.device.type)
    for name, t in module.named_buffers():
        add(name, t.dtype, tuple(t.shape))
    return h.hexdigest()[:40]


def entry_path(cache_dir: str, digest: str) -> str:
    """Where the entry of `digest` lives (cache_dir is expanded by Settings)."""
    return os.path.join(cache_dir, f"{digest}.ttx")
