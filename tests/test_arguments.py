"""The wrapper's one form per call (frontends/arguments.py): the same as inspect's bind gives, for every
pattern of a call, whether the pattern's form is remembered or not."""

from __future__ import annotations

import inspect
import itertools

import pytest

from torchtrt_ext.frontends.arguments import normal_form


def hf_forward(self, input_ids=None, attention_mask=None, past_key_values=None, *, use_cache=None, labels=None, **kwargs):
    pass


def plain(self, x, y, z=1):
    pass


def varargs(self, a, *rest, flag=False, **extra):
    pass


def positional_only(self, a, /, b=2, *, c=3):
    pass


def _direct(signature, args, kwargs):
    if not kwargs:
        return args, kwargs
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return args, dict(sorted(kwargs.items()))
    return bound.args, dict(sorted(bound.kwargs.items()))


@pytest.mark.parametrize("fn", [hf_forward, plain, varargs, positional_only])
def test_normal_form_is_binds_for_every_call_pattern(fn):
    signature = inspect.signature(fn.__get__(object()))
    names = [p for p in signature.parameters] + ["extra_one", "x", "a", "rest"]
    for count in range(4):
        for k in range(4):
            for chosen in itertools.permutations(names, k):
                args = tuple(object() for _ in range(count))
                kwargs = {name: object() for name in chosen}
                for _ in range(2):  # the second time from the remembered form
                    got, want = normal_form(signature, args, kwargs), _direct(signature, args, kwargs)
                    assert len(got[0]) == len(want[0]) and all(a is b for a, b in zip(got[0], want[0])), (fn.__name__, count, chosen)
                    assert list(got[1]) == list(want[1]) and all(got[1][n] is want[1][n] for n in want[1]), (fn.__name__, count, chosen)
