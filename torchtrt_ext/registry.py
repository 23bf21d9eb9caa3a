"""Which engines serve which model: lets ``torchtrt_ext.engines(model)`` find the engines built from a
model's tensors, whichever way it was compiled (backend, graph breaks, wrapper variants)."""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Iterable

import torch

_lock = threading.Lock()
# engine -> ids of the storages of the model tensors it was built from
_engines: "weakref.WeakKeyDictionary[object, frozenset[int]]" = weakref.WeakKeyDictionary()


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def add(engine: object, model_tensors: Iterable[torch.Tensor]) -> None:
    """Record that `engine` serves a model holding these tensors (added to what is known already)."""
    with _lock:
        known = _engines.get(engine, frozenset())
        _engines[engine] = known | frozenset(_storage_id(t) for t in model_tensors if t.numel() > 0)


def engines_of(module: torch.nn.Module) -> list:
    """The live engines built from this module's parameters and buffers, oldest first."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    storages = {_storage_id(t) for t in tensors if t.numel() > 0}
    with _lock:
        return [e for e, used in _engines.items() if used & storages]
