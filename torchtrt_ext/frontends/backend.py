"""The ``torch.compile`` backend: ``torch.compile(model, backend="torchtrt_ext", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point (works after ``pip install`` without
importing torchtrt_ext) and again on ``import torchtrt_ext``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import operator
import threading
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch

from ..core import lifting, registry
from ..core.runtime import same_tensors
from ..core.errors import OptionError, TorchTRTExtError
from ..core.settings import Settings
from ..engines import Engine, build_engine

BACKEND_NAME = "torchtrt_ext"
log = logging.getLogger("torchtrt_ext")


class DynamoGraph:
    """What the backend hands back to dynamo: runs the engine on the caller's inputs, picked out of
    dynamo's argument list, which also carries the module's weights.

    Dynamo reuses one compiled graph for every module whose code and weight shapes match: after a
    graph break inside a layer, each layer of a stack calls the same graph with its own weights. So the
    weights in each call choose the engine: one per set of weight tensors, all running the same
    compiled code (a weight-streaming engine, which owns its weights' copies, is built anew).

    Per call: the last weight set used is checked first (by identity: it is held strongly), then every
    other set, by the identities of its tensors (their ids: an entry goes the moment any of its tensors
    dies, so its ids name live tensors only); either way the tensors' memory must be the memory the
    engine was built on (`p.data = ...` keeps the Parameter object and swaps its memory)."""

    def __init__(self, lifted: lifting.LiftedGraph, settings: Settings):
        self._settings = settings
        self._input_positions = tuple(lifted.input_positions)
        self._weights = [(w.position, w.name) for w in lifted.weights]
        self._pick_weights = _picker([w.position for w in lifted.weights])
        self._pick_inputs = _picker(self._input_positions)
        # A streamed engine is compiled anew for other weights: keep the graph for that (nothing else
        # of the first call, so that its inputs are not held).
        self._gm = lifted.gm if settings.weight_streaming else None
        engine = build_engine(lifted, settings)
        registry.add(engine, [w.tensor for w in lifted.weights])
        weights = self._pick_weights(tuple(lifted.example_args))
        self.engine = engine  # the first: the one built for the weights of the first call
        # Per weight set, by the ids of its tensors: its engine and the tensors' memory (data pointers).
        # The tensors themselves are not held (a model the user drops takes its engines with it), except
        # the last set used (_last: engine, tensors, memory), for the fast path. Reads take no lock;
        # changes (a build, a weight's death) take the lock, re-entrant because a tensor can die (and
        # its finalizer run) on a thread that holds it.
        self._by_weights: dict[tuple[int, ...], tuple[Engine, tuple[int, ...]]] = {}
        self._finalizers: dict[tuple[int, ...], list[weakref.finalize]] = {}  # per entry, one per tensor
        self._lock = threading.RLock()
        self._last = self._remember(engine, weights)

    @property
    def engines(self) -> list[Engine]:
        with self._lock:
            return [entry[0] for entry in tuple(self._by_weights.values())]

    def _remember(self, engine: Engine, weights: tuple) -> tuple[Engine, tuple, tuple[int, ...]]:
        """Keep `engine` for this weight set until one of its tensors dies (caller holds the lock, or
        is the constructor). An entry it replaces (the same tensors, new memory) goes with its finalizers."""
        key = tuple(map(id, weights))
        pointers = tuple(map(_data_ptr, weights))
        self._drop_finalizers(key)
        self._by_weights[key] = (engine, pointers)
        self._finalizers[key] = [self._finalizer(w, key) for w in {id(w): w for w in weights}.values()]
        return (engine, weights, pointers)

    def _finalizer(self, tensor: torch.Tensor, key: tuple[int, ...]) -> weakref.finalize:
        # The callback reaches this graph weakly: weakref's registry holds it strongly until the tensor
        # dies, and this graph holds the last weight set (so those tensors would never die).
        finalizer = weakref.finalize(tensor, _forget_entry, weakref.ref(self), key)
        finalizer.atexit = False  # nothing to forget at exit
        return finalizer

    def _forget(self, key: tuple[int, ...]) -> None:
        """One of the entry's tensors died: its ids may name other tensors from now on."""
        with self._lock:
            self._by_weights.pop(key, None)
            self._drop_finalizers(key)

    def _drop_finalizers(self, key: tuple[int, ...]) -> None:
        for finalizer in self._finalizers.pop(key, ()):
            finalizer.detach()

    def __call__(self, *args: Any) -> list[torch.Tensor]:
        engine, weights, pointers = self._last
        picked = self._pick_weights(args)
        # The same tensors, and their memory not swapped (one C++ pass: runtime.same_tensors)
        if not same_tensors(picked, weights, pointers):
            found = self._by_weights.get(tuple(map(id, picked)))
            pointers = tuple(map(_data_ptr, picked))
            if found is not None and found[1] == pointers:
                engine = found[0]
                self._last = (engine, picked, pointers)
            else:
                engine = self._engine_for(args, picked, pointers)
        return engine(*self._pick_inputs(args))

    def _engine_for(self, args: Sequence[Any], weights: tuple, pointers: tuple[int, ...]) -> Engine:
        with self._lock:  # concurrent first calls with new weights build one engine
            found = self._by_weights.get(tuple(map(id, weights)))
            if found is not None and found[1] == pointers:
                self._last = (found[0], weights, pointers)
            else:  # new tensors, or the same ones with new memory: that entry is replaced, not kept
                self._last = self._remember(self._build_for(args, weights), weights)
            return self._last[0]

    def _build_for(self, args: Sequence[Any], weights: tuple) -> Engine:
        first = self.engine.weight_tensors()
        for (position, name), new, old in zip(self._weights, weights, first):
            if not isinstance(new, torch.Tensor) or (new.shape, new.dtype, new.device) != (old.shape, old.dtype, old.device):
                raise TorchTRTExtError(  # dynamo guards these; a mismatch means a graph reused beyond its guards
                    f"dynamo reused a compiled graph with weight {name!r} (argument {position}) of another "
                    f"shape, dtype or device than it was compiled for ({tuple(old.shape)} {old.dtype} on {old.device})"
                )
        slots = [lifting.WeightSlot(position, name, tensor) for (position, name), tensor in zip(self._weights, weights)]
        lifted = lifting.LiftedGraph(self._gm, list(args), slots, list(self._input_positions))
        # The graph is kept only for streamed engines: the first engine knows which inputs it writes
        # (where an engine needs them: needed_writes).
        engine = build_engine(lifted, self._settings, like=self.engine, writes=self.engine.writes)
        registry.add(engine, list(weights))
        return engine


_data_ptr = torch.Tensor.data_ptr


def _forget_entry(graph: "weakref.ref[Any]", key: tuple[int, ...]) -> None:
    """A weight set's tensor died: its graph (if it still lives) forgets the set."""
    owner = graph()
    if owner is not None:
        owner._forget(key)


def _picker(positions: Sequence[int]) -> Callable[[tuple], tuple]:
    """A function taking the items at `positions` of a tuple, as a tuple: an itemgetter, with no
    Python frame per call (a run of consecutive positions is one slice)."""
    positions = list(positions)
    if not positions:
        return operator.itemgetter(slice(0, 0))
    start, stop = positions[0], positions[-1] + 1
    if positions == list(range(start, stop)):
        return operator.itemgetter(slice(start, stop))
    return operator.itemgetter(*positions)


def torchtrt_ext_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | Settings | None = None,
    **unexpected: Any,
) -> DynamoGraph | Callable[..., Any]:
    if unexpected:
        raise OptionError(
            f"the torchtrt_ext backend takes its settings as options={{...}}, got {sorted(unexpected)} "
            "(torch.compile's mode= is not used by this backend)"
        )
    settings = options if isinstance(options, Settings) else Settings.from_options(options, for_backend=True)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in example_inputs):
        # Engines compute no gradients: this graph runs as captured, with autograd (dynamo guards on
        # grad mode, so a call under no_grad compiles an engine).
        if not _warned_grad:
            _warned_grad.append(True)
            log.warning(
                "torchtrt_ext: gradients are needed (grad mode is on and parameters or inputs require grad) and "
                "the engines compute no gradients, so graphs captured in grad mode run eagerly; call under "
                "torch.no_grad() or torch.inference_mode() to use the engines"
            )
        return gm.forward
    return DynamoGraph(lifting.from_dynamo(gm, example_inputs), settings)


_warned_grad: list[bool] = []


def register() -> None:
    """Make backend="torchtrt_ext" resolvable, to this package's backend function. Idempotent, and safe
    alongside the entry point: the name is offered to dynamo's registry the way an entry point is, so
    that dynamo registers it exactly once (an entry point loaded first imports this package, which must
    not register the name under it). Where an installed entry point of that name names another module
    (left by another install of the package), the function is registered outright instead: dynamo then
    never loads that entry point, which would fail or run other code."""
    from torch._dynamo.backends import registry as dynamo_registry

    if BACKEND_NAME in dynamo_registry._COMPILER_FNS:
        return
    installed = [ep.value for ep in importlib.metadata.entry_points(group="torch_dynamo_backends") if ep.name == BACKEND_NAME]
    if any(value != _ENTRY_POINT for value in installed):
        dynamo_registry.register_backend(compiler_fn=torchtrt_ext_backend, name=BACKEND_NAME)
    elif dynamo_registry._BACKENDS.get(BACKEND_NAME) is None:
        dynamo_registry._BACKENDS[BACKEND_NAME] = _EntryPoint()


_ENTRY_POINT = f"{__name__}:torchtrt_ext_backend"


class _EntryPoint:
    """Stands in for an importlib entry point in dynamo's registry when the package is not installed."""

    name = BACKEND_NAME
    value = _ENTRY_POINT

    @staticmethod
    def load() -> Any:
        return torchtrt_ext_backend
