"""Turn a captured graph into a ``LiftedGraph``: every parameter and buffer becomes a named weight slot.

Both frontends end here. Dynamo hands the backend a graph whose placeholders mix user inputs with the
module's parameters and buffers (each placeholder carries the dynamo ``Source`` it was read from);
``torch.export`` hands an ``ExportedProgram`` whose graph signature names every lifted tensor. Either
way the engine receives one description: which placeholder is which weight (by the model's own
state_dict name), and which placeholders are the caller's inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree

from .errors import TorchTRTExtError


@dataclasses.dataclass(frozen=True)
class WeightSlot:
    position: int  # index of the placeholder in the graph
    name: str  # state_dict name in the original model (export: also constants, by their attribute name)
    tensor: torch.Tensor  # the model's own tensor at capture time
    aliases: tuple[str, ...] = ()  # other names of the same tensor (tied weights)


@dataclasses.dataclass
class LiftedGraph:
    gm: torch.fx.GraphModule | None  # None when bound to code compiled before (an engine cache entry)
    example_args: list[Any]  # one per placeholder, real or fake, for compilation
    weights: list[WeightSlot]
    input_positions: list[int]  # placeholders fed by the caller, in call order

    @property
    def num_placeholders(self) -> int:
        return len(self.example_args)

    def describe(self) -> dict:
        """Where each weight and input goes, as JSON data (no tensors): what binds code compiled for
        this graph to a model's tensors again (``bind``)."""
        return {
            "placeholders": self.num_placeholders,
            "inputs": list(self.input_positions),
            "weights": [[w.position, w.name, list(w.aliases)] for w in self.weights],
        }


def bind(description: dict, tensors: Mapping[str, torch.Tensor], inputs: Sequence[Any]) -> LiftedGraph:
    """The LiftedGraph that `description` (from LiftedGraph.describe) gives with these weights (by
    name) and example inputs (a call's flattened inputs), without its graph. Raises KeyError or
    TorchTRTExtError where they do not fit."""
    n = int(description["placeholders"])
    positions = [int(i) for i in description["inputs"]]
    weights = [
        WeightSlot(int(position), name, tensors[name], tuple(aliases)) for position, name, aliases in description["weights"]
    ]
    taken = sorted(positions + [w.position for w in weights])
    if taken != list(range(n)) or len(positions) != len(inputs):
        raise TorchTRTExtError(f"a graph description of {n} placeholders does not fit {len(inputs)} inputs")
    example_args: list[Any] = [None] * n
    for w in weights:
        example_args[w.position] = w.tensor
    for position, value in zip(positions, inputs):
        example_args[position] = value
    return LiftedGraph(None, example_args, weights, positions)


def graph_devices(gm: torch.fx.GraphModule | None) -> set[torch.device]:
    """Every device that a tensor of the graph lives on, read from the values recorded on its nodes
    (placeholders, computed values, outputs); empty without a graph."""
    if gm is None:
        return set()
    devices: set[torch.device] = set()
    for node in gm.graph.nodes:
        for value in pytree.tree_leaves(node.meta.get("val", node.meta.get("example_value"))):
            if isinstance(value, torch.Tensor):
                devices.add(value.device)
    return devices


def _placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


# Dynamo sources that only wrap another source (markers of how a module was reached).
_TRANSPARENT_SOURCES = ("NNModuleSource", "ParamBufferSource", "FSDPNNModuleSource")


def _state_dict_name(source: Any) -> str | None:
    """The state_dict name a dynamo source reads, relative to the compiled module, or None.

    ``L['self']._modules['fc']._parameters['weight']`` -> ``fc.weight``. A module reached through a
    global keeps the global's name as prefix (``G['model']._modules['fc']...`` -> ``model.fc.weight``).
    Anything that is not a parameter or buffer of a module (a plain tensor input, a tensor attribute
    that is not registered) gives None.
    """
    from torch._dynamo.source import AttrSource, DictGetItemSource, GetItemSource, GlobalSource, LocalSource

    leaf = source
    while type(leaf).__name__.endswith(_TRANSPARENT_SOURCES) and hasattr(leaf, "base"):
        leaf = leaf.base
    if not (
        isinstance(leaf, DictGetItemSource)
        and isinstance(leaf.base, AttrSource)
        and leaf.base.member in ("_parameters", "_buffers")
    ):
        return None
    parts: list[str] = []
    node = source
    while True:
        if isinstance(node, DictGetItemSource) and isinstance(node.base, AttrSource) and node.base.member in (
            "_modules",
            "_parameters",
            "_buffers",
        ):
            parts.append(str(node.index))
            node = node.base.base
        elif type(node).__name__.endswith(_TRANSPARENT_SOURCES) and hasattr(node, "base"):
            node = node.base
        elif isinstance(node, AttrSource):  # a submodule reached as a plain attribute
            parts.append(node.member)
            node = node.base
        elif isinstance(node, LocalSource):
            break
        elif isinstance(node, GlobalSource):
            parts.append(node.global_name)
            break
        elif isinstance(node, GetItemSource) and isinstance(node.base, LocalSource):
            break  # the module passed positionally to a wrapper (`args[0]`: a decorated forward's self)
        else:
            return None
    return ".".join(reversed(parts))


def _is_static_input(node: torch.fx.Node) -> bool:
    return bool(node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type"))


def from_dynamo(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> LiftedGraph:
    """Lift the graph dynamo hands a backend: its parameter/buffer placeholders become weights."""
    nodes = _placeholders(gm)
    if len(nodes) != len(example_inputs):
        raise TorchTRTExtError(
            f"dynamo gave {len(example_inputs)} example inputs for {len(nodes)} graph inputs"
        )
    weights: list[WeightSlot] = []
    inputs: list[int] = []
    for i, (node, value) in enumerate(zip(nodes, example_inputs)):
        grapharg = node.meta.get("grapharg")
        name = None
        if isinstance(value, torch.Tensor) and grapharg is not None and _is_static_input(node):
            name = _state_dict_name(grapharg.source)
        if name is None:
            inputs.append(i)
        else:
            weights.append(WeightSlot(i, name, value))
    return LiftedGraph(gm, list(example_inputs), weights, inputs)


def from_export(ep: torch.export.ExportedProgram) -> LiftedGraph:
    """Lift an ExportedProgram: parameters, buffers and tensor constants become weights."""
    from torch.export.graph_signature import InputKind

    gm = own_copy(ep.graph_module)  # what lifting and compiling do to the graph stays off the program
    nodes = _placeholders(gm)
    specs = ep.graph_signature.input_specs
    if len(nodes) != len(specs):
        raise TorchTRTExtError(f"exported graph has {len(nodes)} inputs but {len(specs)} input specs")
    weights: list[WeightSlot] = []
    inputs: list[int] = []
    for i, spec in enumerate(specs):
        if spec.kind == InputKind.USER_INPUT:
            inputs.append(i)
        elif spec.kind == InputKind.PARAMETER:
            weights.append(WeightSlot(i, spec.target, ep.state_dict[spec.target]))
        elif spec.kind == InputKind.BUFFER:
            if spec.persistent:
                weights.append(WeightSlot(i, spec.target, ep.state_dict[spec.target]))
            else:
                weights.append(WeightSlot(i, spec.target, ep.constants[spec.target]))
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            weights.append(WeightSlot(i, spec.target, ep.constants[spec.target]))
        else:
            raise TorchTRTExtError(
                f"exported graph input {spec.arg.name!r} is a {spec.kind.name}, which torchtrt_ext "
                "engines do not support (use frontend='dynamo')"
            )
    example_args = [n.meta["val"] for n in nodes]
    return _merge_tied(LiftedGraph(gm, example_args, weights, inputs))


def without_unread(lifted: LiftedGraph, candidates: Sequence[int]) -> tuple[LiftedGraph, list[int | None]]:
    """lifted without those of the weights `candidates` (by index) that its graph does not read (their
    placeholders have no users: a quantized layer's float weight, say), on a copy of its graph; and per
    weight of lifted, its index among the result's weights, or None where it was left out. lifted itself
    where every candidate is read."""
    nodes = _placeholders(lifted.gm)
    gone = {lifted.weights[i].position for i in candidates if not nodes[lifted.weights[i].position].users}
    if not gone:
        return lifted, list(range(len(lifted.weights)))
    gm = own_copy(lifted.gm)
    for position, node in enumerate(_placeholders(gm)):
        if position in gone:
            gm.graph.erase_node(node)
    gm.recompile()
    new_position = {p: k for k, p in enumerate(p for p in range(lifted.num_placeholders) if p not in gone)}
    weights: list[WeightSlot] = []
    where: list[int | None] = []
    for w in lifted.weights:
        where.append(None if w.position in gone else len(weights))
        if w.position not in gone:
            weights.append(dataclasses.replace(w, position=new_position[w.position]))
    args = [a for p, a in enumerate(lifted.example_args) if p not in gone]
    return LiftedGraph(gm, args, weights, [new_position[p] for p in lifted.input_positions]), where


def own_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with its own copy of the graph (nodes and their meta dicts), sharing the rest."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # graph_copy returns what the output node returned
    graph._codegen = gm.graph._codegen
    copy = torch.fx.GraphModule(gm, graph)
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy


def _merge_tied(lifted: LiftedGraph) -> LiftedGraph:
    """Give each tensor one placeholder: a tied weight read under two names becomes one slot with an
    alias, so the compiled graph sees every weight once (as dynamo's graphs already do)."""
    first: dict[int, WeightSlot] = {}
    aliases: dict[int, list[str]] = {}
    dropped: set[int] = set()
    nodes = _placeholders(lifted.gm)
    for slot in lifted.weights:
        key = id(slot.tensor)
        if key not in first:
            first[key] = slot
            aliases[key] = []
            continue
        nodes[slot.position].replace_all_uses_with(nodes[first[key].position])
        lifted.gm.graph.erase_node(nodes[slot.position])
        aliases[key].append(slot.name)
        dropped.add(slot.position)
    if not dropped:
        return lifted
    lifted.gm.recompile()
    new_index = {}
    for old in range(len(nodes)):
        if old not in dropped:
            new_index[old] = len(new_index)
    weights = [
        dataclasses.replace(s, position=new_index[s.position], aliases=tuple(aliases[id(s.tensor)]))
        for s in first.values()
    ]
    return LiftedGraph(
        lifted.gm,
        [a for i, a in enumerate(lifted.example_args) if i not in dropped],
        weights,
        [new_index[i] for i in lifted.input_positions],
    )
