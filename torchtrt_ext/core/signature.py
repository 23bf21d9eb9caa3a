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
from torch.utils._sympy.functions import FloorDiv

from . import trees
from .errors import EngineFileError, TorchTRTExtError

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
        for i, (expected, actual) in enumerate(zip(self._leaves, flat)):
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
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(\*\*|//|[-+*/()]))")
MAX_SIZE_TEXT = 256  # characters in one size expression
_MAX_DEPTH = 32  # nested parentheses and unary signs
_MAX_INT = 2**63  # the largest integer literal
_MAX_EXPONENT = 64  # |exponent| of a power
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def parse_size(text: Any, symbols: dict[str, sympy.Symbol]) -> sympy.Expr:
    """The sympy expression of a size that to_json wrote (``str`` of export's size expressions), built
    from tokens; nothing is evaluated (no eval, sympify or parse_expr). The grammar is Python's for:

        expr  := term (("+" | "-") term)*
        term  := unary (("*" | "/" | "//") unary)*
        unary := ("-" | "+") unary | power
        power := atom ("**" unary)?
        atom  := INTEGER | SYMBOL | "(" expr ")"

    which covers what sympy prints for the sizes torch.export gives inputs: root sizes (``s0``), derived
    dimensions (``2*s0``, ``s0 + 1``, ``2*s0 - 1``, ``4 - s0``), the relations Dim.AUTO finds
    (``s1*s0``, ``s0**2``) and torch's FloorDiv (``((s0 - 1)//2)``). A SYMBOL must be one of `symbols`
    (the names the signature's ranges declare); integers are literals below 2**63, exponents at most 64
    in size, and the text at most MAX_SIZE_TEXT characters. Anything else raises EngineFileError
    naming the text."""
    if not isinstance(text, str):
        raise _bad("a size", text, "an integer or a size expression")
    if len(text) > MAX_SIZE_TEXT:
        raise EngineFileError(f"size expression {_short(text)} is longer than {MAX_SIZE_TEXT} characters")
    tokens: list[tuple[str, Any]] = []
    at, end = 0, len(text.rstrip())
    while at < end:
        m = _TOKEN.match(text, at)
        if m is None:
            raise EngineFileError(f"size expression {text!r}: unexpected {text[at:].lstrip()[:20]!r}")
        number, name, op = m.groups()
        if number is not None:
            if len(number) > 19 or int(number) >= _MAX_INT:
                raise EngineFileError(f"size expression {text!r}: the integer {number[:25]} is too large")
            tokens.append(("int", sympy.Integer(int(number))))
        elif name is not None:
            if name not in symbols:
                raise EngineFileError(f"size expression {text!r}: {name!r} is not a size symbol of this signature")
            tokens.append(("sym", symbols[name]))
        else:
            tokens.append(("op", op))
        at = m.end()
    return _SizeParser(text, tokens).parse()


class _SizeParser:
    def __init__(self, text: str, tokens: list[tuple[str, Any]]):
        self.text, self.tokens, self.at, self.depth = text, tokens, 0, 0

    def fail(self, what: str) -> EngineFileError:
        return EngineFileError(f"size expression {self.text!r}: {what}")

    def peek(self) -> str | None:
        if self.at < len(self.tokens) and self.tokens[self.at][0] == "op":
            return self.tokens[self.at][1]
        return None

    def parse(self) -> sympy.Expr:
        if not self.tokens:
            raise self.fail("empty")
        value = self.expr()
        if self.at != len(self.tokens):
            raise self.fail(f"unexpected {self.tokens[self.at][1]} after a complete expression")
        if not isinstance(value, sympy.Expr) or value.has(sympy.zoo, sympy.oo, sympy.nan):
            raise self.fail("not a finite size")
        return value

    def expr(self) -> sympy.Expr:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.tokens[self.at][1]
            self.at += 1
            right = self.term()
            value = value + right if op == "+" else value - right
        return value

    def term(self) -> sympy.Expr:
        value = self.unary()
        while self.peek() in ("*", "/", "//"):
            op = self.tokens[self.at][1]
            self.at += 1
            right = self.unary()
            if op == "*":
                value = value * right
            elif right == 0:
                raise self.fail("division by zero")
            elif op == "/":
                value = value / right
            else:
                value = FloorDiv(value, right)
        return value

    def unary(self) -> sympy.Expr:
        op = self.peek()
        if op in ("-", "+"):
            self.at += 1
            with self.nested():
                value = self.unary()
            return -value if op == "-" else value
        return self.power()

    def power(self) -> sympy.Expr:
        base = self.atom()
        if self.peek() != "**":
            return base
        self.at += 1
        with self.nested():
            exponent = self.unary()
        if not isinstance(exponent, sympy.Integer) or abs(int(exponent)) > _MAX_EXPONENT:
            raise self.fail(f"the exponent {exponent} is not an integer of at most {_MAX_EXPONENT}")
        if base == 0 and exponent < 0:
            raise self.fail("division by zero")
        return base**exponent

    def atom(self) -> sympy.Expr:
        if self.at >= len(self.tokens):
            raise self.fail("ends too early")
        kind, value = self.tokens[self.at]
        self.at += 1
        if kind != "op":
            return value
        if value != "(":
            raise self.fail(f"unexpected {value}")
        with self.nested():
            inner = self.expr()
        if self.peek() != ")":
            raise self.fail("a parenthesis is not closed")
        self.at += 1
        return inner

    def nested(self) -> "_Depth":
        return _Depth(self)


class _Depth:
    def __init__(self, parser: _SizeParser):
        self.parser = parser

    def __enter__(self) -> None:
        self.parser.depth += 1
        if self.parser.depth > _MAX_DEPTH:
            raise self.parser.fail(f"nested more than {_MAX_DEPTH} deep")

    def __exit__(self, *exc: Any) -> None:
        self.parser.depth -= 1


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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(what: str, value: Any, expected: str) -> EngineFileError:
    return EngineFileError(f"{what} {_short(value)} is not {expected}")
