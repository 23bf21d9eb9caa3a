"""The quantized engines' graph pass (issue 16): over a lifted graph, before Inductor, each linear layer
whose weight is an engine weight becomes one ``torchtrt_ext::quantized_linear`` call.

A layer is named as ``torchtrt_ext.calibrate`` names it: the module that made the call (the innermost
entry of the node's ``nn_module_stack``, by its path in the model) + ":input". Its activation scale
comes from the calibration cache's amax under that name and is baked into the graph; its weight is
quantized per output channel into two new engine weights (the quantized values and their float32
scales), placeholders appended after the graph's own. The model's weights stay as they are: the
float weight keeps its slot (the engine's table aliases the model's tensor, and a refit loads new
values there), and QuantPlan.requantize makes the quantized slots follow it.

A layer without a calibration entry is a CalibrationError naming it, or with
calibration_coverage='warn' a warning naming it, the layer left at the model's dtype. The graphs
hold linear layers as ``aten.linear`` (torch.export) or ``torch._C._nn.linear`` (dynamo's graphs,
before AOTAutograd); both take (input, weight, bias).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch
import torch.fx

from . import quantize, quantized_ops  # noqa: F401  (quantized_ops registers the op)
from .calibration import CalibrationCache
from .lifting import LiftedGraph, WeightSlot, own_copy

log = logging.getLogger("torchtrt_ext")

LINEAR_TARGETS = (torch.ops.aten.linear.default, torch._C._nn.linear)
QUANTIZED_LINEAR = torch.ops.torchtrt_ext.quantized_linear.default

# Dynamo names a module by the source it was read from: L['self'].layers.0, G['model'].fc,
# L['self']._modules['fc'], L['self'].layers[0], and L['args'][0].fc where a decorated forward takes
# its module positionally (transformers' models)
_ROOT = re.compile(r"^(?P<kind>[LG])\[['\"](?P<name>[^'\"]*)['\"]\](?:\[[0-9]+\])?")
_ITEM = re.compile(r"(?:\._modules)?\[['\"]?([^'\"\]]+)['\"]?\]")


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """What the pass did to one graph: which engine weights (by index in the lifted graph's weights) it
    quantized, in the order of their new slots, and which layers it quantized or left as they were.

    The new slots follow the graph's own: source k's quantized weight is engine weight
    `num_weights + 2k` at placeholder `num_placeholders + 2k`, its scales the next one."""

    fmt: quantize.QuantFormat
    sources: tuple[int, ...]
    num_weights: int
    num_placeholders: int
    layers: tuple[str, ...]  # the calibration names of the layers quantized
    uncovered: tuple[str, ...]  # the layers left at the model's dtype (calibration_coverage='warn')

    def quantized_indices(self, source: int) -> tuple[int, int] | None:
        """The engine weight indices (quantized weight, scales) made from weight `source`, or None."""
        try:
            k = self.sources.index(source)
        except ValueError:
            return None
        return self.num_weights + 2 * k, self.num_weights + 2 * k + 1

    def requantize(self, source: int, value: torch.Tensor) -> dict[int, torch.Tensor]:
        """New values of the quantized slots made from weight `source`, when it takes `value` (a refit
        or the model's own change): the same arithmetic as at build time; the activation scales stay."""
        indices = self.quantized_indices(source)
        if indices is None:
            return {}
        q, scales = quantize.quantize_weight(value, self.fmt)
        return {indices[0]: q, indices[1]: scales}

    def extend(self, lifted: LiftedGraph) -> LiftedGraph:
        """`lifted` with the quantized slots appended: the quantized copies of its own weights (real
        tensors in the table; fake ones among the example arguments where those are fake)."""
        if (len(lifted.weights), lifted.num_placeholders) != (self.num_weights, self.num_placeholders):
            raise ValueError(
                f"a quantization plan for {self.num_weights} weights and {self.num_placeholders} placeholders "
                f"applied to a graph of {len(lifted.weights)} and {lifted.num_placeholders}"
            )
        fake_mode = torch._guards.detect_fake_mode(lifted.example_args)
        weights, args = list(lifted.weights), list(lifted.example_args)
        for source in self.sources:
            slot = lifted.weights[source]
            q, scales = quantize.quantize_weight(slot.tensor, self.fmt)
            for tensor, role in ((q, self.fmt.name), (scales, f"{self.fmt.name}_scales")):
                weights.append(WeightSlot(len(args), f"{slot.name}:{role}", tensor))
                args.append(fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode is not None else tensor)
        return LiftedGraph(lifted.gm, args, weights, list(lifted.input_positions))


def layer_name(node: torch.fx.Node) -> str | None:
    """The calibration name of a linear node's input: its innermost module's path + ':input'; None
    where the node records no module (a call outside any module)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return f"{module_path(list(stack.values())[-1][0])}:input"  # the model itself: ':input', as calibrate names it


def module_path(source: str) -> str:
    """A module's path in the model, from an nn_module_stack entry: export's are paths already
    ('layers.0'); dynamo's name sources (L['self'].layers.0 -> 'layers.0'; a module reached through
    a global keeps the global's name, as lifting names its weights)."""
    root = _ROOT.match(source)
    if root is None:
        return source
    rest = _ITEM.sub(lambda m: "." + m.group(1), source[root.end() :]).lstrip(".")
    if root.group("kind") == "G":
        return f"{root.group('name')}.{rest}" if rest else root.group("name")
    return rest


def quantize_graph(lifted: LiftedGraph, precision: str, cache: CalibrationCache, coverage: str) -> tuple[LiftedGraph, QuantPlan]:
    """The lifted graph quantized: a copy of its graph with each covered linear layer one
    quantized_linear call and the new weight placeholders appended (the graph given stays as it is:
    dynamo reads its own after the backend returns), the quantized weights among its weights; and the
    plan. Raises CalibrationError for uncovered layers (coverage 'error') and for a non-finite or
    non-positive amax."""
    fmt = quantize.quant_format(precision)
    gm = lifted.gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weight_of = {placeholders[w.position]: i for i, w in enumerate(lifted.weights)}
    found: list[tuple[torch.fx.Node, int, str]] = []  # (linear node, source weight index, layer name)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        x, weight, bias = _linear_args(node)
        source = weight_of.get(weight)
        if source is None or lifted.weights[source].tensor.dim() != 2:
            continue  # a weight computed in the graph, or a caller's input: not the engine's to quantize
        name = layer_name(node) or f"<a linear call outside any module, weight {lifted.weights[source].name}>"
        found.append((node, source, name))
    names = sorted({name for _, _, name in found})
    missing = cache.missing(names)
    if missing and coverage == "error":
        cache.require(names)  # the CalibrationError naming them
    if missing:
        log.warning(
            "torchtrt_ext: the calibration cache has no amax for %d layer(s) of %d; they run at the model's dtype "
            "(calibration_coverage='warn'): %s", len(missing), len(names), ", ".join(missing)
        )
    covered = [(node, source, name) for node, source, name in found if name not in missing]
    scales = {name: quantize.activation_scale(cache.amax(name), fmt, name) for _, _, name in covered}
    sources = tuple(dict.fromkeys(source for _, source, _ in covered))
    plan = QuantPlan(fmt, sources, len(lifted.weights), lifted.num_placeholders, tuple(sorted(scales)), tuple(missing))
    if not sources:
        return lifted, plan
    extended = plan.extend(lifted)
    gm = extended.gm = own_copy(gm)
    nodes = dict(zip(lifted.gm.graph.nodes, gm.graph.nodes))  # the copy holds the same nodes, in order
    if any(old.name != new.name for old, new in nodes.items()):
        raise ValueError("quantize_graph: the graph's copy holds other nodes")
    covered = [(nodes[node], source, name) for node, source, name in covered]
    new_nodes = []
    previous = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    for slot, example in zip(extended.weights[plan.num_weights :], extended.example_args[plan.num_placeholders :]):
        with gm.graph.inserting_after(previous):
            previous = gm.graph.placeholder("quantized_" + re.sub(r"\W", "_", slot.name))
        previous.meta["val"] = previous.meta["example_value"] = example
        new_nodes.append(previous)
    for node, source, name in covered:
        x, _, bias = _linear_args(node)
        k = sources.index(source)
        out = node.meta.get("val", node.meta.get("example_value"))
        out_dtype = out.dtype if isinstance(out, torch.Tensor) else _dtype_of(x)
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_function(
                QUANTIZED_LINEAR, (x, new_nodes[2 * k], new_nodes[2 * k + 1], scales[name], bias, out_dtype)
            )
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    log.info("torchtrt_ext: %s engine: %d linear layer(s) quantized, %d weight(s)", fmt.name, len(covered), len(sources))
    return extended, plan


def _linear_args(node: torch.fx.Node) -> tuple[Any, Any, Any]:
    """(input, weight, bias) of a linear call, given by position or keyword."""
    args, kwargs = list(node.args), node.kwargs
    names = ("input", "weight", "bias")
    values = [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]
    return values[0], values[1], values[2]


def _dtype_of(x: Any) -> torch.dtype:
    value = x.meta.get("val", x.meta.get("example_value")) if isinstance(x, torch.fx.Node) else x
    if not isinstance(value, torch.Tensor):
        raise ValueError("quantize_graph: a linear layer's input records no tensor value (meta['val'])")
    return value.dtype
