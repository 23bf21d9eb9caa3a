"""Which calls an exported graph accepts: input structure, dtypes, devices, static and dynamic sizes.

The drop-in wrapper checks every call against the signatures it has compiled; a call that fits none
gets a new compiled variant rather than a wrong answer or an assertion deep inside generated code.
A signature is plain data (no fake tensors): it is written into engine cache entries as JSON.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import sympy
import torch
import torch.utils._pytree as pytree

_VALUE_TYPES = (bool, int, float, str, type(None))  # non-tensor inputs a signature can write down


class _TensorLeaf(NamedTuple):
    dtype: torch.dtype
    device: torch.device
    shape: tuple[Any, ...]  # per dimension an int, or a sympy expression over the dynamic sizes


def _leaf(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    shape = []
    for size in value.shape:
        expr = size.node.expr if isinstance(size, torch.SymInt) else size
        shape.append(int(expr) if isinstance(expr, (int, sympy.Integer)) else expr)
    return _TensorLeaf(value.dtype, value.device, tuple(shape))


class InputSignature:
    def __init__(self, in_spec: pytree.TreeSpec, leaves: Sequence[Any], range_constraints: dict[Any, Any]):
        """leaves: meta["val"] of each user-input placeholder (fake tensors, symbolic sizes, values)."""
        self.in_spec = in_spec
        self._leaves = [_leaf(v) for v in leaves]
        # symbol -> (lowest, highest or None when unbounded)
        self._ranges = {sym: (int(r.lower), _finite(r.upper)) for sym, r in range_constraints.items()}

    def to_json(self) -> dict:
        """The signature as JSON data; raises TypeError where an input cannot be written down."""
        leaves = []
        for leaf in self._leaves:
            if isinstance(leaf, _TensorLeaf):
                dims = [d if isinstance(d, int) else str(d) for d in leaf.shape]
                leaves.append({"dtype": str(leaf.dtype).removeprefix("torch."), "device": str(leaf.device), "shape": dims})
            elif type(leaf) in _VALUE_TYPES:
                leaves.append({"value": leaf})
            else:
                raise TypeError(f"an input of type {type(leaf).__name__} has no JSON form")
        return {
            "in_spec": pytree.treespec_dumps(self.in_spec),
            "leaves": leaves,
            "ranges": [[str(sym), low, high] for sym, (low, high) in self._ranges.items()],
        }

    @classmethod
    def from_json(cls, data: dict) -> "InputSignature":
        """The inverse of to_json; raises (KeyError, ValueError, ...) on malformed data."""
        symbols = {name: sympy.Symbol(name, integer=True, positive=True) for name, _, _ in data["ranges"]}

        def dim(d: Any) -> Any:
            if isinstance(d, int):
                return d
            expr = sympy.sympify(d, locals=symbols)
            if not isinstance(expr, sympy.Expr) or not expr.free_symbols <= set(symbols.values()):
                raise ValueError(f"bad size expression {d!r}")
            return expr

        self = cls.__new__(cls)
        self.in_spec = pytree.treespec_loads(data["in_spec"])
        self._leaves = [
            _TensorLeaf(getattr(torch, leaf["dtype"]), torch.device(leaf["device"]), tuple(dim(d) for d in leaf["shape"]))
            if "dtype" in leaf
            else leaf["value"]
            for leaf in data["leaves"]
        ]
        self._ranges = {symbols[name]: (int(low), None if high is None else int(high)) for name, low, high in data["ranges"]}
        if not all(isinstance(leaf.dtype, torch.dtype) for leaf in self._leaves if isinstance(leaf, _TensorLeaf)):
            raise ValueError("unknown dtype in a signature")
        return self

    def placeholders(self) -> list[Any]:
        """A stand-in call: an empty tensor of each tensor input's dtype on its device (the device is
        what an engine built without a call needs to know), the value of each other input."""
        return [
            torch.empty(0, dtype=leaf.dtype, device=leaf.device) if isinstance(leaf, _TensorLeaf) else leaf
            for leaf in self._leaves
        ]

    def mismatch(self, spec: pytree.TreeSpec, flat: Sequence[Any]) -> str | None:
        """None when a call with these flattened inputs fits; else what does not fit."""
        if spec != self.in_spec:
            return "the structure of the arguments differs"
        bindings: dict[sympy.Symbol, int] = {}
        deferred: list[tuple[int, int, Any, int]] = []
        for i, (expected, actual) in enumerate(zip(self._leaves, flat)):
            if isinstance(expected, _TensorLeaf):
                problem = self._tensor_mismatch(i, expected, actual, bindings, deferred)
                if problem:
                    return problem
            elif type(actual) is not type(expected) or actual != expected:
                return f"input {i} is {actual!r}, compiled for {expected!r}"
        for i, d, expr, size in deferred:
            value = expr.xreplace(bindings)
            if not value.is_number or int(value) != size:
                return f"input {i} dimension {d} is {size}, compiled for {expr}"
        return None

    def _tensor_mismatch(self, i, expected: _TensorLeaf, actual, bindings, deferred) -> str | None:
        if not isinstance(actual, torch.Tensor):
            return f"input {i} is a {type(actual).__name__}, compiled for a tensor"
        if actual.dtype != expected.dtype:
            return f"input {i} has dtype {actual.dtype}, compiled for {expected.dtype}"
        if actual.device != expected.device:
            return f"input {i} is on {actual.device}, compiled for {expected.device}"
        if actual.dim() != len(expected.shape):
            return f"input {i} has {actual.dim()} dimensions, compiled for {len(expected.shape)}"
        for d, (size, want) in enumerate(zip(actual.shape, expected.shape)):
            if isinstance(want, int):
                if size != want:
                    return f"input {i} dimension {d} is {size}, compiled for {want}"
                continue
            if isinstance(want, sympy.Symbol):
                if want in bindings and bindings[want] != size:
                    return f"input {i} dimension {d} is {size}, but must equal {bindings[want]}"
                bindings[want] = size
                low, high = self._ranges.get(want, (0, None))
                if size < low or (high is not None and size > high):
                    return f"input {i} dimension {d} is {size}, compiled for sizes {low}..{high or 'any'}"
            else:
                deferred.append((i, d, want, size))
        return None


def _finite(bound: Any) -> int | None:
    try:
        return int(bound)
    except (TypeError, ValueError, AttributeError, OverflowError):  # sympy / torch infinities
        return None
