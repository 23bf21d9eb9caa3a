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
import logging
import os
import threading
from typing import Any, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from ..core import lifting, registry, trees
from ..core.errors import EngineFileError, InputError, RefitError, TorchTRTExtError
from ..core.flatten_memo import Flattener
from ..core.settings import Settings
from ..core.signature import InputSignature, dense
from ..core.writes import written_inputs
from ..engines import Engine, SavedQuantization, build_engine, resolve_kind
from ..operations import engine_cache, files
from ..operations.calibrate import check_fingerprint
from ..operations.program import CompiledProgram
from . import arguments, capture, routing
from .backend import torchtrt_ext_backend
from .following import FollowsWeights
from .variant import Variant, first_line, read_binding, varying_dims

log = logging.getLogger("torchtrt_ext")


class CompiledModule(FollowsWeights, torch.nn.Module, CompiledProgram):
    """An ``nn.Module`` that runs the original module's forward on torchtrt_ext engines."""

    def __init__(self, module: torch.nn.Module, settings: Settings):
        super().__init__()
        capture.share_structure(self, module)
        self.training = module.training
        self.__dict__["_original"] = module  # not a submodule: state_dict names stay the original's
        self.settings = settings
        self._variants: list[Variant] = []
        self._last_hit: Variant | None = None
        self._dynamo: Any = None
        self._forward_signature = inspect.signature(module.forward)
        # transformers' cache objects flatten into their tensors from the first call on (every call's
        # inputs are flattened before they are matched to a compiled signature)
        trees.register_model_types(module)
        self.flattener = Flattener()  # remembers a cache object's flattening across decode steps
        self.start_following(module)
        self._weights_missing = False  # loaded from a weight-stripped file, not refitted yet
        # Concurrent first calls of one signature: one compiles, the others wait and then use it.
        self._compile_lock = threading.Lock()
        self._trainable = [p for p in module.parameters()]
        self._warned: set[str] = set()

    @property
    def state_dict_names(self) -> frozenset[str]:
        """The original module's state_dict names (parameters and persistent buffers)."""
        names = self.__dict__.get("_state_dict_names")
        if names is None:
            names = self.__dict__["_state_dict_names"] = frozenset(self.original.state_dict(keep_vars=True))
        return names

    # --- the surface the operations use (operations.program.CompiledProgram) -----------------------

    @property
    def model(self) -> torch.nn.Module:
        return self.__dict__["_original"]

    @property
    def variants(self) -> list[Variant]:
        return self._variants

    @property
    def forward_signature(self) -> inspect.Signature:
        return self._forward_signature

    def sync_weights(self) -> None:
        self._follow_weights()

    def weights_given(self, complete: bool) -> None:
        self.accept_weights()  # what the model holds now is what the engines were given
        if complete:
            self._weights_missing = False

    def add_loaded(self, contents: Any, forward_signature: inspect.Signature, weights_included: bool) -> None:
        """Take every variant of a loaded engine file (files.Contents) as this module's own."""
        self._forward_signature = forward_signature
        for i in range(len(contents.header.programs)):
            self._variants.append(self._variant_from_file(contents, i, None))
        self._weights_missing = not weights_included
        self._loaded_from = str(contents.path)  # no model code to capture: new signatures are refused

    @property
    def original(self) -> torch.nn.Module:
        """The user's model (the same as .model)."""
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
            pass
        original = self.__dict__["_original"]
        value = getattr(original, name)  # e.g. a Hugging Face model's .config
        if inspect.ismethod(value) and value.__self__ is original and not name.startswith("_"):
            return functools.partial(routing.call_routed, self, value)  # generate(), encode(), ...
        return value

    # Never traced by an outer torch.compile (transformers' generate() compiles the model's __call__ for a
    # static cache on the GPU): the engines are the compiled code, and the wrapper's Python around them
    # (signatures, weight following, variants) is not traceable. An outer compile breaks its graph here.
    @torch._dynamo.disable
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if routing.inside.depth:  # the model's forward, called from inside this one (capture, eager, dynamo)
            return type(self.original).forward(self.original, *args, **kwargs)
        routing.inside.depth += 1
        try:
            return self._forward(args, kwargs)
        finally:
            routing.inside.depth -= 1

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        if self._weights_missing:
            raise RefitError(
                "this module was loaded from a weight-stripped engine file and has no weights yet: "
                "torchtrt_ext.refit(module, checkpoint) first"
            )
        eager = self._eager_reason(args, kwargs)
        if eager is not None:
            self._warn_once(eager, f"torchtrt_ext: {eager}, so this call runs {type(self.original).__name__} eagerly")
            return self.original(*args, **kwargs)
        self._follow_weights()
        if self._dynamo is not None:
            return self._dynamo(*args, **kwargs)
        args, kwargs = self._normalize(args, kwargs)
        flat, spec = self.flattener.flatten((args, kwargs))
        last = self._last_hit  # a decode loop calls one variant again and again: checked first
        if last is not None and last.signature.mismatch(spec, flat) is None:
            return last(flat, (args, kwargs))
        for variant in self._variants:
            if variant is not last and variant.signature.mismatch(spec, flat) is None:
                self._last_hit = variant
                return variant(flat, (args, kwargs))
        with self._compile_lock:  # one compile per signature; threads that waited use its result
            for variant in self._variants:
                if variant.signature.mismatch(spec, flat) is None:
                    return variant(flat, (args, kwargs))
            variant = self._add_variant(args, kwargs, flat, spec)
            if variant is None:
                return self._dynamo(*args, **kwargs)
            try:
                return variant(flat, (args, kwargs))
            except Exception:  # a variant that cannot run its own first call is not kept
                self._variants.remove(variant)
                capture.raise_as_eager(self.original, args, kwargs)
                raise

    def drop_variants(self, why: str) -> None:
        """Forget every compiled signature: the next call compiles for the model as it is now."""
        log.info("torchtrt_ext: %s: %s; its engines are compiled again at the next call", type(self.original).__name__, why)
        with self._compile_lock:  # a compile in flight (for the old weights) finishes first
            self._variants.clear()
            self._last_hit = None
        self._trainable = list(self.original.parameters())

    def _eager_reason(self, args: tuple, kwargs: dict) -> str | None:
        """Why this call cannot run on the engines, which compute inference in eval mode, or None.
        Training mode (dropout, batch statistics) and gradients run the original model itself."""
        if self.original.training:
            return (
                f"{type(self.original).__name__} is in training mode and the engines compute eval mode only "
                "(call .eval() to use them)"
            )
        if torch.is_grad_enabled():
            if any(p.requires_grad for p in self._trainable) or any(
                isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in pytree.tree_leaves((args, kwargs))
            ):
                return (
                    "gradients are needed (grad mode is on and parameters or inputs require grad) and the engines "
                    "compute no gradients (call under torch.no_grad() or torch.inference_mode() to use them)"
                )
        return None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def train(self, mode: bool = True) -> "CompiledModule":
        """Sets the original model's mode (the engines run in eval mode only; see forward)."""
        self.original.train(mode)
        self.training = mode
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a torchtrt_ext compiled module cannot be pickled, copied or saved with torch.save (its engines "
            "hold compiled code and device state): use torchtrt_ext.save(module, path) and "
            "torchtrt_ext.load(path), or compile a copy of the model"
        )

    def _normalize(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """One form per call: arguments that can be positional are, the rest sorted by name."""
        return arguments.normal_form(self._forward_signature, args, kwargs)

    def _add_variant(self, args: tuple, kwargs: dict, flat: list, spec: pytree.TreeSpec) -> Variant | None:
        if not self.settings.weight_streaming:  # streaming: the inputs give the device, the model may stay on the host
            capture.check_devices(self.original, args, kwargs, self._forward_signature)
        loaded_from = self.__dict__.get("_loaded_from")
        if len(self._variants) >= self.settings.max_variants or loaded_from:
            reason = capture.name_inputs(self._variants[0].signature.mismatch(spec, flat), args, kwargs, self._forward_signature)
            if loaded_from:
                raise InputError(f"this call fits none of the {len(self._variants)} input signatures compiled into {loaded_from} (against "
                                 f"the first: {reason}); a loaded module holds compiled code only, so call it with inputs like those, or compile the model itself for new ones")
            raise InputError(
                f"this call fits none of the {len(self._variants)} compiled input signatures (against the "
                f"first: {reason}) and max_variants={self.settings.max_variants} is reached; raise "
                "max_variants or call with inputs like those already compiled"
            )
        first = not self._variants
        self._remember_values()
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
        try:  # captured for dense inputs (a slice or transpose is copied: the code then takes any call)
            with self.capturing(), capture.returned_inputs(self.original) as returned:
                ep = capture.export(self.original, *pytree.tree_map(dense, (args, kwargs)), self.settings, varying_dims(self._variants, spec, flat))
        except Exception as exc:
            capture.raise_as_eager(self.original, args, kwargs)  # an input eager rejects: eager's own error
            if self.settings.frontend == "export" or not first:
                raise
            log.warning(
                "torchtrt_ext: torch.export could not capture %s.forward (%s); using dynamo instead, which "
                "compiles what it can trace and splits the graph around the rest. %s",
                type(self.original).__name__,
                first_line(exc),
                capture.avoid_fallback(exc),
            )
            self._use_dynamo()
            return None
        variant = self._variant_from_export(ep, spec, flat, keep_artifact=digest is not None, returned=returned)
        if digest is not None:
            # One run first, where it changes nothing (no buffer updates, no input written in place):
            # Inductor's autotuning results then travel in the entry.
            if not variant.updates and not variant.engine.writes:
                with torch.no_grad():
                    variant.engine(*variant.signature.conform(flat))
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
        returned: Sequence[tuple] = (),
        saved: SavedQuantization | None = None,
    ) -> Variant:
        """Build the engine of one exported graph (also for graphs loaded from an engine file, with the
        quantization saved there). keep_artifact: compile so that the engine keeps its compiled code saved
        whole (engine cache). returned: the input objects the traced forward returned as themselves."""
        lifted = lifting.from_export(ep)
        if self.settings.weight_streaming and flat is not None:  # captured where the model is; compiled for the inputs' device
            for position, leaf in zip(lifted.input_positions, flat):
                if isinstance(leaf, torch.Tensor):
                    lifted.example_args[position] = dense(leaf)
        signature = InputSignature(spec, [lifted.example_args[i] for i in lifted.input_positions], ep.range_constraints)
        variant = self._make_variant(
            lifted, signature, ep.call_spec.out_spec, capture.updates(self.original, ep), keep_artifact=keep_artifact, returned=returned,
            saved=saved,
        )
        variant.exported = ep
        return variant

    def _variant_from_file(
        self, contents: Any, index: int, spec: pytree.TreeSpec | None, flat: Sequence[Any] | None = None
    ) -> Variant:
        """Variant `index` of an engine file (files.Contents): from its compiled code where the file
        holds it (no torch.export.load, nothing traced or compiled; the graph is read only if save
        needs it), else from its graph. flat: the call it is for (the engine cache), else None."""
        found, saved = contents.artifact(index), contents.quantization(index)
        if found is None:
            ep = contents.program(index)
            return self._variant_from_export(ep, ep.call_spec.in_spec if spec is None else spec, flat, saved=saved)
        artifact, binding = found
        try:
            signature = InputSignature.from_json(binding["signature"])
            out_spec = trees.loads(binding["out_spec"], f"{contents.path}: the out_spec of graph {index}")
            if flat is None:  # loading a file: the signature tells the devices of the inputs
                flat = signature.placeholders()
            else:
                problem = signature.mismatch(spec, flat)
                if problem is not None:
                    raise EngineFileError(f"compiled for other inputs ({problem})")
            lifted = lifting.bind(binding["lifted"], {**contents.values, **self._own_tensors()}, flat)
            updates, writes, returned = read_binding(binding, len(flat))
            for u in updates:
                if isinstance(u, str):
                    self.original.get_buffer(u)  # the model has it
        except (KeyError, TypeError, ValueError, AttributeError, TorchTRTExtError) as exc:
            raise EngineFileError(f"{contents.path}: the binding of graph {index} does not fit ({first_line(exc)})") from None
        variant = self._make_variant(lifted, signature, out_spec, updates, artifact=artifact, writes=writes, returned=returned, saved=saved)
        variant.read_exported = functools.partial(contents.program, index)
        return variant

    def _make_variant(
        self,
        lifted: lifting.LiftedGraph,
        signature: InputSignature,
        out_spec: pytree.TreeSpec,
        updates: Sequence[str | int],
        artifact: bytes | None = None,
        keep_artifact: bool = False,
        writes: Sequence[int] = (),
        returned: Sequence[tuple] = (),
        saved: SavedQuantization | None = None,
    ) -> Variant:
        # Caller inputs the compiled code writes itself (found from the graph, or given by an engine file):
        # a call whose input is conformed to a copy gets the written values back (Variant)
        writes = sorted({*writes, *written_inputs(lifted)})
        engine = build_engine(lifted, self.settings, artifact, keep_artifact, writes=writes, saved=saved)
        writes = engine.writes
        registry.add(engine, [w.tensor for w in lifted.weights])
        resolved = [self.original.get_buffer(u) if isinstance(u, str) else int(u) for u in updates]
        description = {"lifted": lifted.describe(), "updates": list(updates), "writes": list(writes), "returned": [list(r) for r in returned]}
        return Variant(engine, signature, out_spec, resolved, description, writes, returned)

    def _own_tensors(self) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers by every name (tied ones under each)."""
        return {
            **dict(self.original.named_parameters(remove_duplicate=False)),
            **dict(self.original.named_buffers(remove_duplicate=False)),
        }

    def _variant_from_cache(self, digest: str, spec: pytree.TreeSpec, flat: Sequence[Any]) -> Variant | None:
        path = engine_cache.entry_path(self.settings.cache_dir, digest)
        if not os.path.isfile(path):
            return None
        try:
            contents = files.read(path, own=self._own_tensors())
            contents.load_inductor_cache()  # autotuning results (and the graph's caches, for an entry without compiled code)
            variant = self._variant_from_file(contents, 0, spec, flat)
        except Exception as exc:  # a bad entry costs a recompile, never a wrong engine
            log.warning("torchtrt_ext: engine cache entry %s not used (%s); compiling", path, first_line(exc))
            return None
        variant.from_cache = True
        log.info(
            "torchtrt_ext: engine cache hit %s (%s)",
            path,
            "compiled code loaded" if variant.engine.artifact is not None else "its graph compiled again",
        )
        return variant

    def _store_in_cache(self, digest: str, variant: Variant) -> None:
        path = engine_cache.entry_path(self.settings.cache_dir, digest)
        try:
            os.makedirs(self.settings.cache_dir, exist_ok=True)
            files.write_variants(self, [variant], path, include_weights=False)
        except Exception as exc:  # the cache is an optimisation: say why it failed, and go on
            log.warning("torchtrt_ext: could not write engine cache entry %s (%s)", path, first_line(exc))

    def _use_dynamo(self) -> None:
        """Calls go through dynamo from now on: the model's own forward function (its class's), compiled
        and called with the model as its first argument. Not torch.compile(model): that module would
        hold the model, and as an attribute of this wrapper (which shares the model's submodules) it
        made the user's model contain itself; and it reads `forward` off the instance, which a routed
        method call (routing.call_routed) replaces."""
        backend = functools.partial(torchtrt_ext_backend, options=self.settings)
        forward = torch.compile(type(self.original).forward, backend=backend)
        self.__dict__["_dynamo"] = functools.partial(forward, self.original)


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
    if settings.calibration is not None:
        check_fingerprint(settings.calibration, module)
    compiled = CompiledModule(module, settings)
    if example_inputs is not None or example_kwargs is not None:
        if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        args, kwargs = compiled._normalize(tuple(example_inputs or ()), dict(example_kwargs or {}))
        flat, spec = pytree.tree_flatten((args, kwargs))
        with torch.no_grad(), capture.eval_mode(module):  # the engines compute eval mode
            if compiled._add_variant(args, kwargs, flat, spec) is None:
                compiled._dynamo(*args, **kwargs)  # dynamo compiles on its first call
    return compiled
