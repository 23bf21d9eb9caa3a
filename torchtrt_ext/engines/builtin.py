"""The built-in engine: the captured FX graph compiled by Inductor, weights held in an engine-owned table.

The weights are graph inputs of the compiled code, never constants baked into it, so later features
can swap, refit or stream them without recompiling. At build time the table holds detached aliases
of the model's own tensors: the engine adds no copy of the weights to device memory.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import torch

from ..errors import TorchTRTExtError
from ..lifting import LiftedGraph
from ..settings import Settings
from .base import Engine, MemoryUse, weight_memory

log = logging.getLogger("torchtrt_ext")


def engine_device(lifted: LiftedGraph) -> torch.device:
    """The one device holding the weights (0-dim CPU tensors excepted), else that of the inputs."""
    devices: dict[torch.device, list[str]] = {}
    for w in lifted.weights:
        if w.tensor.device.type == "cpu" and w.tensor.dim() == 0:
            continue
        devices.setdefault(w.tensor.device, []).append(w.name)
    if len(devices) > 1:
        listing = "; ".join(f"{d}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for d, names in devices.items())
        raise TorchTRTExtError(
            f"the model's weights are on several devices ({listing}); an engine runs on one device: "
            "move the model with .to(device) before compiling"
        )
    if devices:
        return next(iter(devices))
    for i in lifted.input_positions:
        value = lifted.example_args[i]
        if isinstance(value, torch.Tensor) and not (value.device.type == "cpu" and value.dim() == 0):
            return value.device
    return torch.device("cpu")


def _compile(lifted: LiftedGraph) -> Any:
    """Inductor-compile the graph with the weights as inputs. CUDA-graph mode is the runtime's (it
    captures and replays the compiled code), not Inductor's."""
    from torch._inductor.compile_fx import compile_fx

    with torch.no_grad():
        return compile_fx(lifted.gm, lifted.example_args, config_patches={"triton.cudagraphs": False})


class BuiltinEngine(Engine):
    kind = "builtin"

    def __init__(self, lifted: LiftedGraph, settings: Settings):
        device = engine_device(lifted)
        if settings.cuda_graphs and device.type != "cuda":
            raise TorchTRTExtError(f"cuda_graphs=True needs a CUDA engine, but this one runs on {device}")
        super().__init__(device, settings)
        self._model_tensors = [w.tensor for w in lifted.weights]
        self._names: dict[str, int] = {}
        for index, w in enumerate(lifted.weights):
            for name in (w.name, *w.aliases):
                self._names[name] = index
        # The weight table: detached aliases of the model's tensors, in slot order.
        self._table = [w.tensor.detach() for w in lifted.weights]
        self._weight_positions = [w.position for w in lifted.weights]
        self._input_positions = list(lifted.input_positions)
        self._template: list[Any] = [None] * lifted.num_placeholders
        for position, tensor in zip(self._weight_positions, self._table):
            self._template[position] = tensor

        start = time.perf_counter()
        self._compiled = _compile(lifted)
        self.compile_seconds = time.perf_counter() - start
        # The runtime assembles the arguments and calls the compiled code itself (_execute is the
        # same thing in Python, kept as the reference).
        self._runner.bind(self._compiled, self._template, self._input_positions)
        mem = self.memory()
        log.info(
            "torchtrt_ext: built-in engine on %s: %d weights, %.1f MiB (%s), Inductor compile %.1f s",
            device,
            len(self._table),
            mem.weight_bytes / 2**20,
            "shared with the model, no copy" if mem.owned_bytes == 0 else f"{mem.owned_bytes / 2**20:.1f} MiB copied",
            self.compile_seconds,
        )

    def _execute(self, inputs: tuple[Any, ...], slot: int) -> list[torch.Tensor]:
        if len(inputs) != len(self._input_positions):
            raise TorchTRTExtError(
                f"the engine takes {len(self._input_positions)} inputs, got {len(inputs)}"
            )
        args = self._template.copy()
        for position, value in zip(self._input_positions, inputs):
            args[position] = value
        return self._compiled(*args)

    def named_weights(self) -> Mapping[str, torch.Tensor]:
        return {name: self._table[index] for name, index in self._names.items()}

    def memory(self) -> MemoryUse:
        return weight_memory(self.device, self._table, self._model_tensors)
