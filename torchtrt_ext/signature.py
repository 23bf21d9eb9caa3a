"""Which calls an exported graph accepts: input structure, dtypes, devices, static and dynamic sizes.

The drop-in wrapper checks every call against the signatures it has compiled; a call that fits none
gets a new compiled variant rather than a wrong answer or an assertion deep inside generated code.
"""

from __future__ import annotations

from typing import Any, Sequence

import sympy
import torch
import torch.utils._pytree as pytree


class InputSignature:
    def __init__(self, in_spec: pytree.TreeSpec, leaves: Sequence[Any], range_constraints: dict[Any, Any]):
        self.in_spec = in_spec
        self._leaves = list(leaves)  # meta["val"] of each user-input placeholder
        # symbol -> (lowest, highest or None when unbounded)
        self._ranges = {sym: (int(r.lower), _finite(r.upper)) for sym, r in range_constraints.items()}

    def mismatch(self, spec: pytree.TreeSpec, flat: Sequence[Any]) -> str | None:
        """None when a call with these flattened inputs fits; else what does not fit."""
        if spec != self.in_spec:
            return "the structure of the arguments differs"
        bindings: dict[sympy.Symbol, int] = {}
        deferred: list[tuple[int, int, Any, int]] = []
        for i, (expected, actual) in enumerate(zip(self._leaves, flat)):
            if isinstance(expected, torch.Tensor):
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

    def _tensor_mismatch(self, i, expected, actual, bindings, deferred) -> str | None:
        if not isinstance(actual, torch.Tensor):
            return f"input {i} is a {type(actual).__name__}, compiled for a tensor"
        if actual.dtype != expected.dtype:
            return f"input {i} has dtype {actual.dtype}, compiled for {expected.dtype}"
        if actual.device != expected.device:
            return f"input {i} is on {actual.device}, compiled for {expected.device}"
        if actual.dim() != expected.dim():
            return f"input {i} has {actual.dim()} dimensions, compiled for {expected.dim()}"
        for d, (size, want) in enumerate(zip(actual.shape, expected.shape)):
            if isinstance(want, int):
                if size != want:
                    return f"input {i} dimension {d} is {size}, compiled for {want}"
                continue
            expr = want.node.expr
            if isinstance(expr, sympy.Symbol):
                if expr in bindings and bindings[expr] != size:
                    return f"input {i} dimension {d} is {size}, but must equal {bindings[expr]}"
                bindings[expr] = size
                low, high = self._ranges.get(expr, (0, None))
                if size < low or (high is not None and size > high):
                    return f"input {i} dimension {d} is {size}, compiled for sizes {low}..{high or 'any'}"
            else:
                deferred.append((i, d, expr, size))
        return None


def _finite(bound: Any) -> int | None:
    try:
        return int(bound)
    except (TypeError, ValueError, AttributeError, OverflowError):  # sympy / torch infinities
        return None
