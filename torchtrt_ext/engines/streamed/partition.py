"""Weight streaming, step 1: where to cut a graph into segments that are compiled one by one.

The cuts go, in execution order, so that each segment first uses a similar share of the weight bytes;
between the candidates near each share, where the fewest values that Inductor would keep in registers
cross the cut (so fusion is lost least: between transformer blocks, not inside one).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from ...core.errors import OptionError

def real_example(value: Any, device: torch.device) -> Any:
    """A real tensor like `value` (a fake or meta example) on `device`; other values as they are."""
    if not isinstance(value, torch.Tensor):
        return value
    if any(not isinstance(s, int) for s in value.shape):
        raise OptionError(
            "weight streaming compiles for static shapes: compile with dynamic=False (torch.compile) or "
            "dynamic_batch=False (torchtrt_ext.compile)"
        )
    real = torch.empty_strided(tuple(value.shape), tuple(value.stride()), dtype=value.dtype, device=device)
    return real.zero_()  # zeros: integer inputs (token ids, indices) must be valid where they are used


def move_graph_to(gm: torch.fx.GraphModule, device: torch.device) -> None:
    """Point the graph's own tensor creations (arange, zeros, _to_copy, ...) at `device` where they name
    the CPU: a model kept on the host is captured there, and runs on the device."""
    changed = False
    for node in gm.graph.nodes:
        dev = node.kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cpu":
            node.kwargs = {**node.kwargs, "device": device}
            changed = True
        if any(isinstance(a, torch.device) and a.type == "cpu" for a in node.args):  # x.to(device)
            node.args = tuple(device if isinstance(a, torch.device) and a.type == "cpu" else a for a in node.args)
            changed = True
    if changed:
        gm.recompile()


# Ops whose outputs live in memory whatever the cuts (Inductor runs them as library calls), and the
# views and tuple items that only look into those outputs.
_MATERIALISED = {
    "mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "convolution", "_convolution", "conv1d", "conv2d",
    "conv3d", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
}
_VIEWS = {
    "getitem", "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand",
    "slice", "select", "alias", "detach",
}


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def partition(gm: torch.fx.GraphModule, weight_nodes: dict[torch.fx.Node, int], sizes: list[int], segments: int) -> dict[torch.fx.Node, int]:
    """Each compute node's segment, in execution order, each first-using about 1/segments of the weight
    bytes. Values that cross a cut are written to memory, and Inductor cannot fuse across it; a cut in
    the middle of a fused chain (between a residual add and the norm after it, say) costs kernel
    launches on every call. So each cut goes, within half a share of its byte target, where the fewest
    values that would otherwise stay in registers cross it (outputs of matmuls, convolutions and
    attention are in memory anyway), nearest the target on a tie: between blocks, in a transformer."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    index = {n: i for i, n in enumerate(nodes)}
    count = len(nodes)
    in_memory: dict[torch.fx.Node, bool] = {}
    cum = [0] * (count + 1)  # weight bytes first used by nodes[:c]
    diff = [0] * (count + 2)
    seen: set[int] = set()
    for i, n in enumerate(nodes):
        op = _op_name(n)
        source = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
        in_memory[n] = op in _MATERIALISED or (op in _VIEWS and source is not None and in_memory.get(source, False))
        new = [weight_nodes[a] for a in n.all_input_nodes if a in weight_nodes and weight_nodes[a] not in seen]
        seen.update(new)
        cum[i + 1] = cum[i] + sum(sizes[w] for w in dict.fromkeys(new))
        last = max((index.get(u, count) for u in n.users), default=i)
        if last > i and not in_memory[n]:  # crosses every cut c with i < c <= last
            diff[i + 1] += 1
            diff[last + 1] -= 1
    cost = [0] * (count + 1)
    running = 0
    for c in range(count + 1):
        running += diff[c]
        cost[c] = running
    total = cum[count]
    share = max(1, total // max(1, segments))
    cuts: list[int] = []
    base = 0  # weight bytes before the last cut
    while base + share < total:
        target, low = base + share, (cuts[-1] + 1 if cuts else 1)
        inside = [c for c in range(low, count) if base < cum[c] < total and abs(cum[c] - target) <= share // 2]
        if inside:
            cut = min(inside, key=lambda c: (cost[c], abs(cum[c] - target), c))
        else:  # one weight larger than the window (a big embedding, say): cut right after the target
            after = [c for c in range(low, count) if target <= cum[c] < total]
            if not after:
                break
            cut = after[0]
        cuts.append(cut)
        base = cum[cut]
    part: dict[torch.fx.Node, int] = {}
    seg = 0
    for i, n in enumerate(nodes):
        while seg < len(cuts) and i >= cuts[seg]:
            seg += 1
        part[n] = seg
    return part
