"""Which of a graph's caller inputs its code writes in place (a KV cache's update, an accumulator).

The engines must know: a CUDA graph replays on its own copies of the inputs, so writes into the caller's
tensors would be lost, and a wrapper that hands the code a conformed copy of an input must copy the
written values back.

Two readings, one per kind of graph:
- a graph of aten ops alone (torch.export's, without higher-order ops) is read from its ops' schemas:
  written arguments (positional, keyword such as out=, or in a list such as _foreach_add_'s), with
  aliases followed through views, in-place results and the items of split/unbind/chunk;
- any other graph (dynamo's torch-level calls: ``acc.mul_(0.5)``, ``kv[:, :2] = y``, ``acc.data += 1``;
  an exported graph's autocast or grad-mode regions) is run once on fake tensors, and every aten op it
  reaches reports the storages its schema says it writes; an input whose storage is among them was
  written. The run happens on a thread of its own, so that state it sets and might not undo (autocast,
  grad mode, after an error) stays there. Should it fail, every caller tensor counts as written: a lost
  write is a wrong result, a needless one only costs a copy or the CUDA graph.
"""

from __future__ import annotations

import operator
import threading
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from .lifting import LiftedGraph


def written_inputs(lifted: LiftedGraph) -> list[int]:
    """The caller inputs (by call position) whose memory the graph writes in place."""
    gm = lifted.gm
    if gm is None:
        return []
    if all(_schema_readable(node) for node in gm.graph.nodes):
        return _by_schema(lifted)
    return _by_fake_run(lifted)


def _schema_readable(node: torch.fx.Node) -> bool:
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    if node.op != "call_function":
        return False  # call_method / call_module: torch-level code
    return node.target is operator.getitem or isinstance(node.target, torch._ops.OpOverload)


def _by_schema(lifted: LiftedGraph) -> list[int]:
    gm = lifted.gm
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    owner: dict[torch.fx.Node, int] = {nodes[p]: i for i, p in enumerate(lifted.input_positions)}
    written: set[int] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:  # an item of a view list (split, unbind) aliases its input
            if isinstance(node.args[0], torch.fx.Node) and node.args[0] in owner:
                owner[node] = owner[node.args[0]]
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            continue
        aliased = None
        for info, item in _aliased_items(schema, node.args, node.kwargs):
            if isinstance(item, torch.fx.Node) and item in owner:
                if info.is_write:
                    written.add(owner[item])
                aliased = owner[item]  # a view or an in-place result aliases its input
        if aliased is not None and any(r.alias_info is not None for r in schema.returns):
            owner[node] = aliased
    return sorted(written)


def _aliased_items(schema: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Iterator[tuple[Any, Any]]:
    """(alias info, value) for every value an op's call passes to an argument that its schema says
    aliases (a view) or is written: positional or keyword (out=), each item of a list argument
    (Tensor(a!)[], as _foreach_add_ takes)."""
    given = list(zip(schema.arguments, args)) + [(a, kwargs[a.name]) for a in schema.arguments if a.name in kwargs]
    for argument, value in given:
        if argument.alias_info is not None:
            for item in value if isinstance(value, (list, tuple)) else (value,):
                yield argument.alias_info, item


def _by_fake_run(lifted: LiftedGraph) -> list[int]:
    args = lifted.example_args
    callers = [i for i, p in enumerate(lifted.input_positions) if isinstance(args[p], torch.Tensor)]
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=_run_recording, args=(lifted, outcome), name="torchtrt_ext-writes")
    worker.start()
    worker.join()
    if "written" not in outcome:
        return callers
    storages, written = outcome["storages"], outcome["written"]
    return [i for i in callers if storages[lifted.input_positions[i]] in written]


def _run_recording(lifted: LiftedGraph, outcome: dict[str, Any]) -> None:
    """Run the graph on fake tensors of the example inputs' sizes (their hints, where symbolic), noting
    the storages of every tensor an aten op writes. Sets outcome["storages"] (each input's storage, as
    it was before the run: set_ gives a tensor another) and outcome["written"]."""
    try:
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=False)
        with mode:
            fakes = [_fake_like(a) for a in lifted.example_args]
        storages = [StorageWeakRef(f.untyped_storage()) if isinstance(f, torch.Tensor) else None for f in fakes]
        recorder = _WriteRecorder()
        with torch.no_grad(), mode, recorder:
            lifted.gm(*fakes)
        outcome["storages"], outcome["written"] = storages, recorder.written
    except Exception:  # noqa: BLE001 - the graph ran on real tensors at capture; a fake run is best effort
        pass


def _hint(value: Any) -> Any:
    return value.node.hint if isinstance(value, torch.SymInt) else value


def _fake_like(value: Any) -> Any:
    """A fresh tensor (fake, in the current mode) of value's sizes, strides, dtype and device; a symbolic
    size or scalar by its hint."""
    if isinstance(value, torch.Tensor):
        sizes = [_hint(s) for s in value.shape]
        strides = [_hint(s) for s in value.stride()]
        return torch.empty_strided(sizes, strides, dtype=value.dtype, device=value.device)
    return _hint(value)


class _WriteRecorder(TorchDispatchMode):
    """Notes the storage of every tensor argument that an op's schema marks as written."""

    def __init__(self) -> None:
        super().__init__()
        self.written: set[StorageWeakRef] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        schema = getattr(func, "_schema", None)
        if schema is not None:
            for info, item in _aliased_items(schema, args, kwargs):
                if info.is_write and isinstance(item, torch.Tensor):
                    self.written.add(StorageWeakRef(item.untyped_storage()))
        return func(*args, **kwargs)
