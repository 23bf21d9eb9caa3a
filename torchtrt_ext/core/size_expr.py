"""Size expressions read back from engine files and cache entries (a signature's dynamic sizes), built
from tokens by a small recursive-descent parser: nothing read from a file is evaluated (no eval,
sympify or parse_expr), so a file cannot run code through a size."""

from __future__ import annotations

import re
from typing import Any

import sympy
from torch.utils._sympy.functions import FloorDiv

from .errors import EngineFileError

_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(\*\*|//|[-+*/()]))")
MAX_SIZE_TEXT = 256  # characters in one size expression
_MAX_DEPTH = 32  # nested parentheses and unary signs
_MAX_INT = 2**63  # the largest integer literal
_MAX_EXPONENT = 64  # |exponent| of a power


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
        raise bad("a size", text, "an integer or a size expression")
    if len(text) > MAX_SIZE_TEXT:
        raise EngineFileError(f"size expression {short(text)} is longer than {MAX_SIZE_TEXT} characters")
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


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def bad(what: str, value: Any, expected: str) -> EngineFileError:
    return EngineFileError(f"{what} {short(value)} is not {expected}")
