"""Which of a graph's caller inputs its code writes in place (a KV cache's update, an accumulator).

The engines must know: a CUDA graph replays on its own copies of the inputs, so writes into the caller's
tensors would be lost, and a wrapper that hands the code a conformed copy of an input must copy the
written values back.

Two readings, one per kind of graph:
- an aten graph (torch.export's) is read from its ops' schemas: written arguments (positional, keyword
  such as out=, or in a list such as _foreach_add_'s), with aliases followed through views, in-place
  results and the items of split/unbind/chunk;
- a graph holding torch-level calls (dynamo's: ``acc.mul_(0.5)``, ``kv[:, :2] = y``, ``z += 1``) is run
  once on fake tensors, and an input whose version counter moved was written (views share their base's
  counter). Should that run fail, every caller tensor counts as written: a lost write is a wrong result,
  a needless one only costs the CUDA graph.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

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
    return node.target is operator.getitem or isinstance(node.target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)) or (
        getattr(node.target, "_schema", None) is not None
    )


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
        given = list(zip(schema.arguments, node.args))
        given += [(a, node.kwargs[a.name]) for a in schema.arguments if a.name in node.kwargs]
        aliased = None
        for argument, value in given:
            info = argument.alias_info  # on a list argument too (Tensor(a!)[])
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, torch.fx.Node) and item in owner and info is not None:
                    if info.is_write:
                        written.add(owner[item])
                    aliased = owner[item]  # a view or an in-place result aliases its input
        if aliased is not None and any(r.alias_info is not None for r in schema.returns):
            owner[node] = aliased
    return sorted(written)


def _by_fake_run(lifted: LiftedGraph) -> list[int]:
    args = lifted.example_args
    callers = [i for i, p in enumerate(lifted.input_positions) if isinstance(args[p], torch.Tensor)]
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=False)
    try:
        fakes = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
        before = [f._version if isinstance(f, torch.Tensor) else None for f in fakes]
        with mode, torch.no_grad():
            lifted.gm(*fakes)
    except Exception:  # noqa: BLE001 - the graph ran on real tensors at capture; a fake run is best effort
        return callers
    return [
        i for i in callers if fakes[lifted.input_positions[i]]._version != before[lifted.input_positions[i]]
    ]
