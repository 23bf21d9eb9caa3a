"""The original model's own methods (generate(), encode(), ...) called through the drop-in wrapper:
their forward calls go through the engines."""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from typing import Any, Callable


class _Inside(threading.local):
    depth = 0  # > 0 while this thread runs a CompiledModule's forward


inside = _Inside()


# Models whose methods run through a wrapper now -> how many such calls run (all threads).
_routes: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_routes_lock = threading.Lock()


def _routed_forward(compiled: Any, *args: Any, **kwargs: Any) -> Any:
    """The original's forward while one of its methods runs through the wrapper (call_routed):
    the engines, except inside the wrapper's own forward, where it is the model's own forward."""
    if inside.depth:
        return type(compiled.original).forward(compiled.original, *args, **kwargs)
    return compiled(*args, **kwargs)


def _without_auto_compile(original: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers' generate() compiles the model's __call__ itself for a static cache on the GPU
    (auto-compile). Around the engines that only adds dynamo's frame and a graph break per step (the
    wrapper's forward is never traced): it is turned off, unless the caller asked for it (compile_config
    or disable_compile, in the call or the model's generation config)."""
    config = kwargs.get("generation_config") or getattr(original, "generation_config", None)
    if "disable_compile" in kwargs or "compile_config" in kwargs or getattr(config, "compile_config", None) is not None:
        return kwargs
    return {**kwargs, "disable_compile": True}


def call_routed(compiled: Any, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one of the original's own methods with its forward calls sent through the engines:
    for the call, the model's instance attribute `forward` is this module's forward (set by the
    first of the calls running at once, on any thread, and removed by the last). The method holds
    the wrapper's sequence gate for its whole run: a refit waits for it, and it sees one set of weights."""
    original = compiled.original
    if getattr(method, "__name__", None) == "generate" and getattr(method, "__module__", "").startswith("transformers."):
        kwargs = _without_auto_compile(original, kwargs)
    with _routes_lock:
        running = _routes.get(original, 0)
        if not running and "forward" in original.__dict__:  # the user's own instance forward: left alone
            routed = None
        else:
            routed = True
            if not running:
                forward = functools.partial(_routed_forward, compiled)
                # The model's own methods read forward's signature (generate builds attention masks and
                # position ids only for a forward that takes them): the routed forward shows the original's.
                forward.__signature__ = inspect.signature(original.forward)
                original.__dict__["forward"] = forward
            _routes[original] = running + 1
    try:
        with compiled.sequences.sequence():
            result = method(*args, **kwargs)
    finally:
        if routed:
            _unroute(original)
    if inspect.isgenerator(result):  # a streaming method: its body runs as it is iterated, routed then
        return _routed_generator(compiled, result)
    return result


def _unroute(original: Any) -> None:
    with _routes_lock:
        _routes[original] -= 1
        if not _routes[original]:
            del _routes[original]
            original.__dict__.pop("forward", None)


def _routed_generator(compiled: Any, generator: Any) -> Any:
    """Iterate a method's generator with its forward routed and the sequence gate held at each step,
    as the method itself would have run."""

    def advance(sent: Any) -> tuple[bool, Any]:
        def step() -> _Once:
            try:
                return _Once((False, generator.send(sent)))
            except StopIteration as stop:
                return _Once((True, stop.value))

        return call_routed(compiled, step).value

    try:
        done, value = advance(None)
        while not done:
            sent = yield value
            done, value = advance(sent)
        return value
    finally:
        generator.close()


class _Once:
    """A value handed back through call_routed (not a generator, so not wrapped again)."""

    def __init__(self, value: Any):
        self.value = value
