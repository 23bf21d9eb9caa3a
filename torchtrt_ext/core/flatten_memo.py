"""The wrapper's flattening of each call's (args, kwargs), with transformers' cache objects flattened once
per object and reused while nothing the flattening reads from it has changed (issue 15: a decode step
passes the same StaticCache every time, and transformers' generic flattener, which walks the whole
object to build its context, was the largest host cost of a wrapper decode step: 143 us of 22 layers
on the CPU).

transformers registers its cache classes as pytree nodes with one generic flattener
(exporters.exporter_dynamo): the tensors it reaches are the leaves, and everything else it reaches
(lists, dicts, tuples, objects' attribute dicts, scalars) goes into the context. So its result is a
function of the identities of what it walks: each container's items and each object's attributes,
scalars included (a changed int is another object), tensors by identity (written in place, they are
the same leaves). A remembered flattening is reused only when a walk by the same rules finds every one
of those the same object as when it was made; anything else (another object, a changed attribute, a
type the walk does not know, a cycle) flattens anew. Leaves' shapes and dtypes are the signature's to
check, as for any call.
"""

from __future__ import annotations

import operator
import sys
import threading
import types
import weakref
from typing import Any

import torch
import torch.utils._pytree as pytree

_IMMUTABLE = (torch.Tensor, torch.Size, torch.device, torch.dtype, torch.layout, type)
_SCALARS = (bool, int, float, str)
_REMEMBERED = 8  # cache objects remembered at once


class Flattener:
    """pytree.tree_flatten((args, kwargs)), with transformers cache objects' flattenings remembered (the
    last few seen: a decode loop passes one cache). An entry holds what the flattener read, strongly,
    until its cache dies: an attribute that refers back to the cache other than through attributes
    the flattener reads (a functools.partial holding it, say) keeps the cache alive until 8 other
    caches have been flattened."""

    def __init__(self) -> None:
        # id(cache) -> (weakref to the cache, records, leaves, spec), a few at once (threads decoding with
        # their own caches, a call passing two); each entry is replaced whole, under the lock
        self._entries: dict[int, tuple] = {}
        self._lock = threading.Lock()
        self.misses = 0  # cache objects flattened anew (a new object, or one that changed)

    def flatten(self, tree: Any) -> tuple[list[Any], pytree.TreeSpec]:
        generic = _generic_flatten_fn()
        if generic is None:
            return pytree.tree_flatten(tree)

        def remembered(x: Any) -> bool:
            node = pytree.SUPPORTED_NODES.get(type(x))
            return node is not None and node.flatten_fn is generic

        outer, outer_spec = pytree.tree_flatten(tree, is_leaf=remembered)
        found = [i for i, leaf in enumerate(outer) if remembered(leaf)]
        if not found:
            return outer, outer_spec
        flat: list[Any] = []
        subspecs: dict[int, pytree.TreeSpec] = {}
        at = 0
        for i in found:
            leaves, subspecs[i] = self._flatten_cache(outer[i])
            flat += outer[at:i]
            flat += leaves
            at = i + 1
        flat += outer[at:]
        return flat, _graft(outer_spec, subspecs)

    def _flatten_cache(self, cache: Any) -> tuple[list[Any], pytree.TreeSpec]:
        entry = self._entries.get(id(cache))
        if entry is not None and entry[0]() is cache and _unchanged(entry[1], cache):
            return entry[2], entry[3]
        self.misses += 1
        leaves, spec = pytree.tree_flatten(cache)
        records: list[tuple] = []
        if _walk(cache, records, set()) and records:
            records[0] = (None, *records[0][1:])  # the cache itself held weakly: its death frees the entry
            try:
                ref = weakref.ref(cache, self._forget)
            except TypeError:  # an object without weak references: nothing remembered
                return leaves, spec
            with self._lock:
                self._entries.pop(id(cache), None)
                while len(self._entries) >= _REMEMBERED:
                    del self._entries[next(iter(self._entries))]  # the oldest
                self._entries[id(cache)] = (ref, records, leaves, spec)
        return leaves, spec

    def _forget(self, ref: weakref.ref) -> None:
        with self._lock:  # the cache is gone: its entry (and the tensors it holds) with it
            for key, entry in list(self._entries.items()):
                if entry[0] is ref:
                    del self._entries[key]


def _generic_flatten_fn() -> Any:
    """transformers' generic flattener, as registered for its cache classes (DynamicCache's, the same
    function as every other's), where transformers registered them; else None."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    node = pytree.SUPPORTED_NODES.get(getattr(cache_utils, "DynamicCache", None))
    return node.flatten_fn if node is not None else None


def _walk(obj: Any, records: list[tuple], path: set[int]) -> bool:
    """Record what the generic flattener reads from obj, by its rules; False where it cannot be
    remembered (a cycle, a symbolic number, a bound method, a type the flattener refuses)."""
    if obj is None or type(obj) in _SCALARS or isinstance(obj, _IMMUTABLE):
        return True  # its identity is in its container's record
    if isinstance(obj, (torch.SymInt, torch.SymFloat, torch.SymBool, types.MethodType)) or id(obj) in path:
        return False
    if isinstance(obj, dict):
        records.append((obj, type(obj), "map", tuple(obj.keys()), tuple(obj.values())))
        items = tuple(obj.values())
    elif isinstance(obj, (tuple, list, set, frozenset)):
        items = tuple(obj)
        records.append((obj, type(obj), "seq", None, items))
    elif hasattr(obj, "__dict__"):
        state = vars(obj)
        records.append((obj, type(obj), "obj", tuple(state.keys()), tuple(state.values())))
        items = tuple(state.values())
    else:
        return False
    path.add(id(obj))
    try:
        return all(_walk(item, records, path) for item in items)
    finally:
        path.discard(id(obj))


def _unchanged(records: list[tuple], root: Any) -> bool:
    for obj, cls, kind, keys, values in records:
        obj = root if obj is None else obj
        if type(obj) is not cls:  # the class is in the spec (a container's, an object's)
            return False
        if kind == "seq":
            current = tuple(obj)
            if len(current) != len(values) or not all(map(operator.is_, current, values)):
                return False
            continue
        state = obj if kind == "map" else getattr(obj, "__dict__", None)
        if state is None or len(state) != len(values) or tuple(state.keys()) != keys:
            return False
        if not all(map(operator.is_, state.values(), values)):
            return False
    return True


def _graft(spec: pytree.TreeSpec, subspecs: dict[int, pytree.TreeSpec]) -> pytree.TreeSpec:
    """spec with its leaves numbered i in subspecs replaced by those trees."""
    count = 0

    def walk(s: pytree.TreeSpec) -> pytree.TreeSpec:
        nonlocal count
        if s.is_leaf():
            count += 1
            return subspecs.get(count - 1, s)
        children = s.children() if hasattr(s, "children") else s.children_specs  # torch 2.13 / 2.11
        return pytree.TreeSpec(s.type, s.context, [walk(c) for c in children])

    return walk(spec)
