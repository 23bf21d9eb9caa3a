"""Weight streaming, step 3: the segmented program, compiled segment by segment, and its execution.

The lifted graph is cut, in execution order, into segments that each first use a similar share of the
weight bytes, and each segment is compiled by Inductor on its own (weights are its inputs, as ever).
Every weight has one master copy in pinned host memory, packed per segment. A placement, made for a
device budget and changeable at run time without recompiling, keeps some weights resident on the
device and streams the others: while segment k computes on the caller's stream, a copy stream of the
execution slot fills a ring of RING_BUFFERS device buffers with the weights of segments k+1.., fenced both ways
with events (the copy waits until the ring buffer's previous segment has finished reading it; the
segment waits for its copy).

CUDA graphs (cuda_graphs=True): the runtime captures a whole streamed call, copies included. Under
capture, the copy stream joins the capture from a fork event recorded at the call's start, and every
fence is then a dependency inside the graph; a replay is ordered whole on its stream, so the ring needs
no fence across replays. A placement change drops the graphs (they read the old ring and resident
copies) while no call runs; a refit writes in place, so the graphs stay valid.

Cuts: partition.py. Which weights stay resident: placement.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import threading
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from ...core.errors import TorchTRTExtError
from ...core.inductor import compile_graph, quantizes
from ...core.lifting import LiftedGraph
from ...core.runtime import _C
from .partition import move_graph_to, partition, real_example
from .placement import Placement, aligned
from .placement import place as placement_of

log = logging.getLogger("torchtrt_ext")

DEFAULT_SEGMENTS = 24
# Ring buffers per execution slot: segment k+RING_BUFFERS is copied once segment k is done with its
# buffer. Two left the copy stream idle whenever one segment's compute ran long (H100, 8x512 at a 50%
# budget: 1.24x the floor with copies and compute each ~20 ms per step); three let it run a segment
# ahead.
RING_BUFFERS = 3


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclasses.dataclass
class _Segment:
    compiled: Callable[..., Any]
    args: list[tuple[str, int]]  # per placeholder: ("w", weight index) or ("v", env index)
    weights: list[int]  # weight indices used, in first-argument order


class _SlotState:
    """One execution slot's ring and fences. The fences are the runtime's CUDA events (_C.Event), and each
    segment's fences and copies are one runtime call: Python's stream contexts and event wrappers cost
    tens of microseconds per segment on a slow host, which a host-bound step pays in full."""

    def __init__(self, device_index: int, copy_stream: Any):
        self.copy_stream = copy_stream  # the runtime's _C.CopyStream (CUDA), None on the CPU
        self.copied: list[Any] = []
        self.freed: list[Any] = []
        if copy_stream is not None:
            self.copied = [_C.Event(device_index) for _ in range(RING_BUFFERS)]
            self.freed = [_C.Event(device_index) for _ in range(RING_BUFFERS)]
        # Per ring buffer, what its next copy waits for: the freed event once a segment has recorded it
        # (the end of the buffer's last reader), None before any has.
        self.free: list[Any] = [None] * RING_BUFFERS
        # Recorded on the caller's stream at the start of a call whose first copies must follow all the
        # caller's work so far: under capture (how the copy stream joins it), and in every call once the
        # slot has been captured (its freed events were last recorded inside a capture, where a record
        # marks a dependency of the graph, not a point a later call can wait for).
        self.fork = _C.Event(device_index) if copy_stream is not None else None
        self.captured = False
        self.version = -1
        self.ring: list[torch.Tensor] = []
        self.ring_storages: set[int] = set()
        self.views: list[list[list[torch.Tensor]]] = []  # [ring][segment] -> device views
        self.sources: list[list[torch.Tensor]] = []  # [segment] -> host masters of what it streams
        # Per segment, its arguments: the weight tensor to pass (resident copy or ring view), or the
        # index of a value in the call's environment. Built once per placement, read on every call.
        self.args: list[list[Any]] = []


class StreamedProgram:
    """The segmented, separately compiled graph and its streaming state (see the module doc)."""

    def __init__(self, lifted: LiftedGraph, device: torch.device, segments: int = DEFAULT_SEGMENTS):
        # CUDA is what streaming is for (and what the engine option requires); on the CPU the same
        # program runs with synchronous copies, which is how its logic is tested without a GPU.
        self.device = device
        self._cuda = device.type == "cuda"
        gm = lifted.gm
        move_graph_to(gm, device)
        self._exact_casts = quantizes(gm)  # decided for the whole graph: every segment rounds alike
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        weight_of = {lifted.weights[i].position: i for i in range(len(lifted.weights))}
        self._weights = [w.tensor for w in lifted.weights]
        self.total_bytes = sum(_nbytes(t) for t in self._weights)

        # 1. Cut points (see _partition).
        weight_nodes = {placeholders[p]: w for p, w in weight_of.items()}
        part = partition(gm, weight_nodes, [_nbytes(t) for t in self._weights], segments)
        split = split_module(gm, None, lambda n: part.get(n, 0), keep_original_order=True)

        # 2. A flat program over the split graph; each submodule compiled on its own.
        env_of: dict[torch.fx.Node, int] = {}
        self._input_env: list[int] = []  # env index of each caller input, in call order
        self._weight_env: dict[int, int] = {}
        self._steps: list[tuple] = []
        self.segments: list[_Segment] = []
        ph_index = 0
        input_positions = {p: k for k, p in enumerate(lifted.input_positions)}
        inputs_env: dict[int, int] = {}
        # Example values, real (uninitialised) tensors on the device: each segment is compiled for
        # what the compiled segments before it actually produce (their layouts may differ from the
        # captured graph's, as weights arrive contiguous), by running them once here.
        examples: dict[int, Any] = {}
        for node in split.graph.nodes:
            if node.op == "placeholder":
                env_of[node] = len(env_of)
                if ph_index in weight_of:
                    self._weight_env[env_of[node]] = weight_of[ph_index]
                else:
                    inputs_env[input_positions[ph_index]] = env_of[node]
                    examples[env_of[node]] = real_example(lifted.example_args[ph_index], self.device)
                ph_index += 1
            elif node.op == "call_module":
                sub = getattr(split, node.target)
                args = []
                for a in node.args:
                    idx = env_of[a]
                    args.append(("w", self._weight_env[idx]) if idx in self._weight_env else ("v", idx))
                env_of[node] = len(env_of)
                seg, out = self._compile(sub, args, examples)
                examples[env_of[node]] = out
                self.segments.append(seg)
                log.info(  # progress: a large model has a few dozen segments, each an Inductor compile
                    "torchtrt_ext: weight streaming: compiled segment %d of %d",
                    len(self.segments),
                    len(split.meta.get("partition_names", ())) or len(self.segments),
                )
                self._steps.append(("seg", len(self.segments) - 1, env_of[node]))
            elif node.op == "call_function" and node.target is operator.getitem:
                env_of[node] = len(env_of)
                examples[env_of[node]] = examples[env_of[node.args[0]]][node.args[1]]
                self._steps.append(("item", env_of[node.args[0]], node.args[1], env_of[node]))
            elif node.op == "output":
                self._outputs = [env_of[a] if isinstance(a, torch.fx.Node) else a for a in node.args[0]]
            else:
                raise TorchTRTExtError(f"weight streaming cannot run the split graph's node {node.format_node()}")
        self._input_env = [inputs_env[k] for k in range(len(lifted.input_positions))]
        self._env_size = len(env_of)
        # After each step, the env entries no later step or output reads: freed there, as Inductor would.
        last: dict[int, int] = {}
        for i, step in enumerate(self._steps):
            reads = [step[1]] if step[0] == "item" else [x for kind, x in self.segments[step[1]].args if kind == "v"]
            for x in reads:
                last[x] = i
        kept = {x for x in self._outputs if isinstance(x, int)}
        self._release: list[list[int]] = [[] for _ in self._steps]
        for x, i in last.items():
            if x not in kept:
                self._release[i].append(x)

        # 3. Master copies in pinned host memory, packed per segment of first use.
        first: dict[int, int] = {}
        for k, seg in enumerate(self.segments):
            for w in seg.weights:
                first.setdefault(w, k)
        self._masters: list[torch.Tensor] = [None] * len(self._weights)  # type: ignore[list-item]
        for k in range(len(self.segments)):
            mine = [w for w, s in first.items() if s == k]
            size = sum(aligned(_nbytes(self._weights[w])) for w in mine)
            pack = torch.empty(max(size, 1), dtype=torch.uint8)
            if self._cuda:
                pack = pack.pin_memory()
            offset = 0
            for w in mine:
                t = self._weights[w]
                view = pack[offset : offset + _nbytes(t)].view(t.dtype).view(t.shape)
                view.copy_(t.detach())
                self._masters[w] = view
                offset += aligned(_nbytes(t))
        for w, t in enumerate(self._weights):  # weights no segment reads (none expected)
            if self._masters[w] is None:
                self._masters[w] = t.detach().cpu().pin_memory() if self._cuda else t.detach().cpu().clone()
        self._weights = []  # the model's tensors are no longer needed here
        # What run() reads, published as one tuple (placement, resident copies) so that a call sees
        # one placement whole; place() and load() wait for calls in progress and hold new ones back.
        self._state: tuple[Placement, dict[int, torch.Tensor], int] | None = None  # with its version
        self._slots: dict[int, _SlotState] = {}
        self._copy_streams: dict[int, Any] = {}
        self._cond = threading.Condition()
        self._active = 0
        self._changing = False
        self._version = 0
        # Called while no call runs, before a placement change frees what captured CUDA graphs read
        # (the engine sets it to its runtime's clear_graphs).
        self.on_placement_change: Callable[[], None] | None = None

    @property
    def placement(self) -> Placement | None:
        return self._state[0] if self._state else None

    @property
    def _resident(self) -> dict[int, torch.Tensor]:
        return self._state[1] if self._state else {}

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """No call runs (and none has GPU work left) while the placement or the weights change."""
        with self._cond:
            while self._changing:
                self._cond.wait()
            self._changing = True
            while self._active:
                self._cond.wait()
        try:
            self._synchronize()
            yield
        finally:
            with self._cond:
                self._changing = False
                self._cond.notify_all()

    # --- build ------------------------------------------------------------------------------

    def _compile(
        self, sub: torch.fx.GraphModule, args: list[tuple[str, int]], examples: dict[int, Any]
    ) -> tuple[_Segment, Any]:
        """Compile one segment for its example inputs and run it once on them (uninitialised values:
        only the outputs' shapes and layouts matter, as examples for the segments after it)."""
        inputs = []
        for (kind, i), p in zip(args, (n for n in sub.graph.nodes if n.op == "placeholder")):
            if kind == "v":
                inputs.append(examples[i])
                continue
            val = p.meta.get("val", p.meta.get("example_value"))
            inputs.append(torch.empty(tuple(val.shape), dtype=val.dtype, device=self.device))  # packed: contiguous
        compiled = compile_graph(sub, inputs, self._exact_casts)
        with torch.no_grad():
            out = compiled(*inputs)
        weights = [i for kind, i in args if kind == "w"]
        return _Segment(compiled, args, weights), out

    # --- placement ----------------------------------------------------------------------------

    def place(self, budget: int) -> Placement:
        """Keep up to `budget` bytes of weights resident; stream the rest. Waits until no call runs."""
        sizes = [_nbytes(m) for m in self._masters]
        placement = placement_of(sizes, [seg.weights for seg in self.segments], budget)
        with self._exclusive():  # no call runs; none has GPU work left
            if self.on_placement_change is not None:
                self.on_placement_change()
            self._slots.clear()  # rings are sized per placement (dropped first: less peak memory)
            self._version += 1
            old = self._resident
            fresh = {
                w: old[w] if w in old else self._masters[w].to(self.device, non_blocking=True) for w in sorted(placement.resident)
            }
            del old
            self._state = None
            self._synchronize()  # the resident copies have arrived before any call reads them
            self._state = (placement, fresh, self._version)
        log.info(
            "torchtrt_ext: weight streaming: %.1f of %.1f MiB resident (budget %.1f MiB), %d segments, ring %d x %.1f MiB",
            self.placement.resident_bytes / 2**20,
            sum(sizes) / 2**20,
            budget / 2**20,
            len(self.segments),
            RING_BUFFERS,
            placement.ring_bytes / 2**20,
        )
        return placement

    # --- execution ----------------------------------------------------------------------------

    def _slot(self, slot: int, placement: Placement, resident: dict[int, torch.Tensor], version: int) -> _SlotState:
        st = self._slots.get(slot)
        if st is None or st.version != version:
            st = _SlotState(self._device_index() if self._cuda else -1, self._copy_stream(slot))
            st.version = version
            if placement.ring_bytes:
                st.ring = [torch.empty(placement.ring_bytes, dtype=torch.uint8, device=self.device) for _ in range(RING_BUFFERS)]
            for r in range(RING_BUFFERS if placement.ring_bytes else 0):
                per = []
                for ws, offs in zip(placement.streamed, placement.offsets):
                    per.append(
                        [
                            st.ring[r][o : o + _nbytes(self._masters[w])].view(self._masters[w].dtype).view(self._masters[w].shape)
                            for w, o in zip(ws, offs)
                        ]
                    )
                st.views.append(per)
            st.ring_storages = {t.untyped_storage().data_ptr() for t in st.ring}
            st.sources = [[self._masters[w] for w in ws] for ws in placement.streamed]
            for k, seg in enumerate(self.segments):
                where = dict(zip(placement.streamed[k], st.views[k % RING_BUFFERS][k])) if placement.streamed[k] else {}
                st.args.append([(resident[w] if w in resident else where[w]) if kind == "w" else w for kind, w in seg.args])
            self._slots[slot] = st
        return st

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """Around a call: waits while the placement or the weights change, which wait for it in turn.
        The engine holds it around its runtime call (a CUDA-graph replay never enters Python), before it
        takes an execution slot: a change waiting for calls never waits for a caller waiting for it."""
        with self._cond:
            while self._changing:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def _copy_stream(self, slot: int) -> Any:
        """The slot's copy stream: the runtime's own (a pool stream could be the caller's, and copies
        on it would wait behind the compute), made once per slot and kept across placements."""
        if not self._cuda:
            return None
        stream = self._copy_streams.get(slot)
        if stream is None:
            stream = self._copy_streams[slot] = _C.CopyStream(self._device_index())
        return stream

    def _device_index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def execute(self, inputs: Sequence[Any], slot: int) -> list[Any]:
        if self._state is None:
            raise TorchTRTExtError("weight streaming has no placement yet")
        placement, resident, version = self._state  # one placement for the whole call
        st = self._slot(slot, placement, resident, version)
        cuda = self._cuda
        device = self._device_index() if cuda else -1
        n = len(self.segments)
        masters = self._masters
        rings = st.ring_storages
        streamed_at = placement.streamed
        sources = st.sources

        capturing = cuda and torch.cuda.is_current_stream_capturing()
        if capturing:
            st.captured = True
        forked = capturing or st.captured
        if forked:
            _C.current_record(device, st.fork)
        # What each ring buffer's next copy waits for (see _SlotState.free), updated by this call's
        # segments. A forked call starts from its own start and keeps its fences to itself.
        free = [st.fork] * RING_BUFFERS if forked else st.free

        def issue(j: int) -> None:
            if not streamed_at[j]:
                return
            r = j % RING_BUFFERS
            if not cuda:
                for view, src in zip(st.views[r][j], sources[j]):
                    view.copy_(src)
                return
            # On the copy stream: wait until ring buffer r is free, fill it, mark it filled.
            _C.copy_async(st.views[r][j], sources[j], st.copy_stream, free[r], st.copied[r])

        def unalias(value: Any) -> Any:
            """An output that views a ring buffer (a transposed weight, say) must outlive the buffer."""
            if isinstance(value, torch.Tensor):
                return value.clone() if value.untyped_storage().data_ptr() in rings else value
            if isinstance(value, (tuple, list)):
                return type(value)(unalias(v) for v in value)
            return value

        env: list[Any] = [None] * self._env_size
        for k, idx in enumerate(self._input_env):
            env[idx] = inputs[k]
        for j in range(min(RING_BUFFERS, n)):
            issue(j)
        for i, step in enumerate(self._steps):
            if step[0] == "item":
                _, src, item, dst = step
                env[dst] = env[src][item]
            else:
                _, k, dst = step
                seg = self.segments[k]
                streamed = streamed_at[k]
                if streamed and cuda:
                    _C.current_wait(device, st.copied[k % RING_BUFFERS])
                try:
                    args = [env[a] if a.__class__ is int else a for a in st.args[k]]
                    out = seg.compiled(*args)
                    del args
                    env[dst] = unalias(out) if streamed else out
                finally:
                    if streamed and cuda:  # also after an error: later copies must not overtake this segment
                        _C.current_record(device, st.freed[k % RING_BUFFERS])
                        free[k % RING_BUFFERS] = st.freed[k % RING_BUFFERS]
                if k + RING_BUFFERS < n:
                    issue(k + RING_BUFFERS)
            for x in self._release[i]:
                env[x] = None
        outputs = []
        for x in self._outputs:
            if isinstance(x, int) and x in self._weight_env:  # a weight returned as it is
                w = self._weight_env[x]
                outputs.append(resident[w] if w in resident else masters[w].to(self.device))
            else:
                outputs.append(env[x] if isinstance(x, int) else x)
        return outputs

    # --- weights ------------------------------------------------------------------------------

    def weight(self, index: int) -> torch.Tensor:
        """The weight as the engine holds it: its resident device copy, else its host master."""
        return self._resident.get(index, self._masters[index])

    def load(self, values: dict[int, torch.Tensor]) -> None:
        """New values into the host masters and the resident copies (waits for in-flight calls)."""
        with self._exclusive():
            resident = self._resident
            for w, v in values.items():
                self._masters[w].copy_(v)
                if w in resident:
                    resident[w].copy_(v)
            self._synchronize()

    def _synchronize(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def memory(self) -> tuple[int, int]:
        """(resident weight bytes, ring bytes over all execution slots) on the device."""
        ring = sum(_nbytes(t) for st in list(self._slots.values()) for t in st.ring)
        return sum(_nbytes(t) for t in self._resident.values()), ring
