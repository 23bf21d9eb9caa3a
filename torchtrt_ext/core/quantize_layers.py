"""The layers a quantized engine rewrites (issue 16), as they appear in captured graphs, and the
quantized call that replaces each (core/quantize_pass.py runs the pass).

* Linear layers: ``aten.linear`` (torch.export) or ``torch._C._nn.linear`` (dynamo), (input, weight,
  bias), weight (out, in).
* transformers' Conv1D (GPT-2's linear layers): ``torch.addmm(bias, x.view(-1, in), weight)`` with the
  weight stored (in, out), as ``aten.addmm`` / ``torch.addmm`` (``mm`` without a bias) inside a module
  of class Conv1D. Its weight is quantized transposed, to (out, in): per output channel is per column
  of the stored weight.
* Convolutions: ``aten.conv{1,2,3}d`` (padding as numbers or 'same'/'valid'), ``aten.convolution``
  (not transposed) and dynamo's ``torch.conv{1,2,3}d``; weight (out, in / groups, *kernel).

Each becomes ``torchtrt_ext::quantized_linear`` or ``torchtrt_ext::quantized_conv`` (core/quantized_ops.py);
in a CUDA graph, a linear layer of aligned shapes becomes quantized_ops.fused_linear, the same arithmetic
in torch ops, which Inductor traces through and fuses.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.fx

from . import quantized_ops  # noqa: F401  (registers the ops)

log = logging.getLogger("torchtrt_ext")

LINEAR_TARGETS = (torch.ops.aten.linear.default, torch._C._nn.linear)
ADDMM_TARGETS = (torch.ops.aten.addmm.default, torch.addmm)
MM_TARGETS = (torch.ops.aten.mm.default, torch.mm)
CONV_TARGETS = {  # target -> its spatial dimensions
    torch.ops.aten.conv1d.default: 1, torch.ops.aten.conv1d.padding: 1, torch.conv1d: 1,
    torch.ops.aten.conv2d.default: 2, torch.ops.aten.conv2d.padding: 2, torch.conv2d: 2,
    torch.ops.aten.conv3d.default: 3, torch.ops.aten.conv3d.padding: 3, torch.conv3d: 3,
}
CONVOLUTION = torch.ops.aten.convolution.default
QUANTIZED_LINEAR = torch.ops.torchtrt_ext.quantized_linear.default
QUANTIZED_CONV = torch.ops.torchtrt_ext.quantized_conv.default
FUSED_LINEAR = quantized_ops.fused_linear  # what a CUDA graph holds for an aligned linear layer
QUANTIZED_TARGETS = (QUANTIZED_LINEAR, QUANTIZED_CONV, FUSED_LINEAR)

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "transposed": False}


@dataclasses.dataclass(frozen=True)
class Site:
    """One call of a quantizable layer: its node, input, weight and bias (nodes or None), whether its
    weight is stored (in, out) and quantized transposed (Conv1D), and for a convolution its
    (stride, padding, dilation, groups), padding as quantized_conv takes it."""

    node: torch.fx.Node
    x: Any
    weight: Any
    bias: Any
    transposed: bool = False
    conv: tuple[list[int], list[int], list[int], int] | None = None

    @property
    def weight_dims(self) -> int:
        """The dimensions the weight must have to be this layer's."""
        return 2 if self.conv is None else len(self.conv[0]) + 2

    def quantized_call(
        self, graph: torch.fx.Graph, q_weight: torch.fx.Node, scales: torch.fx.Node, x_scale: float, device: torch.device | None = None
    ) -> torch.fx.Node:
        """The call that replaces the layer, inserted before its node (its meta copied). device: where
        the engine runs (default: where the layer's input is)."""
        out = self.node.meta.get("val", self.node.meta.get("example_value"))
        out_dtype = out.dtype if isinstance(out, torch.Tensor) else _dtype_of(self.x)
        with graph.inserting_before(self.node):
            if self.conv is None:
                linear = FUSED_LINEAR if self._fusable(q_weight, device) else QUANTIZED_LINEAR
                call = graph.call_function(linear, (self.x, q_weight, scales, x_scale, self.bias, out_dtype))
            else:
                call = graph.call_function(QUANTIZED_CONV, (self.x, q_weight, scales, x_scale, self.bias, *self.conv, out_dtype))
        call.meta.update(self.node.meta)
        return call


    def _fusable(self, q_weight: torch.fx.Node, device: torch.device | None) -> bool:
        """A linear layer of a CUDA engine whose shapes the GPU's products take: spelled out in torch ops
        (quantized_ops.fused_linear), so that Inductor fuses the quantization and the scaling."""
        x, w = _value(self.x), _value(q_weight)
        if device is None:
            device = x.device if isinstance(x, torch.Tensor) else None
        return device is not None and device.type == "cuda" and isinstance(w, torch.Tensor) and quantized_ops.aligned(w.shape[1], w.shape[0])


def find_sites(graph: torch.fx.Graph) -> list[Site]:
    """The quantizable layer calls of a graph, in order (whether their weights are engine weights is
    the pass's to check)."""
    sites = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        site = site_of(node)
        if site is not None:
            sites.append(site)
    return sites


def site_of(node: torch.fx.Node) -> Site | None:
    """The quantizable layer call that `node` is, read from its arguments as they are now; or None."""
    if node.target in LINEAR_TARGETS:
        x, weight, bias = _args(node, ("input", "weight", "bias"), {"bias": None})
        return Site(node, x, weight, bias)
    if node.target in ADDMM_TARGETS or node.target in MM_TARGETS:
        return _conv1d_site(node)
    if node.target in CONV_TARGETS or node.target is CONVOLUTION:
        return _conv_site(node)
    return None


def _conv1d_site(node: torch.fx.Node) -> Site | None:
    """transformers' Conv1D: addmm(bias, x, weight) (or mm(x, weight)) inside a Conv1D module."""
    if not _module_class_name(node).endswith("Conv1D"):
        return None  # a matrix product of another module: not a layer calibrate records
    if node.target in MM_TARGETS:
        (x, weight), bias = _args(node, ("input", "mat2"), {}), None
    else:
        bias, x, weight, beta, alpha = _args(node, ("input", "mat1", "mat2", "beta", "alpha"), {"beta": 1, "alpha": 1})
        bias_value, weight_value = _value(bias), _value(weight)
        outputs = weight_value.shape[-1] if isinstance(weight_value, torch.Tensor) else None
        if beta != 1 or alpha != 1 or not isinstance(bias_value, torch.Tensor) or tuple(bias_value.shape) != (outputs,):
            log.warning("torchtrt_ext: %s (a %s) is not x @ weight + bias (beta=%r, alpha=%r, bias %s for %s outputs): "
                        "left at the model's dtype", node.name, _module_class_name(node), beta, alpha, _shape(bias), outputs)
            return None
    return Site(node, x, weight, bias, transposed=True)


def _conv_site(node: torch.fx.Node) -> Site | None:
    names = _CONVOLUTION_ARGS if node.target is CONVOLUTION else _CONV_ARGS
    values = dict(zip(names, _args(node, names, _CONV_DEFAULTS)))
    if values.get("transposed"):
        return None  # a transposed convolution: not quantized
    weight_value = _value(values["weight"])
    n = CONV_TARGETS.get(node.target) or (weight_value.dim() - 2 if isinstance(weight_value, torch.Tensor) else 0)
    params = [_ints(values[name], n) for name in ("stride", "dilation")]
    padding = values["padding"]
    if isinstance(padding, str) and isinstance(weight_value, torch.Tensor):
        padding = _string_padding(padding, list(weight_value.shape[2:]), params[1] or [1] * n)
    else:
        padding = _ints(padding, n)
    groups = values["groups"]
    if n < 1 or None in params or padding is None or not isinstance(groups, int):
        log.warning("torchtrt_ext: convolution %s has arguments computed in the graph (stride %r, padding %r, dilation %r, "
                    "groups %r): left at the model's dtype", node.name, values["stride"], values["padding"], values["dilation"], groups)
        return None
    return Site(node, values["input"], values["weight"], values["bias"], conv=(params[0], padding, params[1], groups))


def _string_padding(mode: str, kernel: list[int], dilation: list[int]) -> list[int] | None:
    """padding='valid' or 'same' as numbers: 'same' pads dilation * (k - 1) in all, half before (the
    odd one after, as torch does), given as (before, after) pairs where a side differs."""
    if mode == "valid":
        return [0] * len(kernel)
    if mode != "same":
        return None
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if all(t % 2 == 0 for t in total):
        return [t // 2 for t in total]
    return [v for t in total for v in (t // 2, t - t // 2)]


def _ints(value: Any, n: int) -> list[int] | None:
    """An int or a list of ints (one, broadcast, or one per spatial dimension) as n ints; None where
    it is anything else (a value computed in the graph)."""
    values = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else None
    if values is None or not all(isinstance(v, int) for v in values) or len(values) not in (1, n):
        return None
    return values * n if len(values) == 1 else values


def _args(node: torch.fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> list[Any]:
    """The call's arguments by name, given by position or keyword, missing ones from `defaults`."""
    args, kwargs = node.args, node.kwargs
    return [args[i] if i < len(args) else kwargs.get(name, defaults.get(name)) for i, name in enumerate(names)]


def _module_class_name(node: torch.fx.Node) -> str:
    """The class of the innermost module of the call: export records its qualified name, dynamo the class."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    kind = list(stack.values())[-1][1]
    return kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"


def _value(x: Any) -> Any:
    return x.meta.get("val", x.meta.get("example_value")) if isinstance(x, torch.fx.Node) else x


def _shape(x: Any) -> str:
    value = _value(x)
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else repr(value)


def _dtype_of(x: Any) -> torch.dtype:
    value = _value(x)
    if not isinstance(value, torch.Tensor):
        raise ValueError("quantize_graph: a layer's input records no tensor value (meta['val'])")
    return value.dtype

