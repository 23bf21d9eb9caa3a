"""Which calls an exported graph accepts: input structure, dtypes, devices, static and dynamic sizes.

The drop-in wrapper checks every call against the signatures it has compiled; a call that fits none
gets a new compiled variant rather than a wrong answer or an assertion deep inside generated code.
A signature is plain data (no fake tensors): it is written into engine cache entries as JSON.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

import sympy
import torch
import torch.utils._pytree as pytree

from . import runtime, trees
from .errors import EngineFileError, TorchTRTExtError
from .size_expr import bad as _bad, parse_size, short as _short

_VALUE_TYPES = (bool, int, float, str, type(None))  # non-tensor inputs a signature can write down


class _TensorLeaf(NamedTuple):
    dtype: torch.dtype
    device: torch.device
    shape: tuple[Any, ...]  # per dimension an int, or a sympy expression over the dynamic sizes
    layout: str = "contiguous"  # a key of LAYOUTS: the dense memory format the code was compiled for


# The dense memory formats a signature records. The compiled code assumes its inputs' strides: a call
# in another dense format is another signature (compiled for it); a call that is not dense (a slice, a
# transpose) is copied into the recorded format first, as dense() does for the capture.
LAYOUTS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}
_FORMAT_CODES = {"contiguous": 0, "channels_last": 1, "channels_last_3d": 2}  # LeafCheck's codes


def layout_of(t: torch.Tensor) -> str | None:
    """The tensor's dense memory format (contiguous first where several hold), or None if not dense."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return None


def dense(value: Any) -> Any:
    """A tensor as the compiled code may take it: itself where dense, else a contiguous copy."""
    if isinstance(value, torch.Tensor) and layout_of(value) is None:
        return value.contiguous()
    return value


def _leaf(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    shape = []
    for size in value.shape:
        expr = size.node.expr if isinstance(size, torch.SymInt) else size
        shape.append(int(expr) if isinstance(expr, (int, sympy.Integer)) else expr)
    return _TensorLeaf(value.dtype, value.device, tuple(shape), _fake_layout(value))


def _fake_layout(value: torch.Tensor) -> str:
    """The layout of a captured input (fake tensors with symbolic strides: guarded, so decided)."""
    try:
        return layout_of(value) or "contiguous"
    except Exception:  # strides that cannot be decided without a guard: the contiguous default
        return "contiguous"


class InputSignature:
    def __init__(self, in_spec: pytree.TreeSpec, leaves: Sequence[Any], range_constraints: dict[Any, Any]):
        """leaves: meta["val"] of each user-input placeholder (fake tensors, symbolic sizes, values)."""
        self.in_spec = in_spec
        self._leaves = [_leaf(v) for v in leaves]
        if len(self._leaves) != in_spec.num_leaves:  # each flattened input has its placeholder
            raise TorchTRTExtError(
                f"internal error: the graph takes {len(self._leaves)} inputs for a call of {in_spec.num_leaves}"
            )
        # symbol -> (lowest, highest or None when unbounded)
        self._ranges = {sym: (int(r.lower), _finite(r.upper)) for sym, r in range_constraints.items()}

    @property
    def leaves(self) -> tuple[Any, ...]:
        """Each flattened input: a tensor leaf (shape, dtype, layout) or a constant."""
        return tuple(self._leaves)

    @property
    def ranges(self) -> dict[Any, tuple[int, int | None]]:
        """Each size symbol's (low, high) bounds; high is None when unbounded."""
        return dict(self._ranges)

    def to_json(self) -> dict:
        """The signature as JSON data; raises TypeError where an input cannot be written down."""
        leaves = []
        for leaf in self._leaves:
            if isinstance(leaf, _TensorLeaf):
                dims = [d if isinstance(d, int) else str(d) for d in leaf.shape]
                leaves.append(
                    {"dtype": str(leaf.dtype).removeprefix("torch."), "device": str(leaf.device), "shape": dims, "layout": leaf.layout}
                )
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
    def from_json(cls, data: Any) -> "InputSignature":
        """The inverse of to_json. Every field is checked and nothing is evaluated: sizes are read by
        parse_size (the grammar to_json writes), dtypes from torch's table of dtypes, devices by
        torch.device's parser. Anything else raises EngineFileError naming the bad field and text."""
        if not isinstance(data, dict) or set(data) != {"in_spec", "leaves", "ranges"}:
            raise _bad("the signature", data, "a dict with keys in_spec, leaves and ranges")
        ranges, leaves = data["ranges"], data["leaves"]
        if not isinstance(ranges, list) or not isinstance(leaves, list):
            raise _bad("the signature's ranges and leaves", [ranges, leaves], "lists")
        for r in ranges:
            if not (isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and _is_int(r[1]) and (r[2] is None or _is_int(r[2]))):
                raise _bad("a signature range", r, "[size expression, lowest, highest or null]")
        # The symbols are the ranges that are a bare name (each root size has its own range).
        symbols = {name: sympy.Symbol(name, integer=True, positive=True) for name, _, _ in ranges if _NAME.fullmatch(name)}
        self = cls.__new__(cls)
        if not isinstance(data["in_spec"], str):
            raise _bad("the signature's in_spec", data["in_spec"], "a string")
        self.in_spec = trees.loads(data["in_spec"], "the signature's in_spec")
        if self.in_spec.num_leaves != len(leaves):
            raise EngineFileError(f"the signature's in_spec has {self.in_spec.num_leaves} leaves, its leaves list {len(leaves)}")
        self._leaves = [_leaf_from_json(leaf, symbols) for leaf in leaves]
        self._ranges = {}
        for name, low, high in ranges:
            self._ranges[parse_size(name, symbols)] = (low, high)
        return self

    def conform(self, flat: list[Any]) -> list[Any]:
        """A fitting call's inputs as the compiled code takes them: tensors that are not dense copied
        into the recorded memory format (after mismatch() found no difference)."""
        conformed = flat
        fast = self.__dict__.get("_fast") or self._make_fast()
        # every fixed-shape tensor leaf dense in its format (the C++ pass): only the others to look at
        positions = fast[1] if isinstance(flat, list) and fast[0].first_unsure(flat) < 0 else range(len(self._leaves))
        for i in positions:
            expected, actual = self._leaves[i], flat[i]
            if isinstance(expected, _TensorLeaf) and not actual.is_contiguous(memory_format=LAYOUTS[expected.layout]):
                if conformed is flat:
                    conformed = list(flat)
                conformed[i] = actual.contiguous(memory_format=LAYOUTS[expected.layout])
        return conformed

    def placeholders(self) -> list[Any]:
        """A stand-in call: an empty tensor of each tensor input's dtype on its device (the device is
        what an engine built without a call needs to know), the value of each other input."""
        return [
            torch.empty(0, dtype=leaf.dtype, device=leaf.device) if isinstance(leaf, _TensorLeaf) else leaf
            for leaf in self._leaves
        ]

    def mismatch(self, spec: pytree.TreeSpec, flat: Sequence[Any]) -> str | None:
        """None when a call with these flattened inputs fits; else what does not fit. The tensor leaves
        of fixed shape are checked in one C++ pass (LeafCheck); the rest, and any leaf it is unsure of,
        here."""
        if spec != self.in_spec or len(flat) != len(self._leaves):
            return "the structure of the arguments differs"
        fast = self.__dict__.get("_fast") or self._make_fast()
        if isinstance(flat, list) and fast[0].first_unsure(flat) < 0:
            return self._mismatch_at(fast[1], flat)
        return self._mismatch_at(range(len(self._leaves)), flat)

    def _make_fast(self) -> tuple[Any, list[int]]:
        """The C++ check of the tensor leaves of fixed shape, and the positions it leaves to Python."""
        positions, examples, sizes, formats, rest = [], [], [], [], []
        for i, leaf in enumerate(self._leaves):
            if isinstance(leaf, _TensorLeaf) and all(isinstance(d, int) for d in leaf.shape):
                positions.append(i)
                examples.append(torch.empty(0, dtype=leaf.dtype, device=leaf.device))
                sizes.append(list(leaf.shape))
                formats.append(_FORMAT_CODES[leaf.layout])
            else:
                rest.append(i)
        self._fast = (runtime.LeafCheck(positions, examples, sizes, formats), rest)
        return self._fast

    def _mismatch_at(self, positions: Sequence[int], flat: Sequence[Any]) -> str | None:
        bindings: dict[sympy.Symbol, int] = {}
        deferred: list[tuple[int, int, Any, int]] = []
        leaves = self._leaves
        for i in positions:
            expected, actual = leaves[i], flat[i]
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

    def varying_dims(self, spec: pytree.TreeSpec, flat: Sequence[Any]) -> list[set[int]] | None:
        """For a call that differs from this signature in static sizes only: per flattened input, the
        dimensions whose size differs (empty for non-tensors). None where anything else differs
        (structure, a value, dtype, device, rank, layout)."""
        if spec != self.in_spec or len(flat) != len(self._leaves):
            return None
        found: list[set[int]] = []
        for expected, actual in zip(self._leaves, flat):
            if not isinstance(expected, _TensorLeaf):
                if type(actual) is not type(expected) or actual != expected:
                    return None
                found.append(set())
                continue
            if (
                not isinstance(actual, torch.Tensor)
                or (actual.dtype, actual.device, actual.dim()) != (expected.dtype, expected.device, len(expected.shape))
                or (layout_of(actual) or "contiguous") != expected.layout
            ):
                return None
            found.append({d for d, (size, want) in enumerate(zip(actual.shape, expected.shape)) if isinstance(want, int) and size != want})
        return found

    def _tensor_mismatch(self, i, expected: _TensorLeaf, actual, bindings, deferred) -> str | None:
        if not isinstance(actual, torch.Tensor):
            return f"input {i} is a {type(actual).__name__}, compiled for a tensor"
        if actual.dtype != expected.dtype:
            return f"input {i} has dtype {actual.dtype}, compiled for {expected.dtype}"
        if actual.device != expected.device:
            return f"input {i} is on {actual.device}, compiled for {expected.device}"
        if actual.dim() != len(expected.shape):
            return f"input {i} has {actual.dim()} dimensions, compiled for {len(expected.shape)}"
        layout = layout_of(actual)
        if layout is not None and layout != expected.layout and not actual.is_contiguous(memory_format=LAYOUTS[expected.layout]):
            return f"input {i} is {layout}, compiled for {expected.layout}"
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


# --- Reading signatures back: nothing read from a file is evaluated -----------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _leaf_from_json(leaf: Any, symbols: dict[str, sympy.Symbol]) -> Any:
    if isinstance(leaf, dict) and set(leaf) == {"value"}:
        value = leaf["value"]
        if type(value) not in _VALUE_TYPES:
            raise _bad("a signature value", value, "a bool, int, float, str or null")
        return value
    if not isinstance(leaf, dict) or set(leaf) != {"dtype", "device", "shape", "layout"}:
        raise _bad("a signature leaf", leaf, "{dtype, device, shape, layout} or {value}")
    if leaf["layout"] not in LAYOUTS:
        raise _bad("a signature layout", leaf["layout"], "one of " + ", ".join(LAYOUTS))
    dtype = _DTYPES.get(leaf["dtype"]) if isinstance(leaf["dtype"], str) else None
    if dtype is None:
        raise _bad("a signature dtype", leaf["dtype"], "the name of a torch dtype")
    if not isinstance(leaf["device"], str):
        raise _bad("a signature device", leaf["device"], "a device string")
    try:
        device = torch.device(leaf["device"])
    except (RuntimeError, ValueError) as exc:
        raise EngineFileError(f"a signature device {_short(leaf['device'])} is not a device ({exc})") from None
    if not isinstance(leaf["shape"], list):
        raise _bad("a signature shape", leaf["shape"], "a list")
    shape = []
    for d in leaf["shape"]:
        if _is_int(d):
            if d < 0:
                raise _bad("a signature size", d, "a size of at least 0")
            shape.append(d)
        else:
            shape.append(parse_size(d, symbols))
    return _TensorLeaf(dtype, device, tuple(shape), leaf["layout"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
