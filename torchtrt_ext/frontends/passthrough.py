"""Outputs that are the caller's own input objects: a KV cache passed in, written in place by the
engine, and returned (as the model returns the very cache object it was given).

Rebuilding such an object from its leaves at every call costs more than the call (transformers' generic
unflatten of a 22-layer StaticCache: about 300 us on the host), and gives a new object each time where
eager returns the caller's. Which input objects the forward returns as themselves is seen while it is
traced (capture.returned_inputs); a Passthrough, found at one call for such an object (the one output
subtree whose leaves are the very tensors of the input's, structure and context the same), returns
the input object at later calls, for as long as the leaves stay the same tensors; anything else is
rebuilt as before.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Collection, Iterator, Sequence

import torch.utils._pytree as pytree

_CONTAINERS = (tuple, list, dict)  # structures, not objects a model hands back: always rebuilt


@dataclasses.dataclass(frozen=True)
class Passthrough:
    inputs: tuple[int, int]  # the input subtree's leaves: flat[start:end]
    outputs: tuple[int, int]  # the output subtree's leaves
    where: tuple[Any, ...]  # the input object's place in (args, kwargs): (0, index) or (1, name)
    spec: pytree.TreeSpec  # the output structure with that subtree as one leaf

    def build(self, flat: Sequence[Any], tree: tuple[tuple, dict], outputs: Sequence[Any]) -> Any | None:
        """The outputs with the input object in place of its subtree; None where a leaf differs."""
        a, b = self.inputs
        c, d = self.outputs
        if not all(map(operator.is_, outputs[c:d], flat[a:b])):
            return None
        obj = tree[self.where[0]][self.where[1]]
        return pytree.tree_unflatten([*outputs[:c], obj, *outputs[d:]], self.spec)


def _children(spec: pytree.TreeSpec) -> list[pytree.TreeSpec]:
    """A spec's child specs (children() from torch 2.13, where children_specs is deprecated)."""
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)


_LEAF = getattr(pytree, "treespec_leaf", None) or pytree.LeafSpec


def find(
    in_spec: pytree.TreeSpec, flat: Sequence[Any], out_spec: pytree.TreeSpec, outputs: Sequence[Any], returned: Collection[tuple]
) -> Passthrough | None:
    """An input argument (positional or keyword) that the traced forward returned as itself (returned:
    (0, position, output) or (1, name, output), output the index of its first leaf among the outputs),
    whose subtree comes back there, leaf for leaf the same tensors, structure and context the same."""
    offsets = {(side, key): output for side, key, output in returned}
    if in_spec.type is not tuple or in_spec.num_children != 2:
        return None
    args_spec, kwargs_spec = _children(in_spec)
    keys = kwargs_spec.context if kwargs_spec.type is dict else None
    offset = 0
    for side, spec, names in ((0, args_spec, None), (1, kwargs_spec, keys)):
        for i, child in enumerate(_children(spec)):
            start, offset = offset, offset + child.num_leaves
            where = (side, i if names is None else names[i])
            if child.is_leaf() or child.type in _CONTAINERS or child.num_leaves == 0 or where not in offsets:
                continue
            for out_start, out_child, path in _subtrees(out_spec, 0, ()):
                if out_start == offsets[where] and out_child == child:
                    if all(map(operator.is_, outputs[out_start : out_start + child.num_leaves], flat[start:offset])):
                        return Passthrough((start, offset), (out_start, out_start + child.num_leaves), where, _replace(out_spec, path))
    return None


def _subtrees(spec: pytree.TreeSpec, start: int, path: tuple[int, ...]) -> Iterator[tuple[int, pytree.TreeSpec, tuple[int, ...]]]:
    """Every non-leaf subtree: its first leaf's index, its spec, and the child indices leading to it."""
    if spec.is_leaf():
        return
    yield start, spec, path
    for i, child in enumerate(_children(spec)):
        yield from _subtrees(child, start, (*path, i))
        start += child.num_leaves


def _replace(spec: pytree.TreeSpec, path: tuple[int, ...]) -> pytree.TreeSpec:
    """spec with the subtree at `path` made one leaf."""
    if not path:
        return _LEAF()
    children = list(_children(spec))
    children[path[0]] = _replace(children[path[0]], path[1:])
    return pytree.TreeSpec(spec.type, spec.context, children)
