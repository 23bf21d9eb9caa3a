"""The engine interface: the spine every feature goes through, for both engine kinds.

An engine takes the caller's inputs (tensors on its device, on the caller's current stream), returns
the graph's outputs as a flat list, names its weights by the model's own state_dict names, and says
how much device memory its weights take and whether that memory is shared with the model or is a copy.
Every execution goes through the C++ runtime (``torchtrt_ext.core._C.Runner``), which follows the caller's
stream and hands each concurrent stream its own execution slot.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..core.inductor import frame_callback, run_disabled
from ..core.quantize_pass import QuantPlan
from ..core.runtime import Runner
from ..core.settings import Settings

# How many concurrently active streams an engine serves before a caller waits for a free slot.
DEFAULT_MAX_SLOTS = 16


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """Device memory held for an engine's weights.

    weight_bytes counts each storage once (tied weights are not counted twice); shared_bytes is the
    part that is the model's own memory (no copy); owned_bytes is what the engine adds on top.
    """

    device: torch.device
    weight_bytes: int
    shared_bytes: int

    @property
    def owned_bytes(self) -> int:
        return self.weight_bytes - self.shared_bytes


class Engine(abc.ABC):
    kind: ClassVar[str]
    # The compiled code saved whole, for the engine cache (bytes), where the engine was built to keep
    # it or from it; else None.
    artifact: bytes | None = None
    # precision 'int8'/'fp8': what the engine's graph quantized (its plan); None at the model's precision.
    quantization: QuantPlan | None = None

    def __init__(
        self, device: torch.device, settings: Settings, max_slots: int = DEFAULT_MAX_SLOTS, writes: Sequence[int] = ()
    ):
        """writes: the inputs (by index) that the compiled code writes in place; with cuda_graphs, the
        runtime captures them at their own addresses (one graph per address) instead of on copies."""
        self.device = device
        self.settings = settings
        self.writes = tuple(sorted(writes))
        self._runner = Runner(str(device), max_slots, list(self.writes))
        # Held while the engine's weights change (refit, auto-refit): one change at a time.
        self.refit_lock = threading.RLock()
        # CUDA-graph mode: the runtime captures _execute per stream slot and input signature, and
        # replays it without the GIL.
        self._run = self._runner.run_graphed if settings.cuda_graphs else self._runner.run

    @property
    def graphs_captured(self) -> int:
        """CUDA graphs the runtime holds for this engine now (cuda_graphs=True)."""
        return self._runner.graphs_captured

    @property
    def slots_created(self) -> int:
        """Execution slots made so far: one per stream that has called concurrently."""
        return self._runner.slots_created

    # Calls so far (not locked: a count for tests and reports, exact without concurrent callers).
    calls = 0

    def __call__(self, *inputs: Any) -> list[torch.Tensor]:
        """Run the engine on the caller's current stream; inputs in graph order, outputs as a list."""
        self.calls += 1
        if frame_callback() is None:  # dynamo is off: the compiled code runs without its disable wrapper (core/inductor.py)
            return self._run(self._execute, inputs)
        return run_disabled(self._run, self._execute, inputs)  # a graph break of an outer torch.compile

    @abc.abstractmethod
    def _execute(self, inputs: tuple[Any, ...], slot: int) -> list[torch.Tensor]:
        """Run once on the current stream, using execution state `slot` (never shared at once)."""

    # --- weights: named by the model's state_dict names; tied names share one index -------------

    @abc.abstractmethod
    def weight_index(self) -> Mapping[str, int]:
        """Each weight name -> the index of its tensor in weight_tensors() (tied names share one)."""

    @abc.abstractmethod
    def weight_tensors(self) -> Sequence[torch.Tensor]:
        """The weights the engine computes with now, by index."""

    def held_tensors(self) -> Sequence[torch.Tensor]:
        """Every tensor whose memory the engine computes with now or at a later call (with
        refit_double_buffer, the inactive buffer too). The engine keeps their values itself: a refit
        writes the model's own tensors only where they are none of these."""
        return self.weight_tensors()

    def named_weights(self) -> Mapping[str, torch.Tensor]:
        """The engine's weights by state_dict name (tied weights appear under each of their names)."""
        tensors = self.weight_tensors()
        return {name: tensors[index] for name, index in self.weight_index().items()}

    def quantized_weights(self) -> Mapping[str, torch.Tensor]:
        """A quantized engine's own weights, made from the model's (QuantPlan.extend's names: each
        quantized weight, '<weight>:int8' or ':fp8', and its float32 scales, '<weight>:int8_scales'),
        as the engine holds them now; none at the model's precision. A refit of the float weight
        re-quantizes them."""
        return {}

    @abc.abstractmethod
    def load_weights(self, values: Mapping[int, torch.Tensor]) -> None:
        """Write new values (by index; shapes already checked, dtypes floating-compatible) into the
        engine, ordered on the caller's current stream: calls that start after this returns, on any
        stream, use them. Raises RefitError, with the engine unchanged, where it cannot (out of memory)."""

    @abc.abstractmethod
    def follow(self, values: Mapping[int, torch.Tensor]) -> None:
        """The model's own tensors for these indices changed (replaced or written in place): make the
        engine compute with them, by reading them in place where it can, else by loading their values."""

    @abc.abstractmethod
    def memory(self) -> MemoryUse:
        """Device memory taken by the engine's weights."""


def weight_memory(device: torch.device, tensors: Sequence[torch.Tensor], model_tensors: Sequence[torch.Tensor]) -> MemoryUse:
    """Bytes of `tensors` on `device`, each storage once; shared_bytes where the storage is the model's."""
    model_storages = {_storage_key(t) for t in model_tensors}
    seen: set[tuple[int, int]] = set()
    total = shared = 0
    for t in tensors:
        if t.device != device:
            continue
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        nbytes = t.untyped_storage().nbytes()
        total += nbytes
        if key in model_storages:
            shared += nbytes
    return MemoryUse(device, total, shared)


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return (storage.data_ptr(), storage.nbytes())
