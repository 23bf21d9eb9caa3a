"""The drop-in wrapper: ``torchtrt_ext.compile(model, example_inputs=...)`` returns an ``nn.Module``.

The returned module takes the same arguments and returns the same structure as the original, and
shares the original's parameters, buffers and submodules (so ``state_dict()``, ``parameters()`` and
``load_state_dict`` see the same names and tensors). Calls run on engines built from ``torch.export``
graphs, one per input signature (structure, dtypes, devices, static sizes, dynamic-size ranges): a
call that fits none gets a new variant, up to ``max_variants``. When export cannot capture the model
(``frontend='auto'``), the wrapper falls back to dynamo, which splits the graph at unsupported code.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import os
import threading
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from . import engine_cache, lifting, registry
from .backend import torchtrt_ext_backend
from .engines import Engine, build_engine, resolve_kind
from ._runtime import WeightWatch
from .errors import EngineFileError, InputError, RefitError, TorchTRTExtError
from .refit import weight_mismatch
from .settings import Settings
from .signature import InputSignature

log = logging.getLogger("torchtrt_ext")


class _Variant:
    """One compiled input signature: its engine, the in-place updates its graph returns first (the
    model's buffers, such as BatchNorm statistics in training mode, or caller inputs changed in place),
    and the structure of the outputs."""

    def __init__(
        self,
        engine: Engine,
        signature: InputSignature,
        out_spec: pytree.TreeSpec,
        updates: Sequence[torch.Tensor | int],
        description: dict,
    ):
        self.engine = engine
        self.signature = signature
        self.out_spec = out_spec
        self._updates = list(updates)  # per leading graph output: a model buffer, or a caller-input index
        # JSON: where the weights and inputs go (LiftedGraph.describe) and what the updates are (a
        # buffer's name, or a caller-input index): with the signature and out_spec, all that binds the
        # engine's compiled code to a model again (binding()).
        self._description = description
        self._exported: torch.export.ExportedProgram | None = None  # the graph it was built from
        self._read_exported: Callable[[], torch.export.ExportedProgram] | None = None  # or how to get it
        self.from_cache = False  # built from an engine cache entry

    @property
    def exported(self) -> torch.export.ExportedProgram | None:
        """The graph (save needs it). A variant built from compiled code alone deserializes it the first
        time (torch.export.load of the graph bytes read with the engine file, kept in memory)."""
        if self._exported is None and self._read_exported is not None:
            self._exported = self._read_exported()
            self._read_exported = None
        return self._exported

    @exported.setter
    def exported(self, ep: torch.export.ExportedProgram | None) -> None:
        self._exported = ep

    def binding(self) -> dict | None:
        """What an engine file holds with the compiled code (JSON), checked to read back; None, with a
        warning, where something cannot be written down (an input or output structure of a type
        without a serialized name, say): the file then holds the graph alone."""
        try:
            binding = {
                **self._description,
                "signature": self.signature.to_json(),
                "out_spec": pytree.treespec_dumps(self.out_spec),
            }
            InputSignature.from_json(binding["signature"])
            pytree.treespec_loads(binding["out_spec"])
        except Exception as exc:
            log.warning("torchtrt_ext: the compiled code is not kept in the engine file (%s)", _first_line(exc))
            return None
        return binding

    def __call__(self, flat: Sequence[Any]) -> Any:
        outputs = self.engine(*flat)
        if self._updates:
            with torch.no_grad():
                for target, value in zip(self._updates, outputs):
                    (flat[target] if isinstance(target, int) else target).copy_(value)
            outputs = outputs[len(self._updates) :]
        return pytree.tree_unflatten(outputs, self.out_spec)


class CompiledModule(torch.nn.Module):
    """An ``nn.Module`` that runs the original module's forward on torchtrt_ext engines."""

    def __init__(self, module: torch.nn.Module, settings: Settings):
        super().__init__()
        # Share the original's structure: parameters, buffers and submodules are the original's own.
        self._parameters = module._parameters
        self._buffers = module._buffers
        self._non_persistent_buffers_set = module._non_persistent_buffers_set
        self._modules = module._modules
        self.training = module.training
        self.__dict__["_original"] = module  # not a submodule: state_dict names stay the original's
        self.settings = settings
        self._variants: list[_Variant] = []
        self._dynamo: Any = None
        self._forward_signature = inspect.signature(module.forward)
        self._watch, self._watched, self._watched_names = _watch_weights(module)
        self._weights_lock = threading.RLock()
        self._weights_missing = False  # loaded from a weight-stripped file, not refitted yet

    @property
    def state_dict_names(self) -> frozenset[str]:
        """The original module's state_dict names (parameters and persistent buffers)."""
        names = self.__dict__.get("_state_dict_names")
        if names is None:
            names = self.__dict__["_state_dict_names"] = frozenset(self.original.state_dict(keep_vars=True))
        return names

    @property
    def weight_names(self) -> frozenset[str]:
        """Every parameter and buffer name of the original module (tied ones under each name)."""
        names = self.__dict__.get("_weight_names")
        if names is None:
            names = self.__dict__["_weight_names"] = frozenset(self._watched_names)
        return names

    def _follow_weights(self) -> None:
        """Auto-refit: where the model's weights were replaced or written in place since the last
        call (load_state_dict, an optimizer step, assignment), make the engines use the new values.
        One pass of the runtime's WeightWatch when nothing changed."""
        if not self._watch.changed() or self.settings.refit == "none":
            return
        with self._weights_lock:  # a refit on another thread may be loading these very weights
            changed = self._watch.changed()
            if changed:
                self._follow(changed)

    def _follow(self, changed: list[int]) -> None:
        current: dict[str, torch.Tensor] = {}
        for i in changed:
            owner, key = self._watched[i]
            value = owner.get(key)
            if isinstance(value, torch.Tensor):
                current[self._watched_names[i]] = value
        engines = self.engines
        problems: dict[str, str] = {}
        indexes = [self.weight_names_of(engine) for engine in engines]
        for engine, index in zip(engines, indexes):  # everything checked before any engine changes
            tensors = engine.weight_tensors()
            any_device = engine.settings.weight_streaming  # the engine copies weights from anywhere
            for name, t in current.items():
                if name in index and not _follows(t, tensors[index[name]], any_device):
                    old = tensors[index[name]]
                    problems[name] = (
                        f"is now {tuple(t.shape)} {t.dtype} on {t.device}, but the engine was compiled for "
                        f"{tuple(old.shape)} {old.dtype} on {old.device}"
                    )
        if problems:
            raise RefitError(
                f"{type(self.original).__name__}'s weights changed in a way the compiled engines cannot "
                "follow; compile the model again with torchtrt_ext.compile:\n"
                + "\n".join(f"  {n}: {p}" for n, p in sorted(problems.items())),
                problems,
            )
        for engine, index in zip(engines, indexes):
            with engine.refit_lock:
                engine.follow({index[name]: t for name, t in current.items() if name in index})
            registry.add(engine, list(engine.weight_tensors()))
        for i in changed:
            self._watch.accept(i)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._follow_weights()  # now, so that a weight the engines cannot take fails here
        return result

    @property
    def original(self) -> torch.nn.Module:
        return self.__dict__["_original"]

    @property
    def uses_dynamo(self) -> bool:
        """Whether calls go through dynamo (frontend='dynamo', or export could not capture the model)."""
        return self._dynamo is not None

    def weight_names_of(self, engine: Engine) -> Mapping[str, int]:
        """The model's names of an engine's weights (name -> weight index). Dynamo's engines name them
        relative to the frame it captured, so they are matched by tensor."""
        return registry.names_in(engine, self.original) if self._dynamo is not None else engine.weight_index()

    @property
    def engines(self) -> list[Engine]:
        """The engines serving this module (one per compiled variant, or per dynamo graph)."""
        if self._dynamo is not None:
            return registry.engines_of(self.original)
        return [v.engine for v in self._variants]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)  # e.g. a Hugging Face model's .config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._weights_missing:
            raise RefitError(
                "this module was loaded from a weight-stripped engine file and has no weights yet: "
                "torchtrt_ext.refit(module, checkpoint) first"
            )
        self._follow_weights()
        if self._dynamo is not None:
            return self._dynamo(*args, **kwargs)
        args, kwargs = self._normalize(args, kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        for variant in self._variants:
            if variant.signature.mismatch(spec, flat) is None:
                return variant(flat)
        variant = self._add_variant(args, kwargs, flat, spec)
        return self._dynamo(*args, **kwargs) if variant is None else variant(flat)

    def _normalize(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """One form per call: arguments that can be positional are, the rest sorted by name."""
        if not kwargs:
            return args, kwargs
        try:
            bound = self._forward_signature.bind(*args, **kwargs)
        except TypeError:
            return args, dict(sorted(kwargs.items()))  # the forward itself will say what is wrong
        return bound.args, dict(sorted(bound.kwargs.items()))

    def _add_variant(self, args: tuple, kwargs: dict, flat: list, spec: pytree.TreeSpec) -> _Variant | None:
        if not self.settings.weight_streaming:  # streaming: the inputs give the device, the model may stay on the host
            self._check_devices(flat)
        if len(self._variants) >= self.settings.max_variants:
            reason = self._variants[0].signature.mismatch(spec, flat)
            raise InputError(
                f"this call fits none of the {len(self._variants)} compiled input signatures (against the "
                f"first: {reason}) and max_variants={self.settings.max_variants} is reached; raise "
                "max_variants or call with inputs like those already compiled"
            )
        first = not self._variants
        if self.settings.frontend == "dynamo":
            self._use_dynamo()
            return None
        digest = None
        if self.settings.cache_dir and not self.settings.weight_streaming:
            digest = engine_cache.key(self.original, spec, flat, self.settings)
            variant = self._variant_from_cache(digest, spec, flat)
            if variant is not None:
                self._variants.append(variant)
                return variant
        try:
            ep = self._export(args, kwargs)
        except Exception as exc:
            if self.settings.frontend == "export" or not first:
                raise
            log.warning(
                "torchtrt_ext: torch.export could not capture %s.forward (%s); using dynamo, which splits "
                "the graph at the code export cannot trace",
                type(self.original).__name__,
                _first_line(exc),
            )
            self._use_dynamo()
            return None
        variant = self._variant_from_export(ep, spec, flat, keep_artifact=digest is not None)
        if digest is not None:
            if not variant._updates:  # one run first: Inductor's autotuning results then travel in the entry
                with torch.no_grad():
                    variant.engine(*flat)
            self._store_in_cache(digest, variant)
        if not first:
            log.info(
                "torchtrt_ext: compiled input signature %d of at most %d for %s",
                len(self._variants) + 1,
                self.settings.max_variants,
                type(self.original).__name__,
            )
        self._variants.append(variant)
        return variant

    def _variant_from_export(
        self,
        ep: torch.export.ExportedProgram,
        spec: pytree.TreeSpec,
        flat: Sequence[Any] | None = None,
        keep_artifact: bool = False,
    ) -> _Variant:
        """Build the engine of one exported graph (also for graphs loaded from an engine file).
        keep_artifact: compile so that the engine keeps its compiled code saved whole (engine cache)."""
        lifted = lifting.from_export(ep)
        if self.settings.weight_streaming and flat is not None:  # captured where the model is; compiled for the inputs' device
            for position, leaf in zip(lifted.input_positions, flat):
                if isinstance(leaf, torch.Tensor):
                    lifted.example_args[position] = leaf
        signature = InputSignature(spec, [lifted.example_args[i] for i in lifted.input_positions], ep.range_constraints)
        variant = self._make_variant(lifted, signature, ep.call_spec.out_spec, self._updates(ep), keep_artifact=keep_artifact)
        variant.exported = ep
        return variant

    def _variant_from_file(
        self, contents: Any, index: int, spec: pytree.TreeSpec | None, flat: Sequence[Any] | None = None
    ) -> _Variant:
        """Variant `index` of an engine file (files.Contents): from its compiled code where the file
        holds it (no torch.export.load, nothing traced or compiled; the graph is read only if save
        needs it), else from its graph. flat: the call it is for (the engine cache), else None."""
        found = contents.artifact(index)
        if found is None:
            ep = contents.program(index)
            return self._variant_from_export(ep, ep.call_spec.in_spec if spec is None else spec, flat)
        artifact, binding = found
        try:
            signature = InputSignature.from_json(binding["signature"])
            out_spec = pytree.treespec_loads(binding["out_spec"])
            if flat is None:  # loading a file: the signature tells the devices of the inputs
                flat = signature.placeholders()
            else:
                problem = signature.mismatch(spec, flat)
                if problem is not None:
                    raise EngineFileError(f"compiled for other inputs ({problem})")
            lifted = lifting.bind(binding["lifted"], {**contents.values, **self._own_tensors()}, flat)
            updates = [u if isinstance(u, int) else str(u) for u in binding["updates"]]
            for u in updates:
                if isinstance(u, str):
                    self.original.get_buffer(u)  # the model has it
        except (KeyError, TypeError, ValueError, AttributeError, TorchTRTExtError) as exc:
            raise EngineFileError(f"{contents.path}: the binding of graph {index} does not fit ({_first_line(exc)})") from None
        variant = self._make_variant(lifted, signature, out_spec, updates, artifact=artifact)
        variant._read_exported = functools.partial(contents.program, index)
        return variant

    def _make_variant(
        self,
        lifted: lifting.LiftedGraph,
        signature: InputSignature,
        out_spec: pytree.TreeSpec,
        updates: Sequence[str | int],
        artifact: bytes | None = None,
        keep_artifact: bool = False,
    ) -> _Variant:
        engine = build_engine(lifted, self.settings, artifact, keep_artifact)
        registry.add(engine, [w.tensor for w in lifted.weights])
        resolved = [self.original.get_buffer(u) if isinstance(u, str) else int(u) for u in updates]
        return _Variant(engine, signature, out_spec, resolved, {"lifted": lifted.describe(), "updates": list(updates)})

    def _own_tensors(self) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers by every name (tied ones under each)."""
        return {
            **dict(self.original.named_parameters(remove_duplicate=False)),
            **dict(self.original.named_buffers(remove_duplicate=False)),
        }

    def _variant_from_cache(self, digest: str, spec: pytree.TreeSpec, flat: Sequence[Any]) -> _Variant | None:
        from . import files

        path = engine_cache.entry_path(self.settings.cache_dir, digest)
        if not os.path.isfile(path):
            return None
        try:
            contents = files.read(path, own=self._own_tensors())
            contents.load_inductor_cache()  # autotuning results (and the graph's caches, for an entry without compiled code)
            variant = self._variant_from_file(contents, 0, spec, flat)
        except Exception as exc:  # a bad entry costs a recompile, never a wrong engine
            log.warning("torchtrt_ext: engine cache entry %s not used (%s); compiling", path, _first_line(exc))
            return None
        variant.from_cache = True
        log.info(
            "torchtrt_ext: engine cache hit %s (%s)",
            path,
            "compiled code loaded" if variant.engine.artifact is not None else "its graph compiled again",
        )
        return variant

    def _store_in_cache(self, digest: str, variant: _Variant) -> None:
        from . import files

        path = engine_cache.entry_path(self.settings.cache_dir, digest)
        try:
            os.makedirs(self.settings.cache_dir, exist_ok=True)
            files.write_variants(self, [variant], path, include_weights=False)
        except Exception as exc:  # the cache is an optimisation: say why it failed, and go on
            log.warning("torchtrt_ext: could not write engine cache entry %s (%s)", path, _first_line(exc))

    def _export(self, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
        # Under no_grad (engines only run inference): a forward decorated with @torch.no_grad (Hugging
        # Face's rotary embeddings) is then traced inline instead of as a wrap_with_set_grad_enabled
        # node, which AOTAutograd's cache refuses; with that node, an engine cache hit re-traced the graph.
        with torch.no_grad():
            return self._export_graph(args, kwargs)

    def _export_graph(self, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
        dynamic = None
        if self.settings.weight_streaming:  # capture on the model's device; streaming compiles static shapes
            home = next(itertools.chain(self.original.parameters(), self.original.buffers()), None)
            if home is not None:
                args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(home.device), (args, kwargs))
            return torch.export.export(self.original, args, kwargs, strict=False)
        if self.settings.dynamic_batch:
            dims = torch.export.ShapesCollection()
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
                    dims[leaf] = {0: torch.export.Dim.AUTO}
            dynamic = dims.dynamic_shapes(self.original, args, kwargs)
        return torch.export.export(self.original, args, kwargs, dynamic_shapes=dynamic, strict=False)

    def _updates(self, ep: torch.export.ExportedProgram) -> list[str | int]:
        """What the graph writes back, in output order: a model buffer's name, or a caller input's index."""
        from torch.export.graph_signature import InputKind, OutputKind

        user_inputs = [spec.arg.name for spec in ep.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
        updates: list[str | int] = []
        for spec in ep.graph_signature.output_specs:
            if spec.kind == OutputKind.BUFFER_MUTATION:
                updates.append(spec.target)
            elif spec.kind == OutputKind.USER_INPUT_MUTATION:
                updates.append(user_inputs.index(spec.target))
            elif spec.kind != OutputKind.USER_OUTPUT:
                raise TorchTRTExtError(
                    f"{type(self.original).__name__}.forward has a graph output of kind {spec.kind.name}, which "
                    "the drop-in wrapper does not support (use frontend='dynamo')"
                )
        return updates

    def _use_dynamo(self) -> None:
        backend = functools.partial(torchtrt_ext_backend, options=self.settings)
        # In __dict__, never as a submodule: the wrapper shares the original's _modules, and the
        # OptimizedModule holds the original, so a child there made the user's model contain itself.
        self.__dict__["_dynamo"] = torch.compile(self.original, backend=backend)

    def _check_devices(self, flat: Sequence[Any]) -> None:
        weight = next(itertools.chain(self.original.parameters(), self.original.buffers()), None)
        if weight is None:
            return
        for i, leaf in enumerate(flat):
            if isinstance(leaf, torch.Tensor) and leaf.device != weight.device and not (
                leaf.device.type == "cpu" and leaf.dim() == 0
            ):
                raise InputError(
                    f"input {i} is on {leaf.device} but the model's weights are on {weight.device}; "
                    f"move the input with .to('{weight.device}')"
                )


def _watch_weights(module: torch.nn.Module) -> tuple[Any, list[tuple[dict, str]], list[str]]:
    """A runtime WeightWatch over every parameter and buffer slot of the module, by state_dict name."""
    watch = WeightWatch()
    owners: list[tuple[dict, str]] = []
    names: list[str] = []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for table in (sub._parameters, sub._buffers):
            for key, value in table.items():
                if value is None:
                    continue
                watch.add(table, key)
                owners.append((table, key))
                names.append(f"{prefix}.{key}" if prefix else key)
    return watch, owners, names


def _follows(new: torch.Tensor, old: torch.Tensor, any_device: bool = False) -> bool:
    """Whether an engine compiled for `old` can compute with `new`: refit's rule (same shape, a
    floating dtype converts), and on the same device unless the engine copies from anywhere."""
    if new.device != old.device and not any_device:
        return False
    return weight_mismatch(new.shape, new.dtype, old) is None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def compile(
    module: torch.nn.Module,
    example_inputs: Sequence[Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> CompiledModule:
    """Compile `module` into an ``nn.Module`` with the same call signature, run by torchtrt_ext engines.

    example_inputs / example_kwargs: a call to compile for now; without them the first call compiles.
    options: see ``torchtrt_ext.describe_options()``.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"torchtrt_ext.compile takes an nn.Module, got {type(module).__name__}")
    settings = Settings.from_options(options)
    resolve_kind(settings)  # an unusable engine kind fails here, before any tracing
    compiled = CompiledModule(module, settings)
    if example_inputs is not None or example_kwargs is not None:
        if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        args, kwargs = compiled._normalize(tuple(example_inputs or ()), dict(example_kwargs or {}))
        flat, spec = pytree.tree_flatten((args, kwargs))
        if compiled._add_variant(args, kwargs, flat, spec) is None:
            with torch.no_grad():
                compiled._dynamo(*args, **kwargs)  # dynamo compiles on its first call
    return compiled
