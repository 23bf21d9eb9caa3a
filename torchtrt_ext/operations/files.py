"""``torchtrt_ext.save`` and the reading side of ``torchtrt_ext.load``: compiled modules as single files (layout in
engine_file.py), loaded in bounded host memory.

A file holds the settings, each compiled input signature's graph (``torch.export`` programs with their
weights left out), the weights once (raw, aligned, checksummed) unless stripped, and Inductor's compiled
artifacts, so that loading recompiles from Inductor's caches instead of from scratch. A quantized
compile (precision 'int8'/'fp8') keeps its calibration cache (its text, in the settings), each graph's
quantization plan and the engines' quantized weights and scales (stripped with the weights): a loaded
engine computes with those, checked to be the quantization of the file's weights, without calibrating. Where an engine
kept its compiled code saved whole (compiled with cache_dir), the file holds that too, with what binds
it to the model (header "artifacts", one per graph or null): loading then compiles nothing. Loading reads
every region through a few small reusable staging buffers (pinned, for a CUDA target; read in
parallel) straight into its place on the device: host memory grows by the staging buffers and the
graphs, never by the weights.
"""

from __future__ import annotations

import copy
import io
import logging
import time
from typing import Any

import sympy
import torch
from torch._guards import detect_fake_mode

from ..core import engine_file, quantize, trees
from ..core.engine_file import Artifact, Blob, EngineFile, Header, Quantization, TensorEntry, tensor_bytes
from ..core.quantize_pass import QuantPlan
from ..core.settings import Settings
from ..core.errors import EngineFileError, TorchTRTExtError
from ..engines.quantized import SavedQuantization
from ..engines.tensorrt import tensorrt_version
from .program import CompiledProgram

log = logging.getLogger("torchtrt_ext")

STAGING_BUFFERS = 8  # pinned staging buffers for a device target, each read by its own thread
STAGING_BYTES = 8 * 2**20  # each; 64 MiB in all, whatever the file's size


def _device_info(device: torch.device) -> engine_file.Device:
    info = engine_file.Device(type=device.type, index=device.index)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.name, info.capability = props.name, f"{props.major}.{props.minor}"
    return info


def _meta(value: Any) -> Any:
    if isinstance(value, torch.nn.Parameter):
        return torch.nn.Parameter(value.detach().to("meta"), requires_grad=value.requires_grad)
    if isinstance(value, torch.Tensor):
        return value.detach().to("meta")
    return value


def _program_bytes(ep: torch.export.ExportedProgram) -> bytes:
    """The exported program with its weights and example inputs left out (they are meta tensors)."""
    light = copy.copy(ep)
    light._state_dict = {k: _meta(v) for k, v in ep.state_dict.items()}
    light._constants = {k: _meta(v) for k, v in ep.constants.items()}
    light._example_inputs = None
    buffer = io.BytesIO()
    torch.export.save(light, buffer)
    return buffer.getvalue()


def save(compiled: Any, path: str, include_weights: bool = True) -> int:
    """Write `compiled` (from ``torchtrt_ext.compile``) to one file at `path`; returns its size in bytes.

    include_weights=False writes a weight-stripped file: small, and usable after
    ``torchtrt_ext.refit(loaded, checkpoint)``.
    """
    if not isinstance(compiled, CompiledProgram):
        raise TypeError(f"save takes what torchtrt_ext.compile returned, got {type(compiled).__name__}")
    if compiled.uses_dynamo or not compiled.variants:
        raise TorchTRTExtError(
            "save needs a module compiled through torch.export, called (or given example_inputs) at least "
            "once; this one " + ("runs through dynamo (graph breaks)" if compiled.uses_dynamo else "has no compiled graph yet")
        )
    if compiled.settings.weight_streaming:
        raise TorchTRTExtError("saving weight-streaming engines is not supported yet; save a resident compile")
    # the model's weights changed since the last call (in place, load_state_dict): the engines follow
    # first, so that what is written is one state (a quantized engine's weights re-made from the new ones)
    compiled.sync_weights()
    return write_variants(compiled, compiled.variants, path, include_weights)


def write_variants(compiled: CompiledProgram, variants: list, path: str, include_weights: bool) -> int:
    """Write these variants of `compiled` (save, and the engine cache, which writes one at a time).
    Constants (non-persistent buffers, lifted tensors) are written even when the weights are stripped:
    no checkpoint holds them."""
    start = time.perf_counter()
    # Weights: the engines' current values (after refits), else the model's; each tensor once.
    current: dict[str, torch.Tensor] = {}
    for variant in variants:
        current.update(variant.engine.named_weights())
    tensors: list[TensorEntry] = []
    regions: list[tuple[Any, torch.Tensor]] = []
    seen: dict[tuple, TensorEntry] = {}
    for variant in variants:
        ep = variant.exported
        for kind, table in (("state", ep.state_dict), ("constant", ep.constants)):
            for name, value in table.items():
                if not isinstance(value, torch.Tensor) or any(name in t.names for t in tensors):
                    continue
                value = current.get(name, value)
                key = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
                if key in seen:  # tied: one region, several names
                    seen[key].names.append(name)
                    continue
                entry = TensorEntry(
                    name=name,
                    names=[name],
                    kind=kind,
                    parameter=isinstance(table[name], torch.nn.Parameter),
                    dtype=str(value.dtype).removeprefix("torch."),
                    shape=list(value.shape),
                )
                seen[key] = entry
                tensors.append(entry)
                if include_weights or kind == "constant":
                    regions.append((entry, tensor_bytes(value)))
    # Quantized engines: each graph's plan, and the engine's quantized weights and scales (made from the
    # weights above, so stripped with them: a refit re-quantizes), each name once.
    plans: list[Quantization | None] = []
    for variant in variants:
        quantized = variant.engine.quantized_weights()
        plans.append(_plan_entry(variant.engine.quantization, list(quantized), compiled.settings))
        for name, value in quantized.items():
            if not any(name in t.names for t in tensors):
                entry = TensorEntry(name, [name], "quantized", False, str(value.dtype).removeprefix("torch."), list(value.shape))
                tensors.append(entry)
                if include_weights:
                    regions.append((entry, tensor_bytes(value)))
    programs: list[Blob] = []
    for variant in variants:
        entry = Blob(name=f"program {len(programs)}")
        programs.append(entry)
        regions.append((entry, torch.frombuffer(bytearray(_program_bytes(variant.exported)), dtype=torch.uint8)))
    # Each graph's compiled code saved whole, where its engine has it: loading it compiles nothing.
    saved_code: list[Artifact | None] = []
    for variant in variants:
        binding = variant.binding() if variant.engine.artifact is not None else None
        entry = None if binding is None else Artifact(name=f"artifact {len(saved_code)}", binding=binding)
        saved_code.append(entry)
        if entry is not None:
            regions.append((entry, torch.frombuffer(bytearray(variant.engine.artifact), dtype=torch.uint8)))
    cache = None
    try:
        artifacts = torch.compiler.save_cache_artifacts()
    except Exception as exc:  # an optional speed-up: say why it is missing
        log.warning("torchtrt_ext: Inductor's cache artifacts could not be saved (%s); load will recompile", exc)
        artifacts = None
    if artifacts is not None:
        cache = Blob(name="inductor cache")
        regions.append((cache, torch.frombuffer(bytearray(artifacts[0]), dtype=torch.uint8)))
    device = variants[0].engine.device
    header = Header(
        torch=torch.__version__,
        tensorrt=tensorrt_version(),
        engine=variants[0].engine.kind,
        device=_device_info(device),
        settings=compiled.settings.as_dict(),
        model=type(compiled.model).__name__,
        # How calls were normalised (which arguments may be positional): the loaded module does the same.
        forward_parameters=[
            (p.name, p.kind.name, p.default is not p.empty) for p in compiled.forward_signature.parameters.values()
        ],
        weights_included=include_weights,
        tensors=tensors,
        programs=programs,
        artifacts=saved_code,
        inductor_cache=cache,
        quantization=plans,
    )
    size = engine_file.write(path, header, regions)
    log.info("torchtrt_ext: saved %s (%.1f MiB) in %.1f s", path, size / 2**20, time.perf_counter() - start)
    return size


class Contents:
    """A checked engine file in memory: its header, every tensor by name (on the device), every blob."""

    def __init__(self, path: str, header: Header, values: dict[str, torch.Tensor], blobs: dict[str, bytes]):
        self.path = path
        self.header = header
        self.values = values  # each tensor name (tied names too) -> its tensor
        self._blobs = blobs  # region name -> bytes
        self._programs: dict[int, torch.export.ExportedProgram] = {}

    def load_inductor_cache(self) -> None:
        """Put Inductor's cache artifacts (autotuning results, compiled graphs) into its caches."""
        cache = self.header.inductor_cache
        if cache is not None:
            torch.compiler.load_cache_artifacts(self._blobs.pop(cache.name))

    def program(self, index: int) -> torch.export.ExportedProgram:
        """Graph `index` as an ExportedProgram (torch.export.load, once) holding the file's tensors."""
        if index in self._programs:
            return self._programs[index]
        entry = self.header.programs[index]
        blob = self._blobs[entry.name]
        trees.prepare(bytes(blob))  # the model's cache classes, where its specs name them
        try:
            ep = torch.export.load(io.BytesIO(blob))
        except Exception as exc:
            raise EngineFileError(f"{self.path}: {entry.name} could not be read ({exc})") from None
        for name, spec in (("inputs", ep.call_spec.in_spec), ("outputs", ep.call_spec.out_spec)):
            trees.check(spec, f"{self.path}: the {name} of {entry.name}")
        ep._state_dict = {k: _as_saved(v, self.values[k]) for k, v in ep.state_dict.items()}
        ep._constants = {k: self.values.get(k, v) for k, v in ep.constants.items()}
        _drop_expression_hints(ep)
        self._programs[index] = ep
        return ep


    def quantization(self, index: int) -> SavedQuantization | None:
        """Graph `index`'s quantization plan and the quantized weights the file holds for it (none where
        it was saved without weights), or None at the model's precision."""
        q = self.header.quantization[index]
        if q is None:
            return None
        plan = QuantPlan(
            fmt=quantize.quant_format(q.format), sources=tuple(q.sources), num_weights=q.num_weights,
            num_placeholders=q.num_placeholders, layers=tuple(q.layers), uncovered=tuple(q.uncovered),
            transposed=tuple(q.transposed),
        )
        tensors = {name: self.values[name] for name in q.tensors} if self.header.weights_included else {}
        return SavedQuantization(plan, tensors, f"{self.path} (graph {index})")

    def artifact(self, index: int) -> tuple[bytes, dict] | None:
        """Graph `index`'s compiled code saved whole and what binds it (wrapper._Variant.binding), or
        None where the file has none for it (written without cache_dir, or Inductor could not save it)."""
        entry = self.header.artifacts[index]
        return None if entry is None else (self._blobs[entry.name], entry.binding)


def read(path: str, device: str | torch.device | None = None, own: dict[str, torch.Tensor] | None = None) -> Contents:
    """Read and check a whole file: the weights onto the device (for the names in `own`, those tensors
    instead: the engine cache binds the live model's), the blobs into host memory. Raises
    EngineFileError, having returned nothing, on any fault."""
    with EngineFile(path) as f:
        header = f.header  # every field already checked (engine_file.Header.from_json)
        target = _target_device(path, header.device, device)
        # Blobs (small, on the host) and the weights (straight to the device), read and checked together.
        blobs = header.blobs()
        jobs = []
        hosts = []
        for entry in blobs:
            hosts.append(torch.empty(entry.region.padded, dtype=torch.uint8))
            jobs.append((entry, hosts[-1]))
        values: dict[str, torch.Tensor] = {}
        for entry in header.tensors:
            dtype, shape, nbytes = entry.torch_dtype, tuple(entry.shape), entry.data_nbytes
            mine = [own[n] for n in entry.names if own is not None and n in own]
            if entry.region is None and entry.kind == "quantized":
                continue  # made from the weights the engine is given (Contents.quantization)
            if mine:
                tensor = mine[0]
                if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                    raise EngineFileError(f"{path}: {entry.name!r} is {tensor.dtype} {tuple(tensor.shape)} in the model, {dtype} {shape} in the file")
            else:
                room = torch.empty(engine_file.aligned(nbytes), dtype=torch.uint8, device=target)
                if entry.region is not None:
                    jobs.append((entry, room))
                else:  # a stripped weight: zeros until a refit (a quantized engine quantizes them meanwhile)
                    room.zero_()
                tensor = room[:nbytes].view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype, device=target)
            for name in entry.names:
                values[name] = tensor
        staging = None
        if any(into.device.type == "cuda" for _, into in jobs):  # a stripped entry has none: no pinning
            staging = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(STAGING_BUFFERS)]
        f.read_regions(jobs, staging)
        data = {entry.name: bytes(engine_file.host_view(host)[: entry.region.nbytes]) for host, entry in zip(hosts, blobs)}
        if target.type == "cuda":
            torch.cuda.synchronize(target)
    return Contents(path, header, values, data)


def _plan_entry(plan: QuantPlan | None, tensors: list[str], settings: Settings) -> Quantization | None:
    if plan is None:
        return None
    return Quantization(
        format=plan.fmt.name, calibration=settings.calibration.digest(), sources=list(plan.sources), num_weights=plan.num_weights,
        num_placeholders=plan.num_placeholders, layers=list(plan.layers), uncovered=list(plan.uncovered),
        transposed=list(plan.transposed), tensors=tensors,
    )


def _as_saved(meta: Any, value: torch.Tensor) -> Any:
    if isinstance(meta, torch.nn.Parameter):
        return torch.nn.Parameter(value, requires_grad=False)
    return value


def _describe(saved: engine_file.Device) -> str:
    where = saved.type + (f":{saved.index}" if saved.index is not None else "")
    return where + (f" ({saved.name}, compute capability {saved.capability})" if saved.name else "")


def _target_device(path: str, saved: engine_file.Device, device: str | torch.device | None) -> torch.device:
    try:
        wanted = torch.device(device) if device is not None else torch.device(saved.type, saved.index)
    except RuntimeError as exc:
        raise EngineFileError(f"{path}: the header's device {_describe(saved)} is not a device ({exc}) (corrupt file)") from None
    described = _describe(saved)
    if wanted.type != saved.type:
        raise EngineFileError(
            f"{path} was saved from an engine on {described}; it loads on {saved.type} devices only, not on "
            f"{wanted.type} (compile and save the model on {wanted.type} for that)"
        )
    if wanted.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineFileError(f"{path} was saved from an engine on {described}, and this machine has no CUDA device")
        if wanted.index is None:
            wanted = torch.device("cuda", torch.cuda.current_device())
        if wanted.index != saved.index:
            raise EngineFileError(
                f"{path} was saved from cuda:{saved.index}; loading on {wanted} is not supported yet "
                f"(load with device='cuda:{saved.index}')"
            )
    return wanted


def inspect(path: str) -> str:
    """A readable description of an engine file: header, tensors and sizes (checks the header only)."""
    with EngineFile(str(path)) as f:
        h = f.header
        lines = [
            f"{path}: torchtrt_ext engine file, format version {h.format_version}, {f.size} bytes",
            f"  saved by torch {h.torch}, TensorRT {h.tensorrt or 'absent'}; engine {h.engine} on " + _describe(h.device),
            f"  model {h.model}; weights {'included' if h.weights_included else 'stripped'}",
            "  settings: " + ", ".join(f"{k}={_setting(k, v)}" for k, v in sorted(h.settings.items())),
            f"  {len(h.programs)} graph(s), {sum(a is not None for a in h.artifacts)} with compiled code; "
            f"Inductor cache {'included' if h.inductor_cache else 'absent'}",
            f"  {len(h.tensors)} tensors:",
        ]
        total = 0
        for t in h.tensors:
            total += t.data_nbytes
            kind = " (quantized)" if t.kind == "quantized" else ""
            lines.append(f"    {', '.join(t.names)}: {t.dtype} {tuple(t.shape)} {t.data_nbytes} bytes{kind}")
        lines.append(f"  weights: {total} bytes ({total / 2**20:.1f} MiB)")
        for i, q in enumerate(h.quantization):
            if q is not None:
                lines.append(
                    f"  graph {i}: {q.format}, {len(q.layers)} layer(s) quantized, {len(q.uncovered)} at the model's dtype; "
                    f"calibration cache {q.calibration[:16]}"
                )
    return "\n".join(lines)


def _setting(name: str, value: Any) -> str:
    if name == "calibration" and isinstance(value, str):  # a cache's whole text: its size only
        return f"<a calibration cache of {max(len(value.splitlines()) - 5, 0)} entries>"
    return repr(value)


def _drop_expression_hints(ep: torch.export.ExportedProgram) -> None:
    """torch.export.load (torch 2.11-2.13) records size hints for derived expressions (`7*s43: 14`)
    among the shape environment's variables, where Inductor expects symbols only: compiling the loaded
    graph failed with "expected sympy.Symbol" (GPT-2). The hints of the symbols themselves are kept."""
    fake_mode = detect_fake_mode([n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"])
    hints = getattr(getattr(fake_mode, "shape_env", None), "backed_var_to_val", None)
    if isinstance(hints, dict):
        for key in [k for k in hints if not isinstance(k, sympy.Symbol)]:
            del hints[key]
