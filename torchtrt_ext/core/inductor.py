"""The one Inductor call: how the built-in engine and the weight-streaming segments compile a graph.

CUDA-graph mode is the runtime's (it captures and replays the compiled code), never Inductor's, so
Inductor's own cudagraphs are off wherever this project compiles.

Inductor's compiled code comes wrapped in torch._dynamo.disable, so that an outer torch.compile never
traces into it. That wrapper costs a few microseconds per call (it sets and restores dynamo's frame
callback), which adds up over the dozens of graphs of a model that dynamo splits. Engines call the code
unwrapped where no torch.compile is evaluating frames (``frame_callback() is None``): every call from
the backend (dynamo runs a backend's graph with its frame callback off) and from the wrapper (whose
forward is disabled the same way); anywhere else (a graph break of an outer torch.compile), through
``run_disabled``, which does what the wrapper did.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch._C._dynamo.eval_frame import get_eval_frame_callback
from torch._dynamo.eval_frame import innermost_fn

CONFIG_PATCHES = {"triton.cudagraphs": False}

# Values that quantize: a graph that makes or reads them rounds activations to 8 bits, where a
# difference of one ulp in the value rounded can move it to the next quantization step.
_QUANTIZED_DTYPES = frozenset({torch.int8, torch.float8_e4m3fn, torch.float8_e5m2})


def quantizes(gm: torch.fx.GraphModule) -> bool:
    """Whether a graph makes or reads 8-bit quantized values."""
    return any(getattr(node.meta.get("val"), "dtype", None) in _QUANTIZED_DTYPES for node in gm.graph.nodes)


def config_patches(exact_casts: bool) -> dict[str, Any]:
    """Inductor's config for an engine's graphs. exact_casts (an engine whose graph quantizes: every
    one of its graphs, a streamed engine's segments included): round every cast as eager does
    (emulate_precision_casts). A fused kernel otherwise keeps in float32 a value that eager, or a graph
    split elsewhere (a streamed engine's segments), rounds to float16 before the next layer quantizes
    it, and the 8-bit results then differ by whole quantization steps. Measured on the H200: a streamed
    and a resident quantized engine of the same model differed by 2-4% in some elements without it.
    An engine decides once: a segment without a quantized layer rounds as the rest of its engine."""
    return {**CONFIG_PATCHES, "emulate_precision_casts": True} if exact_casts else dict(CONFIG_PATCHES)


def compile_graph(gm: torch.fx.GraphModule, example_args: Sequence[Any], exact_casts: bool | None = None) -> Any:
    """compile_fx on an inference graph (weights among its inputs), without autograd. exact_casts:
    config_patches'; by default, whether this graph quantizes."""
    from torch._inductor.compile_fx import compile_fx

    if exact_casts is None:
        exact_casts = quantizes(gm)
    with torch.no_grad():
        return compile_fx(gm, list(example_args), config_patches=config_patches(exact_casts))


def unwrapped(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """The compiled code without the torch._dynamo.disable wrappers around it (unchanged where it has
    none: a CompiledArtifact, say). Call it only where frame_callback() is None, or through run_disabled."""
    return innermost_fn(compiled)


# frame_callback() is None: no torch.compile is evaluating frames on this thread, so code called now
# runs as it is, never traced. Not None inside a torch.compile region, where a graph break runs our
# code (and False in dynamo's run-only mode). The C function itself: no Python frame per call.
frame_callback: Callable[[], Any] = get_eval_frame_callback


@torch._dynamo.disable
def run_disabled(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) with dynamo's frame callback off (what the disable wrapper of compiled code does)."""
    return fn(*args)
