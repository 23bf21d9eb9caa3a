"""The one Inductor call: how the built-in engine and the weight-streaming segments compile a graph.

CUDA-graph mode is the runtime's (it captures and replays the compiled code), never Inductor's, so
Inductor's own cudagraphs are off wherever this project compiles.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

CONFIG_PATCHES = {"triton.cudagraphs": False}


def compile_graph(gm: torch.fx.GraphModule, example_args: Sequence[Any]) -> Any:
    """compile_fx on an inference graph (weights among its inputs), without autograd."""
    from torch._inductor.compile_fx import compile_fx

    with torch.no_grad():
        return compile_fx(gm, list(example_args), config_patches=CONFIG_PATCHES)
