"""The weight-streaming engine: the built-in engine's compute, for graphs whose weights do not fit the
device budget. The graph is cut into segments (partition.py), compiled one by one, and run with the
non-resident weights streamed from pinned host masters (program.py); the budget decides which weights
stay resident (placement.py) and can change at run time without recompiling."""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

import torch

from ...core.errors import TorchTRTExtError
from ...core.lifting import LiftedGraph
from ...core.settings import Settings
from ..base import Engine, MemoryUse
from ..copy import prepare_sources
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
        self._count = len(lifted.weights)
        start = time.perf_counter()
        self._program = StreamedProgram(lifted, device, segments)
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
        """Bytes of all the weights (what a 100% budget keeps resident)."""
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
        sizes = [t.numel() * t.element_size() for t in self.weight_tensors()]
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
        return [self._program.weight(i) for i in range(self._count)]

    def load_weights(self, values: Mapping[int, torch.Tensor]) -> None:
        if not values:
            return
        current = self.weight_tensors()  # host masters and resident copies, every budget alike
        self._program.load(dict(zip(values, prepare_sources([current[i] for i in values], list(values.values())))))

    def follow(self, values: Mapping[int, torch.Tensor]) -> None:
        self.load_weights({i: t.detach() for i, t in values.items()})  # the engine holds its own copies

    def memory(self) -> MemoryUse:
        resident, ring = self._program.memory()  # resident copies and rings: all the engine's own
        return MemoryUse(self.device, resident + ring, 0)
