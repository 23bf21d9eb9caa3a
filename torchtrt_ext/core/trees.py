"""The tree types models pass through forward, beyond tensors, lists and dicts: transformers' cache
objects (DynamicCache, EncoderDecoderCache, StaticCache, ...). Registered as pytree nodes through
transformers' own export helper, torch.export flattens them into tensors and the engines' outputs are
rebuilt as the same objects. Tree specs read back from engine files and cache entries name such types;
they are checked here before use, since rebuilding one imports the classes its context names."""

from __future__ import annotations

import importlib
import re
import sys
from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import EngineFileError

# The tags of transformers' JSON contexts (exporters.exporter_dynamo) and the one package whose classes
# a context may name: a file naming any other module is refused before anything is imported.
_CONTEXT_TAGS = {"tensor", "size", "device", "dtype", "layout", "sym", "items", "type", "map", "seq", "obj"}
_TRUSTED_PREFIX = "transformers."
_EXPORTER = "transformers.exporters.exporter_dynamo"
_MODULE = re.compile(r"transformers(\.[A-Za-z_][A-Za-z0-9_]*)*")
_NAMED_MODULE = re.compile(r"(transformers(?:\.[A-Za-z_][A-Za-z0-9_]*)*):[A-Za-z_]")
_QUALNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_registered_models: set[type] = set()


def _exporter() -> Any:
    """transformers' export helper module, or None where transformers is not loaded or has none."""
    if "transformers" not in sys.modules:  # a model from transformers has imported it already
        return None
    try:
        from transformers.exporters import exporter_dynamo
    except ImportError:  # an older transformers: its caches stay opaque, and the wrapper falls back to dynamo
        return None
    return exporter_dynamo


def register_model_types(model: torch.nn.Module) -> None:
    """Registers the cache classes a transformers model (or one inside `model`) may take or return."""
    exporter = _exporter()
    if exporter is None:
        return
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and type(module) not in _registered_models:
            exporter.register_cache_pytrees_for_model(module)
            _registered_models.add(type(module))


def _register_cache_classes() -> None:
    exporter = _exporter()
    if exporter is None:
        try:
            import transformers  # noqa: F401  (a spec that names transformers types needs them registered)
        except ImportError:
            return
        exporter = _exporter()
        if exporter is None:
            return
    from transformers.cache_utils import Cache

    pending = [Cache]
    while pending:
        cls = pending.pop()
        exporter.register_pytree_node(cls)
        pending.extend(cls.__subclasses__())


def prepare(data: str | bytes) -> None:
    """Before reading tree specs from `data` (a file's JSON or a saved program): where it mentions
    transformers, its cache classes are registered, so that the specs naming them can be read; the
    transformers modules it names are imported first (transformers imports its models lazily, and a
    model's own cache class is registered only once its module is loaded)."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    if _TRUSTED_PREFIX not in text:
        return
    named = sorted(m for m in set(_NAMED_MODULE.findall(text)) if _MODULE.fullmatch(m))
    for module_name in named:
        try:
            importlib.import_module(module_name)
        except ImportError:
            pass  # reading the spec then says which type it lacks
    _register_cache_classes()
    exporter = _exporter()
    if exporter is not None and hasattr(exporter, "is_cache_class"):  # cache classes outside Cache's tree
        for module_name in named:
            module = sys.modules.get(module_name)
            for value in vars(module).values() if module is not None else ():
                if isinstance(value, type) and value.__module__ == module_name and exporter.is_cache_class(value):
                    exporter.register_pytree_node(value)


def loads(text: str, what: str) -> pytree.TreeSpec:
    """A tree spec from pytree's JSON (treespec_dumps), as read from a file or cache entry, checked
    (see check). Anything wrong raises EngineFileError naming `what`."""
    prepare(text)
    try:
        spec = pytree.treespec_loads(text)
    except Exception as exc:  # pytree's own JSON reader: no code runs, but any error may come out
        raise EngineFileError(f"{what} {_short(text)} is not a tree spec ({str(exc)[:200]})") from None
    check(spec, what)
    return spec


def check(spec: pytree.TreeSpec, what: str) -> None:
    """Every class that rebuilding a transformers node of `spec` would import and call is a class
    defined in transformers (its contexts name classes by path); else EngineFileError."""
    stack = [spec]
    while stack:
        node = stack.pop()
        registered = pytree.SUPPORTED_NODES.get(node.type) if node.type is not None else None
        # Every node rebuilt by transformers' unflatten (whatever module its class is in: a model's own
        # cache class is registered too), which imports and calls the classes its context names.
        if registered is not None and getattr(registered.unflatten_fn, "__module__", "") == _EXPORTER:
            _check_context(node.context, what)
        stack.extend(node.children() if hasattr(node, "children") else node.children_specs)


def _check_context(context: Any, what: str) -> None:
    stack = [context]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            tag = item.get("_t")
            if tag is not None and tag not in _CONTEXT_TAGS:
                raise EngineFileError(f"{what} has an unknown context tag {tag!r}")
            if tag in ("type", "map", "seq", "obj"):
                _check_class(item.get("p"), tag, what)
            elif tag in ("dtype", "layout") and not isinstance(getattr(torch, str(item.get("n")), None), (torch.dtype, torch.layout)):
                raise EngineFileError(f"{what} names {_short(str(item.get('n')))} as a torch {tag}, which it is not")
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _check_class(path: Any, tag: str, what: str) -> None:
    """A class path `module:qualname` that transformers' rebuild would import and call: it must name a
    class defined in transformers under exactly that name (not a function or another module's object
    reached through it), and a sequence or mapping class where the rebuild calls it with items."""
    module_name, _, qualname = path.partition(":") if isinstance(path, str) else ("", "", "")
    found: Any = None
    if _MODULE.fullmatch(module_name) and _QUALNAME.fullmatch(qualname):
        try:
            found = importlib.import_module(module_name)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            found = None
    fits = isinstance(found, type) and found.__module__ == module_name and found.__qualname__ == qualname
    if fits and tag == "seq":
        fits = issubclass(found, (tuple, list, set, frozenset))
    elif fits and tag == "map":
        fits = issubclass(found, dict)
    if not fits:
        raise EngineFileError(
            f"{what} names {_short(str(path))} as a class to rebuild; only classes defined in transformers are "
            "rebuilt from a file"
        )


def _short(text: str, most: int = 80) -> str:
    return repr(text if len(text) <= most else text[:most] + "...")
