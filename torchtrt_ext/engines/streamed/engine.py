"""The weight-streaming engine: the built-in engine's compute, for graphs whose weights do not fit the
device budget. The graph is cut into segments (partition.py), compiled one by one, and run with the
non-resident weights streamed from pinned host masters (program.py); the budget decides which weights
stay resident (placement.py) and can change at run time without recompiling.

A quantized engine (precision 'int8'/'fp8') streams the quantized bytes: its quantized weights and
their scales are weights of the program like any other, and a float weight that no layer reads any
more (each of its layers computes quantized) is none of the program's: neither streamed nor resident,
nor counted in the budget. The engine holds the model's own tensor for it, as the resident engine
does: a refit writes the new values there and streams their quantization."""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

import torch

from ...core.errors import TorchTRTExtError
from ...core.lifting import LiftedGraph, without_unread
from ...core.settings import Settings
from ..base import Engine, MemoryUse
from ..copy import copy_weights, prepare_sources
from ..quantized import quantized_graph, requantized
from .placement import Placement
from .program import DEFAULT_SEGMENTS, RING_BUFFERS, StreamedProgram

log = logging.getLogger("torchtrt_ext")


def streaming_device(lifted: LiftedGraph) -> torch.device:
    """The CUDA device of the inputs (the model may stay on the host), else of the weights."""
    for i in lifted.input_positions:
        value = lifted.example_args[i]
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            return value.device
    for w in lifted.weights:
        if w.tensor.device.type == "cuda":
            return w.tensor.device
    raise TorchTRTExtError(
        "weight streaming needs a CUDA device, but the inputs and weights are on cpu: pass inputs on "
        "the CUDA device to run on"
    )


class StreamedEngine(Engine):
    kind = "builtin"

    def __init__(
        self,
        lifted: LiftedGraph,
        settings: Settings,
        device: torch.device | None = None,
        segments: int = DEFAULT_SEGMENTS,
        writes: Sequence[int] = (),
    ):
        """device: where to run (default: streaming_device; the CPU runs the same program with
        synchronous copies, which is how its logic is tested without a GPU). segments: how many
        parts the graph is cut into, at most."""
        device = streaming_device(lifted) if device is None else device
        super().__init__(device, settings, writes=writes)
        self._names: dict[str, int] = {}
        for index, w in enumerate(lifted.weights):
            for name in (w.name, *w.aliases):
                self._names[name] = index
        start = time.perf_counter()
        if settings.quantized:
            lifted, self.quantization = quantized_graph(lifted, settings, device=device)
        plan = self.quantization
        self._quantized_names = [w.name for w in lifted.weights[plan.num_weights :]] if plan is not None else []
        self._count = len(lifted.weights)
        # Per engine weight, its index among the program's weights, or None: a float weight read by no
        # segment, for which the engine holds the model's tensor (self._unread).
        program, self._where = without_unread(lifted, plan.sources if plan is not None else ())
        self._unread = {i: lifted.weights[i].tensor.detach() for i, p in enumerate(self._where) if p is None}
        self._program = StreamedProgram(program, device, segments)
        if settings.cuda_graphs:
            self._program.on_placement_change = self._runner.clear_graphs
        self.compile_seconds = time.perf_counter() - start
        self.place(settings.budget.resolve(self._program.total_bytes, device))
        log.info(
            "torchtrt_ext: weight-streaming engine on %s: %d weights, %.1f MiB, %d segments compiled in %.1f s",
            device,
            self._count,
            self._program.total_bytes / 2**20,
            len(self._program.segments),
            self.compile_seconds,
        )

    # --- streaming control ---------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Bytes of all the weights the program reads (what a 100% budget keeps resident)."""
        return self._program.total_bytes

    @property
    def segment_count(self) -> int:
        return len(self._program.segments)

    @property
    def placement(self) -> Placement:
        return self._program.placement

    @property
    def streamed_bytes(self) -> int:
        """Bytes each call copies to the device under the current placement."""
        sizes = [t.numel() * t.element_size() for t in self._program_weights()]
        return sum(sizes[w] for ws in self.placement.streamed for w in ws)

    @property
    def ring_bytes(self) -> int:
        """Device bytes of one execution slot's ring buffers."""
        return RING_BUFFERS * self._program.placement.ring_bytes

    def place(self, budget: int) -> Placement:
        """Keep up to `budget` bytes resident from now on (waits for calls in progress)."""
        return self._program.place(budget)

    # --- the engine interface -------------------------------------------------------------------

    def __call__(self, *inputs: Any) -> list[torch.Tensor]:
        self.calls += 1
        with self._program.calling():  # around the runtime call: a CUDA-graph replay counts too
            return self._run(self._execute, inputs)

    def _execute(self, inputs: tuple[Any, ...], slot: int) -> list[torch.Tensor]:
        return self._program.execute(inputs, slot)

    def weight_index(self) -> Mapping[str, int]:
        return self._names

    def weight_tensors(self) -> Sequence[torch.Tensor]:
        return [self._weight(i) for i in range(self._count)]

    def quantized_weights(self) -> Mapping[str, torch.Tensor]:
        start = self.quantization.num_weights if self.quantization is not None else 0
        return {name: self._weight(start + k) for k, name in enumerate(self._quantized_names)}

    def _weight(self, index: int) -> torch.Tensor:
        where = self._where[index]
        return self._unread[index] if where is None else self._program.weight(where)

    def _program_weights(self) -> list[torch.Tensor]:
        """The program's weights, by its index (the engine's order, less the weights it does not read)."""
        return [self._program.weight(p) for p in self._where if p is not None]

    def load_weights(self, values: Mapping[int, torch.Tensor]) -> None:
        # A quantized engine: the quantized weights made from the new float ones (where the values are)
        values = {**values, **requantized(self.quantization, values, self._weight)}
        unread = [(self._unread[i], v) for i, v in values.items() if self._where[i] is None and v.data_ptr() != self._unread[i].data_ptr()]
        if unread:  # weights no segment reads: the model's tensors, which the engine holds
            copy_weights([t for t, _ in unread], [v for _, v in unread])
        mine = {self._where[i]: v for i, v in values.items() if self._where[i] is not None}
        if mine:
            current = [self._program.weight(p) for p in mine]  # host masters and resident copies, every budget alike
            self._program.load(dict(zip(mine, prepare_sources(current, list(mine.values())))))

    def follow(self, values: Mapping[int, torch.Tensor]) -> None:
        for index, tensor in values.items():
            if self._where[index] is None:
                self._unread[index] = tensor.detach()  # the model's tensor now
        self.load_weights({i: t.detach() for i, t in values.items()})  # the engine holds its own copies

    def memory(self) -> MemoryUse:
        resident, ring = self._program.memory()  # resident copies and rings: all the engine's own
        return MemoryUse(self.device, resident + ring, 0)
