"""One form per call of the wrapper: arguments that can be positional are, the rest sorted by name, so
that calls that mean the same match the same compiled signature. inspect's Signature.bind finds the form;
how it binds depends only on the call's pattern (how many positional arguments, which keywords), so
each pattern is bound once, with markers for the values, and remembered (a decode step's call bound
anew cost about 70 Python calls)."""

from __future__ import annotations

import inspect
from typing import Any

_FORMS: dict[tuple, tuple] = {}  # (id(signature), number of positional arguments, keywords) -> (signature, form)
_MOST = 256  # patterns remembered (all of them forgotten when full)


def normal_form(signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if not kwargs:
        return args, kwargs
    key = (id(signature), len(args), tuple(kwargs))
    entry = _FORMS.get(key)
    if entry is None or entry[0] is not signature:
        entry = (signature, _form(signature, len(args), tuple(kwargs)))
        if len(_FORMS) >= _MOST:
            _FORMS.clear()
        _FORMS[key] = entry
    form = entry[1]
    if form is None:  # the call does not bind: the forward itself will say what is wrong
        return args, dict(sorted(kwargs.items()))
    positional, keywords = form
    return args + tuple(kwargs[name] for name in positional), {name: kwargs[name] for name in keywords}


def _form(signature: inspect.Signature, count: int, names: tuple[str, ...]) -> tuple | None:
    """(the keywords that become positional, in order; the keywords left, sorted), as bind makes them."""
    markers = [object() for _ in range(count)]
    values = {name: object() for name in names}
    try:
        bound = signature.bind(*markers, **values)
    except TypeError:
        return None
    name_of = {id(v): name for name, v in values.items()}
    if any(a is not m for a, m in zip(bound.args, markers)) or len(bound.args) < count:
        return None  # not a form this can replay: bind every such call
    positional = tuple(name_of[id(v)] for v in bound.args[count:])
    keywords = tuple(sorted(bound.kwargs))
    if any(bound.kwargs[name] is not values.get(name) for name in keywords):
        return None
    return positional, keywords
