"""The quantized engines' graph pass (issue 16): over a lifted graph, before Inductor, each quantizable
layer whose weight is an engine weight becomes one ``torchtrt_ext::quantized_linear`` or
``torchtrt_ext::quantized_conv`` call: linear layers, transformers' Conv1D (GPT-2's linear layers) and
convolutions, as core/quantize_layers.py finds them.

A layer is named as ``torchtrt_ext.calibrate`` names it: the module that made the call (the innermost
entry of the node's ``nn_module_stack``, by its path in the model) + ":input". Its activation scale
comes from the calibration cache's amax under that name and is baked into the graph; its weight is
quantized per output channel into two new engine weights (the quantized values and their float32
scales), placeholders appended after the graph's own. A Conv1D's weight, stored (in, out), is quantized
transposed: its quantized slot is (out, in), as quantized_linear takes it. The model's weights stay as
they are: the float weight keeps its slot (the engine's table aliases the model's tensor, and a refit
loads new values there), and QuantPlan.requantize makes the quantized slots follow it.

A layer without a calibration entry is a CalibrationError naming it, or with
calibration_coverage='warn' a warning naming it, the layer left at the model's dtype.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter

import torch
import torch.fx

from . import quantize
from .calibration import CalibrationCache
from .lifting import LiftedGraph, WeightSlot, own_copy
from .quantize_layers import FUSED_LINEAR, LINEAR_TARGETS, QUANTIZED_CONV, QUANTIZED_LINEAR, QUANTIZED_TARGETS, Site, find_sites, site_of

__all__ = ["FUSED_LINEAR", "LINEAR_TARGETS", "QUANTIZED_CONV", "QUANTIZED_LINEAR", "QUANTIZED_TARGETS", "QuantPlan", "quantize_graph"]

log = logging.getLogger("torchtrt_ext")

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
    `num_weights + 2k` at placeholder `num_placeholders + 2k`, its scales the next one. transposed[k]:
    source k is stored (in, out) (transformers' Conv1D) and quantized as its transpose, (out, in). (A
    weight that one layer reads as (out, in) and another as (in, out) is two sources.)"""

    fmt: quantize.QuantFormat
    sources: tuple[int, ...]
    num_weights: int
    num_placeholders: int
    layers: tuple[str, ...]  # the calibration names of the layers quantized
    uncovered: tuple[str, ...]  # the layers left at the model's dtype (calibration_coverage='warn')
    transposed: tuple[bool, ...] = ()  # per source (empty: none is)

    def quantized_indices(self, source: int) -> tuple[int, int] | None:
        """The engine weight indices (quantized weight, scales) made from weight `source`, or None."""
        found = self._entries(source)
        return (self.num_weights + 2 * found[0], self.num_weights + 2 * found[0] + 1) if found else None

    def requantize(self, source: int, value: torch.Tensor) -> dict[int, torch.Tensor]:
        """New values of the quantized slots made from weight `source`, when it takes `value` (a refit
        or the model's own change): the same arithmetic as at build time; the activation scales stay."""
        out = {}
        for k in self._entries(source):
            out[self.num_weights + 2 * k], out[self.num_weights + 2 * k + 1] = self._quantize(value, k)
        return out

    def _entries(self, source: int) -> list[int]:
        return [k for k, s in enumerate(self.sources) if s == source]

    def _quantize(self, value: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Source k's value quantized as its slot holds it: a Conv1D's transposed, row-major (out, in)."""
        if not (self.transposed and self.transposed[k]):
            return quantize.quantize_weight(value, self.fmt)
        q, scales = quantize.quantize_weight(value.t(), self.fmt)
        return q.contiguous(), scales

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
        for k, source in enumerate(self.sources):
            slot = lifted.weights[source]
            q, scales = self._quantize(slot.tensor, k)
            for tensor, role in ((q, self.fmt.name), (scales, f"{self.fmt.name}_scales")):
                weights.append(WeightSlot(len(args), f"{slot.name}:{role}", tensor))
                args.append(fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode is not None else tensor)
        return LiftedGraph(lifted.gm, args, weights, list(lifted.input_positions))


def layer_name(node: torch.fx.Node) -> str | None:
    """The calibration name of a layer node's input: its innermost module's path + ':input'; None
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


def quantize_graph(
    lifted: LiftedGraph, precision: str, cache: CalibrationCache, coverage: str, device: torch.device | None = None
) -> tuple[LiftedGraph, QuantPlan]:
    """The lifted graph quantized: a copy of its graph with each covered layer one quantized_linear
    or quantized_conv call and the new weight placeholders appended (the graph given stays as it is:
    dynamo reads its own after the backend returns), the quantized weights among its weights; and the
    plan. device: where the engine runs, where the graph's values say otherwise (a weight-streamed
    engine's graph is captured on the host). Raises CalibrationError for uncovered layers (coverage
    'error') and for a non-finite or non-positive amax."""
    fmt = quantize.quant_format(precision)
    gm = lifted.gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weight_of = {placeholders[w.position]: i for i, w in enumerate(lifted.weights)}
    found: list[tuple[Site, int, str]] = []  # (layer call, source weight index, layer name)
    for site in find_sites(gm.graph):
        source = weight_of.get(site.weight)
        if source is None or lifted.weights[source].tensor.dim() != site.weight_dims:
            continue  # a weight computed in the graph, or a caller's input: not the engine's to quantize
        name = layer_name(site.node) or f"<a layer call outside any module, weight {lifted.weights[source].name}>"
        found.append((site, source, name))
    names = sorted({name for _, _, name in found})
    missing = cache.missing(names)
    if missing and coverage == "error":
        cache.require(names)  # the CalibrationError naming them
    if missing:
        log.warning(
            "torchtrt_ext: the calibration cache has no amax for %d layer(s) of %d; they run at the model's dtype "
            "(calibration_coverage='warn'): %s", len(missing), len(names), ", ".join(missing)
        )
    covered = [(site, source, name) for site, source, name in found if name not in missing]
    scales = {name: quantize.activation_scale(cache.amax(name), fmt, name) for _, _, name in covered}
    keys = list(dict.fromkeys((source, site.transposed) for site, source, _ in covered))  # one slot pair each
    plan = QuantPlan(fmt, tuple(s for s, _ in keys), len(lifted.weights), lifted.num_placeholders, tuple(sorted(scales)),
                     tuple(missing), tuple(t for _, t in keys))
    if not keys:
        return lifted, plan
    extended = plan.extend(lifted)
    gm = extended.gm = own_copy(gm)
    nodes = dict(zip(lifted.gm.graph.nodes, gm.graph.nodes))  # the copy holds the same nodes, in order
    if any(old.name != new.name for old, new in nodes.items()):
        raise ValueError("quantize_graph: the graph's copy holds other nodes")
    new_nodes = []
    previous = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    for slot, example in zip(extended.weights[plan.num_weights :], extended.example_args[plan.num_placeholders :]):
        with gm.graph.inserting_after(previous):
            previous = gm.graph.placeholder("quantized_" + re.sub(r"\W", "_", slot.name))
        previous.meta["val"] = previous.meta["example_value"] = example
        new_nodes.append(previous)
    for site, source, name in covered:
        # read in the copy as it is now: an input that an earlier layer was is that layer's replacement
        site = site_of(nodes[site.node])
        k = keys.index((source, site.transposed))
        replacement = site.quantized_call(gm.graph, new_nodes[2 * k], new_nodes[2 * k + 1], scales[name], device)
        site.node.replace_all_uses_with(replacement)
        gm.graph.erase_node(site.node)
    gm.graph.lint()
    gm.recompile()
    kinds = Counter("conv" if site.conv else "Conv1D" if site.transposed else "linear" for site, _, _ in covered)
    log.info("torchtrt_ext: %s engine: %d layer(s) quantized (%s), %d weight(s)", fmt.name, len(covered),
             ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())), len(keys))
    return extended, plan

