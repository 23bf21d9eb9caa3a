"""The built-in engine: the captured FX graph compiled by Inductor, weights held in an engine-owned table.

The weights are graph inputs of the compiled code, never constants baked into it, so later features
can swap, refit or stream them without recompiling. At build time the table holds detached aliases
of the model's own tensors: the engine adds no copy of the weights to device memory.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import weakref
from typing import Any, Mapping, Sequence

import torch

from ..core import lifting
from ..core.errors import RefitError, TorchTRTExtError
from ..core.inductor import compile_graph, config_patches, quantizes, unwrapped
from ..core.lifting import LiftedGraph
from ..core.settings import Settings
from .base import Engine, MemoryUse, weight_memory
from .copy import copy_weights
from .quantized import SavedQuantization, quantized_graph, requantized

log = logging.getLogger("torchtrt_ext")


def engine_device(lifted: LiftedGraph) -> torch.device:
    """The device the compiled code runs on. The weights must be on one device (0-dim CPU tensors
    excepted); the engine runs on the one accelerator that any tensor of the graph lives on (its
    weights, inputs, and every value it computes, such as a tensor made with device='cuda' from CPU
    inputs), else on the weights' device, else on the CPU. Classing an engine by its weights or first
    input alone put a graph that holds no weights on the CPU while it computed on CUDA."""
    weight_devices: dict[torch.device, list[str]] = {}
    for w in lifted.weights:
        if not (w.tensor.device.type == "cpu" and w.tensor.dim() == 0):
            weight_devices.setdefault(w.tensor.device, []).append(w.name)
    if len(weight_devices) > 1:
        raise TorchTRTExtError(
            f"the model's weights are on several devices ({_listing(weight_devices)}); an engine runs on one "
            "device: move the model with .to(device) before compiling"
        )
    accelerators: dict[torch.device, list[str]] = {}
    for device, names in weight_devices.items():
        if device.type != "cpu":
            accelerators.setdefault(_indexed(device), []).extend(names)
    for position in lifted.input_positions:
        value = lifted.example_args[position]
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            accelerators.setdefault(_indexed(value.device), []).append(f"input {position}")
    for device in lifting.graph_devices(lifted.gm):
        if device.type != "cpu":
            accelerators.setdefault(_indexed(device), []).append("values the graph computes")
    if len(accelerators) > 1:
        raise TorchTRTExtError(
            f"the graph uses several devices ({_listing(accelerators)}); an engine runs on one device: move "
            "the model with .to(device) and pass the inputs on that device"
        )
    if accelerators:
        return next(iter(accelerators))
    return next(iter(weight_devices), torch.device("cpu"))


def _listing(devices: dict[torch.device, list[str]]) -> str:
    return "; ".join(f"{d}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for d, names in devices.items())


def _indexed(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _compile(lifted: LiftedGraph, keep_artifact: bool = False) -> Any:
    """Inductor-compile the graph with the weights as inputs. CUDA-graph mode is the runtime's (it
    captures and replays the compiled code), not Inductor's.

    keep_artifact (the engine cache): compile through torch._inductor.standalone_compile, whose result
    also saves whole (a CompiledArtifact). It runs compile_fx on the same graph and example inputs
    (their fake mode, symbolic sizes included, made the tracing context's, which is where compile_fx
    looks first) with the same Inductor config: its own triton.autotune_at_compile_time=True (which
    runs the Triton kernels at compile time on random inputs) is set back to the ambient value by the
    config patches, which compile_fx applies inside it. What it adds is a recorder of the cache
    artifacts the compile writes, which save() serializes."""
    from torch._inductor import config

    if not keep_artifact:
        return compile_graph(lifted.gm, lifted.example_args)
    with torch.no_grad():
        from torch._guards import TracingContext, detect_fake_mode, tracing
        from torch._inductor import standalone_compile

        patches = {**config_patches(quantizes(lifted.gm)), "triton.autotune_at_compile_time": config.triton.autotune_at_compile_time}
        with tracing(TracingContext(detect_fake_mode(lifted.example_args))):  # export's fake tensors
            return standalone_compile(
                lifted.gm, lifted.example_args, dynamic_shapes="from_tracing_context", options={"config_patches": patches}
            )


def _artifact_bytes(artifact: Any) -> bytes:
    """A CompiledArtifact in its binary format (the format is the file's; save takes a path only)."""
    with tempfile.TemporaryDirectory(prefix="torchtrt_ext-") as folder:
        path = os.path.join(folder, "artifact.bin")
        artifact.save(path=path, format="binary")
        with open(path, "rb") as f:
            return f.read()


def _load_artifact(data: bytes) -> Any:
    """The compiled code in `data` (from _artifact_bytes), Inductor's caches filled from it; nothing
    is traced or compiled. Raises where it cannot load (another torch, a missing cache entry)."""
    from torch._inductor import CompiledArtifact, config

    with tempfile.TemporaryDirectory(prefix="torchtrt_ext-") as folder:
        path = os.path.join(folder, "artifact.bin")
        with open(path, "wb") as f:
            f.write(data)
        # Nothing is compiled on a load (the kernels come in the artifact): no pool of compile workers
        # to start. Measured on the H100 (Llama-style, 22 layers): a hit took 4.29 s with one compile
        # thread against 5.63 s with Inductor's default pool.
        with config.patch(compile_threads=1):
            return CompiledArtifact.load(path=path, format="binary")


class BuiltinEngine(Engine):
    kind = "builtin"

    def __init__(
        self,
        lifted: LiftedGraph,
        settings: Settings,
        artifact: bytes | None = None,
        keep_artifact: bool = False,
        compiled_from: "BuiltinEngine | None" = None,
        writes: Sequence[int] = (),
        saved: SavedQuantization | None = None,
    ):
        """artifact: compiled code saved whole (Engine.artifact of an engine built before, from an
        engine cache entry): loaded and run; lifted.gm may then be None. keep_artifact: compile so that
        self.artifact holds the code saved whole (None, with a warning, where Inductor cannot save it).
        compiled_from: a resident engine of the same graph whose compiled code this one runs with its
        own weights (lifted's), without compiling. writes: the inputs (by index) that the compiled
        code writes in place (see Engine). saved: a quantized engine's plan and quantized weights, as an
        engine file holds them (engines/quantized.py)."""
        device = engine_device(lifted)
        if settings.cuda_graphs and device.type != "cuda":
            raise TorchTRTExtError(f"cuda_graphs=True needs a CUDA engine, but this one runs on {device}")
        super().__init__(device, settings, writes=writes)
        # The model's own tensors, weakly: the engine must not keep a model's weights alive (the
        # backend drops an engine when the weights it was built for die).
        self._model_tensors = [weakref.ref(w.tensor) for w in lifted.weights]
        self._names: dict[str, int] = {}
        for index, w in enumerate(lifted.weights):
            for name in (w.name, *w.aliases):
                self._names[name] = index
        # precision 'int8'/'fp8': the graph's linear layers quantized, their quantized weights appended
        # to the table (the engine's own, not in the weight index: a refit names the float weight, which
        # they follow).
        if saved is not None and not settings.quantized:
            raise TorchTRTExtError(f"{saved.source}: a quantization plan for an engine of precision {settings.precision!r}")
        self._quantized_names: list[str] = []
        if settings.quantized:
            lifted, self.quantization = quantized_graph(lifted, settings, saved, compiled_from)
            if self.quantization is not None:
                self._quantized_names = [w.name for w in lifted.weights[self.quantization.num_weights :]]
        # The weight table: detached aliases of the model's tensors, in index order.
        self._table = [w.tensor.detach() for w in lifted.weights]
        self._weight_positions = [w.position for w in lifted.weights]
        self._input_positions = list(lifted.input_positions)
        self._num_args = lifted.num_placeholders
        # refit_double_buffer: the inactive buffer (allocated at the first refit), which of the two is
        # active (it names the buffer to the runtime, which keeps CUDA graphs per buffer), and the
        # indices where the inactive buffer differs from the active one (None: all of them).
        self._spare: list[torch.Tensor] | None = None
        self._active_id = 0
        self._spare_stale: set[int] | None = None

        start = time.perf_counter()
        if compiled_from is not None:
            self._compiled = compiled_from._compiled
            self.artifact = compiled_from.artifact
        elif artifact is not None:
            self._compiled = _load_artifact(artifact)
            self.artifact = artifact
        else:
            self._compiled = _compile(lifted, keep_artifact)
            if keep_artifact:
                self.artifact = _saved_whole(self._compiled)
        self.compile_seconds = time.perf_counter() - start
        # What the runtime calls: Engine.__call__ calls through it only where dynamo is off (core/inductor.py)
        self._code = unwrapped(self._compiled)
        self._bind(fence=False)
        mem = self.memory()
        log.info(
            "torchtrt_ext: built-in engine on %s: %d weights, %.1f MiB (%s), %s %.1f s",
            device,
            len(self._table),
            mem.weight_bytes / 2**20,
            "shared with the model, no copy" if mem.owned_bytes == 0 else f"{mem.owned_bytes / 2**20:.1f} MiB copied",
            "compiled code shared" if compiled_from is not None else "compiled code loaded in" if artifact is not None else "Inductor compile",
            self.compile_seconds,
        )

    def _arguments(self) -> list[Any]:
        args: list[Any] = [None] * self._num_args
        for position, tensor in zip(self._weight_positions, self._table):
            args[position] = tensor
        return args

    def compiled_call(self, *inputs: Any) -> tuple[Any, list[Any]]:
        """The compiled code (as the runtime calls it: without its disable wrapper) and its whole
        argument list (weights and these inputs), to call directly, bypassing the runtime: for measuring
        what the runtime's bridge costs per call."""
        args = self._arguments()
        for position, value in zip(self._input_positions, inputs):
            args[position] = value
        return self._code, args

    def _bind(self, fence: bool) -> None:
        """Hand the runtime the compiled code and the current weights; it assembles each call's
        arguments itself. fence: later calls on any stream first wait for the caller's stream."""
        self._runner.bind(
            self._code,
            self._arguments(),
            self._input_positions,
            weights_id=self._active_id,
            fence=fence,
            track=self.settings.refit_double_buffer,
        )

    def _execute(self, inputs: tuple[Any, ...], slot: int) -> list[torch.Tensor]:
        """Never called: the engine is always bound, and the runtime calls the compiled code itself."""
        raise TorchTRTExtError("internal error: a built-in engine ran without its runtime binding")

    def weight_index(self) -> Mapping[str, int]:
        return self._names

    def weight_tensors(self) -> Sequence[torch.Tensor]:
        return self._table

    def held_tensors(self) -> Sequence[torch.Tensor]:
        return self._table + (self._spare or [])

    def load_weights(self, values: Mapping[int, torch.Tensor]) -> None:
        self._load({**values, **self._requantized(values)})

    def _requantized(self, values: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """A quantized engine: the new values of the quantized weights made from these weights (quantized
        as the table will hold them, on the engine's device)."""
        return requantized(self.quantization, values, self._table.__getitem__, self.device)

    def quantized_weights(self) -> Mapping[str, torch.Tensor]:
        start = self.quantization.num_weights if self.quantization is not None else 0
        return {name: self._table[start + k] for k, name in enumerate(self._quantized_names)}

    def _load(self, values: Mapping[int, torch.Tensor]) -> None:
        if not values:
            return
        if self.settings.refit_double_buffer:
            self._load_double_buffered(values)
            return
        # In place: the table's addresses stay, so captured CUDA graphs stay valid. Calls in flight on
        # other streams may read a mix of old and new values (refit_double_buffer avoids that).
        copy_weights([self._table[i] for i in values], list(values.values()))
        self._bind(fence=True)

    def _load_double_buffered(self, values: Mapping[int, torch.Tensor]) -> None:
        # 1. Wait until no call still reads the inactive buffer (it was active before the last refit).
        self._runner.retire()
        # 2. Stage everything in the inactive buffer; the active one is untouched, so any failure
        #    here leaves the engine as it was.
        spare, stale = self._spare, self._spare_stale
        if spare is None:
            try:
                spare = [torch.empty_like(t) for t in self._table]
            except torch.OutOfMemoryError:
                need = sum(t.numel() * t.element_size() for t in self._table)
                raise RefitError(
                    f"out of memory allocating the second weight buffer ({need / 2**20:.1f} MiB) that "
                    "refit_double_buffer needs; the engine is unchanged. Free device memory, or refit "
                    "in place with refit_double_buffer=False"
                ) from None
            stale = None
        keep = [i for i in (range(len(self._table)) if stale is None else stale) if i not in values]
        try:
            copy_weights([spare[i] for i in keep] + [spare[i] for i in values], [self._table[i] for i in keep] + list(values.values()))
        except torch.OutOfMemoryError:
            self._spare, self._spare_stale = spare, None  # keep the allocation; its contents are unknown
            raise RefitError("out of memory while staging the new weights; the engine is unchanged") from None
        # 3. Switch at one point: calls from here on (on any stream) wait for the staging copies.
        self._spare, self._table = self._table, spare
        self._spare_stale = set(values)
        self._active_id ^= 1
        self._bind(fence=True)
        # 4. Where the buffer just made inactive is the model's own memory (the engine was built on it),
        #    the model takes the new values too (its state_dict, an eager call), copied from the active
        #    buffer. Calls that started before the switch may still read that memory on other streams:
        #    the copy waits until they end (retire), or they would compute with a mix of old and new.
        shared = [i for i in values if i < len(self._model_tensors) and _same_memory(self._spare[i], self._model_tensors[i]())]
        if shared:
            self._runner.retire()
            copy_weights([self._spare[i] for i in shared], [self._table[i] for i in shared])
            self._spare_stale.difference_update(shared)

    def follow(self, values: Mapping[int, torch.Tensor]) -> None:
        load = self._requantized(values)  # even where the engine reads the changed memory in place
        repointed = False
        for index, tensor in values.items():
            current = self._table[index]
            same_memory = (
                tensor.device == current.device
                and tensor.data_ptr() == current.data_ptr()
                and tensor.shape == current.shape
                and tensor.stride() == current.stride()
                and tensor.dtype == current.dtype
            )
            if same_memory:
                continue  # written in place: the engine reads that memory already
            if (
                not self.settings.refit_double_buffer
                and tensor.device == current.device
                and tensor.dtype == current.dtype
                and tensor.shape == current.shape
            ):
                self._table[index] = tensor.detach()  # replaced: read the new tensor in place
                repointed = True
            else:
                load[index] = tensor.detach()
        if repointed:
            if self.settings.cuda_graphs:
                self._runner.clear_graphs()  # graphs read the old addresses
            self._bind(fence=False)
        self._load(load)

    def memory(self) -> MemoryUse:
        model = [t for t in (r() for r in self._model_tensors) if t is not None]
        return weight_memory(self.device, self._table + (self._spare or []), model)


def _same_memory(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and a.data_ptr() == b.data_ptr()


def _saved_whole(compiled: Any) -> bytes | None:
    try:
        return _artifact_bytes(compiled)
    except Exception as exc:  # a graph AOTAutograd's cache refuses, caches disabled: say why
        log.warning("torchtrt_ext: Inductor could not save the compiled code whole (%s: %s); an engine cache hit "
                    "will compile the graph again", type(exc).__name__, str(exc).strip()[:300])
        return None
