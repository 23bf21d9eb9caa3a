"""``torchtrt_ext.refit``: new weight values for compiled engines, without recompiling.

Everything is checked before anything changes: names (with strict, none missing and none unknown),
shapes, dtypes (floating-point values convert to the engine's dtype; anything else must match), tied
names given different values, and with ``refit='identical'`` equality with the build-time weights. A
refusal raises RefitError naming every failing weight, and leaves every engine as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import weakref
from typing import Any, Collection, Mapping, Sequence

import torch

from ..core import registry
from ..core.errors import RefitError
from ..core.weight_sources import WeightSource, open_weights
from ..engines import Engine
from .program import CompiledProgram

_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class RefitReport:
    """What a refit did: the names it loaded, the names of the new weights no engine uses, the engine
    weights left as they were (strict=False only), the bytes written and the time taken."""

    updated: tuple[str, ...]
    unused: tuple[str, ...]
    missing: tuple[str, ...]
    engines: int
    bytes: int
    seconds: float


def refit(compiled: Any, weights: Any, strict: bool = True) -> RefitReport:
    """Load new weight values into the engines of `compiled`, without recompiling.

    compiled: what ``torchtrt_ext.compile`` returned, a ``torch.compile(..., backend="torchtrt_ext")``
        module (or the model it compiled), or an engine.
    weights: a state_dict, an ``nn.Module``, or a path to a ``.safetensors`` file (memory-mapped) or a
        torch checkpoint; names are the original model's state_dict names.
    strict: every engine weight must be given, and every given name must be a weight of the model.

    The copies are ordered on the caller's current CUDA stream; calls that start after refit returns,
    on any stream, compute with the new weights. Through the wrapper, a model method running the
    engines on another thread (generate()) finishes first, with the old weights, and one starting
    meanwhile waits: a generated sequence is never a mix of the two.
    """
    start = time.perf_counter()
    with contextlib.ExitStack() as held, open_weights(weights) as source:
        if isinstance(compiled, CompiledProgram):
            # Sequences on other threads (generate()) end first, and new ones wait: each sees one set
            # of weights. Then the weights lock: the wrapper's auto-refit waits, then sees this.
            held.enter_context(compiled.sequences.exclusive())
            held.enter_context(compiled.weights_lock)
            # Changes to the model made before this refit come first, before the engines are listed:
            # following them may drop the engines (the model moved to another dtype or device).
            compiled.sync_weights()
        engines, indexes, model_names, required = _engines_of(compiled)
        eager_module = _eager_parts_of(compiled)
        for engine in sorted(engines, key=id):  # one order everywhere: no deadlock between refits
            held.enter_context(engine.refit_lock)
        plan, unused, missing = _plan(engines, indexes, source, strict, model_names, required)
        eager = _eager_writes(eager_module, source, unused) if eager_module is not None else {}
        written = 0
        for engine, values in plan:
            engine.load_weights(values)
            written += sum(v.nbytes for v in values.values())
        with torch.no_grad():
            for name, (target, value) in eager.items():
                target.copy_(value, non_blocking=True)
                written += target.nbytes
            own = compiled.model_tensors() if isinstance(compiled, CompiledProgram) else None
            written += _write_model(_model_of(compiled), plan, indexes, own)
        unused = unused - set(eager)
        if isinstance(compiled, CompiledProgram):
            # complete once every state_dict weight came (stripped files keep constants, non-persistent buffers)
            compiled.weights_given(complete=not missing & required)
    updated = sorted(_names_loaded(plan, indexes) | set(eager))
    return RefitReport(
        updated=tuple(updated),
        unused=tuple(sorted(unused)),
        missing=tuple(sorted(missing)),
        engines=len(engines),
        bytes=written,
        seconds=time.perf_counter() - start,
    )


def _model_of(compiled: Any) -> torch.nn.Module | None:
    if isinstance(compiled, CompiledProgram):
        return compiled.model
    if isinstance(compiled, torch.nn.Module):
        return getattr(compiled, "_orig_mod", compiled)
    return None


def _write_model(
    module: torch.nn.Module | None,
    plan: list,
    indexes: Sequence[Mapping[str, int]],
    own: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """The model's own tensors take the values loaded where they are not the engine's memory (a
    weight-streaming engine's device copies): the model stays what its engines compute, for its
    state_dict, an eager call and a later compile. `own`: the module's tensors by name, where the
    caller has them. Returns the bytes written."""
    if module is None:
        return 0
    if own is None:
        own = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}
    written = 0
    for (engine, values), index_of in zip(plan, indexes):
        held = {t.data_ptr() for t in engine.held_tensors()}  # kept by the engine, ordered against its calls
        for name, index in index_of.items():
            target = own.get(name)
            if index not in values or target is None or target.data_ptr() in held:
                continue
            target.detach().copy_(values[index], non_blocking=True)
            written += target.nbytes
    return written


def _eager_parts_of(compiled: Any) -> torch.nn.Module | None:
    """The model whose code dynamo may run partly in eager mode (a frame it skipped, such as a loop
    with a graph break inside): its own tensors must take the new values too. None elsewhere."""
    if isinstance(compiled, CompiledProgram):
        return compiled.model if compiled.uses_dynamo else None
    if isinstance(compiled, torch.nn.Module):
        return getattr(compiled, "_orig_mod", compiled)
    return None


def _eager_writes(module: torch.nn.Module, source: WeightSource, names: Collection[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The model tensors that no engine holds, among `names`, with their new values; checked first."""
    own = dict(module.named_parameters(remove_duplicate=False))
    own.update(module.named_buffers(remove_duplicate=False))
    writes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    failures: dict[str, str] = {}
    for name in sorted(set(names) & set(own)):
        value = source.tensor(name)
        problem = weight_mismatch(value.shape, value.dtype, own[name])
        if problem:
            failures[name] = problem
        else:
            writes[name] = (own[name].detach(), value)
    if failures:
        raise RefitError(_failure_message(failures), failures)
    return writes


def _names_loaded(plan: list[tuple[Engine, dict[int, torch.Tensor]]], indexes: Sequence[Mapping[str, int]]) -> set[str]:
    names: set[str] = set()
    for (engine, values), index_of in zip(plan, indexes):
        names.update(name for name, index in index_of.items() if index in values)
    return names


def _engines_of(
    compiled: Any,
) -> tuple[list[Engine], list[Mapping[str, int]], Collection[str] | None, Collection[str] | None]:
    """The engines to refit and each one's weight names (name -> weight index); where a model is known,
    its parameter and buffer names, and its state_dict names (strict refits need those; non-persistent
    buffers and constants keep their values).

    Engines that dynamo built know their weights by names relative to the frame it captured (a layer's
    own forward, after a graph break): for a model, each engine's weights are named by the model's own
    names, matched by tensor (registry.names_in)."""
    if isinstance(compiled, Engine):
        return [compiled], [compiled.weight_index()], None, None
    if isinstance(compiled, (list, tuple)) and compiled and all(isinstance(e, Engine) for e in compiled):
        return list(compiled), [e.weight_index() for e in compiled], None, None
    if isinstance(compiled, CompiledProgram):
        engines, module, names = compiled.engines, compiled.model, compiled.weight_names
        required = compiled.state_dict_names
    elif isinstance(compiled, torch.nn.Module):
        module = getattr(compiled, "_orig_mod", compiled)  # torch.compile's OptimizedModule
        engines = registry.engines_of(module)
        names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        names.update(n for n, _ in module.named_buffers(remove_duplicate=False))
        required = frozenset(module.state_dict(keep_vars=True))
    else:
        raise TypeError(
            "refit takes what torchtrt_ext.compile returned, a module compiled with "
            f"backend='torchtrt_ext' (or its model), or engines; got {type(compiled).__name__}"
        )
    if not engines:
        raise RefitError(
            f"{type(module).__name__} has no torchtrt_ext engines yet: they are built at the first call "
            "(or from example_inputs); call the compiled module once before refitting"
        )
    if isinstance(compiled, CompiledProgram):
        indexes = [compiled.weight_names_of(e) for e in engines]
    else:
        indexes = [registry.names_in(e, module) for e in engines]
    return engines, indexes, names, required


def _plan(
    engines: Sequence[Engine],
    indexes: Sequence[Mapping[str, int]],
    source: WeightSource,
    strict: bool,
    model_names: Collection[str] | None,
    required: Collection[str] | None = None,
) -> tuple[list[tuple[Engine, dict[int, torch.Tensor]]], set[str], set[str]]:
    failures: dict[str, str] = {}
    for engine in engines:
        if engine.settings.refit == "none":
            raise RefitError(
                "the engine was compiled with refit='none', so its weights cannot change; compile with "
                "refit='refit' to refit it"
            )
    given = set(source.names())
    engine_names: set[str] = set()
    for index_of in indexes:
        engine_names.update(index_of)
    missing = engine_names - given
    unused = given - engine_names
    if strict:
        for name in missing:
            if required is None or name in required:
                failures[name] = "missing from the new weights (pass strict=False to keep its current value)"
        for name in unused:
            if model_names is None or name not in model_names:
                failures[name] = "is not a weight of the compiled model (pass strict=False to ignore it)"

    # Per name: the tensor itself where the source holds it already, else its (shape, dtype).
    specs = source.specs(given & engine_names)
    for name, spec in list(specs.items()):
        if isinstance(spec, str):
            failures[name] = spec
            del specs[name]

    # ~200 weights per refit, each checked here before anything is copied: this loop is host time that
    # delays the copies (a refit from CUDA tensors is otherwise ~1.1x a plain copy), so it is kept lean.
    plan: list[tuple[Engine, dict[int, torch.Tensor]]] = []
    loaded: dict[str, torch.Tensor] = {}
    for engine, index_of in zip(engines, indexes):
        current = engine.weight_tensors()
        identical = engine.settings.refit == "identical"
        chosen: dict[int, tuple[str, torch.Tensor]] = {}
        for name, index, shape, dtype in _targets(engine, index_of, current):
            spec = specs.get(name)
            if spec is None:
                continue
            if spec.shape != shape or spec.dtype != dtype:
                problem = weight_mismatch(spec.shape, spec.dtype, current[index])
                if problem:
                    failures[name] = problem
                    continue
            value = loaded.get(name)
            if value is None:
                value = loaded[name] = spec if isinstance(spec, torch.Tensor) else source.tensor(name)
            if index in chosen:
                other, first = chosen[index]
                if value is not first and not _same_values(value, first):
                    failures[name] = f"is tied to {other!r} in the model, but the new weights give them different values"
                continue
            if identical and not _same_values(value, current[index]):
                failures[name] = (
                    "differs from the weight the engine was built with; refit='identical' takes only those "
                    "values (compile with refit='refit' for new values)"
                )
                continue
            chosen[index] = (name, value)
        plan.append((engine, {index: value for index, (_, value) in chosen.items()}))
    if failures:
        raise RefitError(_failure_message(failures), failures)
    return plan, unused, missing


def _targets(
    engine: Engine, index: Mapping[str, int], current: Sequence[torch.Tensor]
) -> list[tuple[str, int, torch.Size, torch.dtype]]:
    """(name, index, shape, dtype) of each engine weight; kept on the engine, as an engine's weights
    never change shape or dtype (rebuilt should the weight index or the table's length change)."""
    cached = _targets_of.get(engine)
    if cached is not None and cached[0] is index and cached[1] == len(current):
        return cached[2]
    targets = [(name, i, current[i].shape, current[i].dtype) for name, i in index.items()]
    _targets_of[engine] = (index, len(current), targets)
    return targets


_targets_of: "weakref.WeakKeyDictionary[Engine, tuple]" = weakref.WeakKeyDictionary()


def weight_mismatch(shape: torch.Size, dtype: torch.dtype, target: torch.Tensor) -> str | None:
    if tuple(shape) != tuple(target.shape):
        return f"has shape {tuple(shape)}, but the engine's weight has shape {tuple(target.shape)}"
    if dtype != target.dtype and not (dtype.is_floating_point and target.dtype.is_floating_point):
        return f"has dtype {dtype}, which cannot become the engine's {target.dtype}"
    return None


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.data_ptr() == b.data_ptr() and a.device == b.device and a.shape == b.shape and a.stride() == b.stride():
        return a.dtype == b.dtype
    return bool(torch.equal(a.to(device=b.device, dtype=b.dtype), b))


def _failure_message(failures: dict[str, str]) -> str:
    lines = [f"  {name}: {reason}" for name, reason in sorted(failures.items())[:_MAX_LISTED]]
    if len(failures) > _MAX_LISTED:
        lines.append(f"  ... and {len(failures) - _MAX_LISTED} more (see the error's .failures)")
    return f"refit refused, the engines are unchanged; {len(failures)} weight(s) failed:\n" + "\n".join(lines)
