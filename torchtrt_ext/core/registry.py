"""Which engines serve which model, and under which of the model's names.

``engines_of(model)`` finds the engines built from a model's tensors, whichever way it was compiled
(backend, graph breaks, wrapper variants). ``names_in(engine, model)`` names each engine weight by the
model's own state_dict name. An engine built by the backend knows its weights only by names relative
to the frame dynamo captured: after a graph break, a decoder layer's graph names its weights
``self_attn.q_proj.weight``, not ``model.layers.3.self_attn.q_proj.weight``. The tensors themselves
tell which model weight each one is.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref
from typing import Iterable, Mapping

import torch

_lock = threading.Lock()


@dataclasses.dataclass
class _Entry:
    storages: frozenset[int]  # data pointers of the storages of the model tensors the engine was built from
    keys: dict[tuple, int]  # tensor key (see _key) -> engine weight index


_engines: "weakref.WeakKeyDictionary[object, _Entry]" = weakref.WeakKeyDictionary()


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _key(t: torch.Tensor) -> tuple:
    """Two tensors with one key are the same weight: same memory, layout and type."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def add(engine: object, model_tensors: Iterable[torch.Tensor]) -> None:
    """Record that `engine` serves a model holding these tensors, given in the engine's weight index
    order (added to what is known already)."""
    tensors = list(model_tensors)
    with _lock:
        entry = _engines.get(engine)
        if entry is None:
            entry = _engines[engine] = _Entry(frozenset(), {})
        entry.storages = entry.storages | frozenset(_storage_id(t) for t in tensors if t.numel() > 0)
        for index, t in enumerate(tensors):
            if t.numel() > 0:
                entry.keys.setdefault(_key(t), index)


def _model_tensors(module: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    return itertools.chain(
        module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
    )


def engines_of(module: torch.nn.Module) -> list:
    """The live engines built from this module's parameters and buffers, oldest first."""
    storages = {_storage_id(t) for _, t in _model_tensors(module) if t.numel() > 0}
    with _lock:
        return [e for e, entry in _engines.items() if entry.storages & storages]


def names_in(engine: object, module: torch.nn.Module) -> Mapping[str, int]:
    """Each of the module's parameter and buffer names (tied ones under each) that the engine computes
    with -> the engine's weight index, matched by tensor."""
    with _lock:
        entry = _engines.get(engine)
        keys = dict(entry.keys) if entry is not None else {}
    names: dict[str, int] = {}
    for name, t in _model_tensors(module):
        index = keys.get(_key(t))
        if index is not None:
            names[name] = index
    return names
