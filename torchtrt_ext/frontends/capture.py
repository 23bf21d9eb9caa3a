"""How the drop-in wrapper captures a model with torch.export, and what it watches of the model."""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import re
import sys
import threading
from typing import Any, Iterator, Sequence

import logging

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind

from ..core import trees
from ..core.errors import InputError, TorchTRTExtError
from ..core.runtime import WeightWatch
from ..core.settings import Settings
from ..operations.refit import weight_mismatch

log = logging.getLogger("torchtrt_ext")


def export(
    model: torch.nn.Module, args: tuple, kwargs: dict, settings: Settings, vary: Sequence[set[int]] | None = None
) -> torch.export.ExportedProgram:
    """torch.export of one call, under no_grad (engines only run inference): a forward decorated with
    @torch.no_grad (Hugging Face's rotary embeddings) is then traced inline instead of as a
    wrap_with_set_grad_enabled node, which AOTAutograd's cache refuses (an engine cache hit would then
    trace the graph again). Weight streaming captures on the model's device with static shapes;
    otherwise dynamic_batch lets dimension 0 of every tensor input vary, and `vary` (per flattened
    input of (args, kwargs)) names more dimensions that may: those in which calls were seen to differ.
    Export keeps a dimension static where the code needs it (a size of 0 or 1, a size it branches on)."""
    trees.register_model_types(model)
    with torch.no_grad(), _quiet_capture():
        if settings.weight_streaming:
            home = next(itertools.chain(model.parameters(), model.buffers()), None)
            if home is not None:
                args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(home.device), (args, kwargs))
            return torch.export.export(model, args, kwargs, strict=False)
        dims: dict[int, set[int]] = {}
        for leaf, extra in zip(pytree.tree_leaves((args, kwargs)), vary or ()):
            if isinstance(leaf, torch.Tensor) and extra:
                dims[id(leaf)] = set(extra)
        dynamic = _dynamic(model, args, kwargs, dims, settings.dynamic_batch) if settings.dynamic_batch or dims else None
        try:
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
        except AssertionError as exc:
            # torch.export cannot take dynamic shapes for keyword arguments that a **kwargs parameter
            # gathers ("Must provide a tree_name"): such a call is captured through its flattened inputs.
            if dynamic is None or "tree_name" not in str(exc):
                raise
        log.info("torchtrt_ext: %s.forward takes **kwargs: captured through its flattened inputs", type(model).__name__)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        shapes = [_dynamic_dims(leaf, dims, settings.dynamic_batch) for leaf in leaves]
        ep = torch.export.export(_FlatCall(model, spec), tuple(leaves), dynamic_shapes={"leaves": tuple(shapes)}, strict=False)
        # The program takes the caller's own structure, leaf for leaf the flattened inputs it was
        # captured with: an engine file then rebuilds calls as the model is called (args, kwargs).
        ep.module_call_graph[0].signature.in_spec = spec
        return ep


@contextlib.contextmanager
def returned_inputs(model: torch.nn.Module) -> Iterator[list[tuple]]:
    """While a capture traces `model`, note which of its arguments (objects, not tensors or plain
    containers) its forward returns as themselves, once: a KV cache given and handed back. Yields the
    list of (side, key, offset): the place in (args, kwargs), (0, position) or (1, name), and the
    index of the object's first leaf among the flattened outputs."""
    found: list[tuple] = []

    def note(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if found:  # the first call only (a traced forward runs once)
            return
        given = [((0, i), a) for i, a in enumerate(args)] + [((1, k), v) for k, v in kwargs.items()]
        for where, value in given:
            if value is None or isinstance(value, (torch.Tensor, tuple, list, dict, int, float, bool, str)):
                continue
            leaves = pytree.tree_leaves(output, is_leaf=lambda o, value=value: o is value)
            at = [i for i, leaf in enumerate(leaves) if leaf is value]
            if len(at) == 1:  # every other item there is one leaf of the outputs
                found.append((*where, at[0]))

    handle = model.register_forward_hook(note, with_kwargs=True)
    try:
        yield found
    finally:
        handle.remove()


def share_structure(module: torch.nn.Module, model: torch.nn.Module) -> None:
    """Make `module` hold `model`'s own parameters, buffers and submodules (the same dicts): its
    state_dict names, and a capture's weight names, are the model's."""
    module._parameters = model._parameters
    module._buffers = model._buffers
    module._non_persistent_buffers_set = model._non_persistent_buffers_set
    module._modules = model._modules


class _FlatCall(torch.nn.Module):
    """`model` called with its flattened inputs as positional arguments (export takes their dynamic
    sizes there). It shares the model's parameters, buffers and submodules, so the captured graph
    names every weight exactly as the model's state_dict does."""

    def __init__(self, model: torch.nn.Module, spec: pytree.TreeSpec):
        super().__init__()
        share_structure(self, model)
        self.__dict__["_model"] = model
        self.__dict__["_spec"] = spec

    def forward(self, *leaves: Any) -> Any:
        args, kwargs = pytree.tree_unflatten(list(leaves), self._spec)
        return self._model(*args, **kwargs)


def _dynamic_dims(value: Any, dims: dict[int, set[int]], batch_dim: bool) -> Any:
    """One tensor input's dynamic dimensions for export: 0 with batch_dim, and dims[id(tensor)].
    A size of 0 or 1 stays static (export would specialize it anyway, with a warning): a later call
    of another size compiles that dimension as dynamic."""
    if not isinstance(value, torch.Tensor):
        return None
    marked = dims.get(id(value), set()) | ({0} if batch_dim and value.dim() > 0 else set())
    return {d: torch.export.Dim.AUTO for d in sorted(marked) if value.shape[d] > 1} or None


@contextlib.contextmanager
def _quiet_capture() -> Iterator[None]:
    """A failed capture raises (the wrapper then gives eager's own error or falls back, saying why);
    meanwhile torch reports that failure itself, which only hides the real message from the user:
    - fake tensors log it at error level, with a traceback of torch's internals;
    - symbolic shapes warn "Unable to find user code corresponding to {u0}";
    - torch.export prints the partial graph it traced to stderr (the exception's partial_fx_graph);
      held here, it goes to this package's debug log instead. Other output of the capturing thread
      reaches stderr when the capture ends; other threads' output is not held."""
    with _quiet_lock:  # captures on several threads: the first sets the levels, the last restores them
        if _quiet_state["depth"] == 0:
            _quiet_state["levels"] = [logging.getLogger(name).level for name in _QUIETED]
            for name, level in _QUIETED.items():
                logging.getLogger(name).setLevel(level)
            if sys.stderr is not None and not isinstance(sys.stderr, _HeldStderr):
                sys.stderr = _HeldStderr(sys.stderr)
        _quiet_state["depth"] += 1
        stderr = sys.stderr
    holding = isinstance(stderr, _HeldStderr) and stderr.hold()
    failure: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        failure = exc
        raise
    finally:
        try:
            if holding:
                held = stderr.release()
                if failure is not None and hasattr(failure, "partial_fx_graph"):
                    log.debug("torchtrt_ext: torch.export failed; what it printed:\n%s", held)
                elif held:
                    stderr.write_through(held)
        finally:
            with _quiet_lock:
                _quiet_state["depth"] -= 1
                if _quiet_state["depth"] == 0:
                    for name, level in zip(_QUIETED, _quiet_state.pop("levels")):
                        logging.getLogger(name).setLevel(level)
                    if isinstance(sys.stderr, _HeldStderr):  # unless replaced since
                        sys.stderr = sys.stderr.real


class _HeldStderr:
    """sys.stderr while captures run: what a capturing thread writes is held until its capture ends;
    every other write goes straight through."""

    def __init__(self, real: Any):
        self.real = real
        self._held = threading.local()

    def hold(self) -> bool:
        """Start holding this thread's writes; False where they are held already (a nested capture)."""
        if getattr(self._held, "parts", None) is not None:
            return False
        self._held.parts = []
        return True

    def release(self) -> str:
        parts, self._held.parts = self._held.parts, None
        return "".join(parts)

    def write_through(self, text: str) -> None:
        """Write to the real stream; a stream closed or gone meanwhile loses the text, not the capture."""
        try:
            self.real.write(text)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text: str) -> int:
        parts = getattr(self._held, "parts", None)
        if parts is None:
            return self.real.write(text)
        parts.append(text)
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, encoding, isatty, ...
        return getattr(self.real, name)


_QUIETED = {"torch._subclasses.fake_tensor": logging.CRITICAL, "torch.fx.experimental.symbolic_shapes": logging.ERROR}
_quiet_lock = threading.Lock()
_quiet_state: dict[str, Any] = {"depth": 0}  # captures in progress, and the levels to restore (while any)


def avoid_fallback(exc: BaseException) -> str:
    """What would let torch.export capture the model, from its error."""
    text = str(exc)
    if "Cache" in text:
        return (
            "The model takes or returns a cache object that is not a registered pytree node (transformers' "
            "own caches are registered where transformers has exporters.exporter_dynamo): call it with "
            "use_cache=False, or register the cache class with torch.utils._pytree.register_pytree_node."
        )
    return "Pass frontend='dynamo' to skip the export attempt, or make forward traceable (see the reason)."


def _dynamic(model: torch.nn.Module, args: tuple, kwargs: dict, dims: dict[int, set[int]], batch_dim: bool) -> Any:
    """dynamic_shapes, by forward's parameter names (keyword arguments gathered by a **kwargs parameter
    nested under its name): per tensor input, dimension 0 with batch_dim, and the dimensions in
    dims[id(tensor)]."""

    def batch(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return _dynamic_dims(value, dims, batch_dim)
        if type(value) in (list, tuple):
            return type(value)(batch(v) for v in value)
        if type(value) is dict:
            return {k: batch(v) for k, v in value.items()}
        node = pytree.SUPPORTED_NODES.get(type(value))
        if node is not None:  # another registered node (a transformers cache): export takes its children as a list
            return [batch(child) for child in node.flatten_fn(value)[0]]
        return None

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:  # the call itself is wrong: export says how
        return None
    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {key: batch(v) for key, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(batch(v) for v in value)
        else:
            shapes[name] = batch(value)
    return shapes


def raise_as_eager(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Where the model itself rejects these inputs (a wrong size or dtype), raise its own error, not
    the symbolic one of a trace; return where eager takes them."""
    try:  # on copies: the model may write into its inputs (a KV cache appends to itself)
        args, kwargs = copy.deepcopy((args, kwargs))
    except Exception:  # inputs that cannot be copied: no eager check
        return
    try:
        with torch.no_grad(), eval_mode(model):
            model(*args, **kwargs)
    except Exception as eager:
        raise eager.with_traceback(None) from None


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode for a capture, every submodule's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def updates(model: torch.nn.Module, ep: torch.export.ExportedProgram) -> list[str | int]:
    """What the graph writes back, in output order: a model buffer's name, or a caller input's index."""
    user_inputs = [spec.arg.name for spec in ep.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
    found: list[str | int] = []
    for spec in ep.graph_signature.output_specs:
        if spec.kind == OutputKind.BUFFER_MUTATION:
            found.append(spec.target)
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            found.append(user_inputs.index(spec.target))
        elif spec.kind != OutputKind.USER_OUTPUT:
            raise TorchTRTExtError(
                f"{type(model).__name__}.forward has a graph output of kind {spec.kind.name}, which "
                "the drop-in wrapper does not support (use frontend='dynamo')"
            )
    return found


def check_devices(model: torch.nn.Module, args: tuple, kwargs: dict, signature: inspect.Signature) -> None:
    """Every tensor input on the model's device (CPU scalars excepted), else an InputError naming it."""
    weight = next(itertools.chain(model.parameters(), model.buffers()), None)
    if weight is None:
        return
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor) and leaf.device != weight.device and not (
            leaf.device.type == "cpu" and leaf.dim() == 0
        ):
            raise InputError(
                f"input {input_name(path, signature)} is on {leaf.device} but the model's weights are on "
                f"{weight.device}; move it with .to('{weight.device}')"
            )


def name_inputs(text: str | None, args: tuple, kwargs: dict, signature: inspect.Signature) -> str | None:
    """A signature's message with each flattened input ("input 3") named as the caller wrote it."""
    if text is None:
        return None
    paths = [path for path, _ in pytree.tree_flatten_with_path((args, kwargs))[0]]

    def name(match: re.Match) -> str:
        index = int(match.group(1))
        return f"input {input_name(paths[index], signature)}" if index < len(paths) else match.group(0)

    return re.sub(r"\binput (\d+)\b", name, text)


def input_name(path: tuple, signature: inspect.Signature) -> str:
    """A flattened input's name as the caller wrote it: `input_ids`, `pixel_values[0]`, `x` for the
    first positional parameter x (from a pytree key path into (args, kwargs))."""
    where, rest = path[0].idx, path[1:]
    if where == 0:  # positional: the parameter's name
        names = [p.name for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        index = rest[0].idx
        head = names[index] if index < len(names) else f"positional argument {index}"
    else:
        head = str(rest[0].key)
    return head + pytree.keystr(rest[1:])


def watch_weights(module: torch.nn.Module) -> tuple[Any, list[tuple[dict, str]], list[str]]:
    """A runtime WeightWatch over every parameter and buffer slot of the module, by state_dict name
    (entries 0 .. len(names) - 1), then over every submodule slot (by identity: a submodule replaced
    or removed, after which those parameter and buffer slots are no longer all of the model's)."""
    watch = WeightWatch()
    owners: list[tuple[dict, str]] = []
    names: list[str] = []
    subs = list(module.named_modules(remove_duplicate=False))
    for prefix, sub in subs:
        for table in (sub._parameters, sub._buffers):
            for key, value in table.items():
                if value is None:
                    continue
                watch.add(table, key)
                owners.append((table, key))
                names.append(f"{prefix}.{key}" if prefix else key)
    for _, sub in subs:
        for key in sub._modules:
            watch.add(sub._modules, key)
    return watch, owners, names


def follows(new: torch.Tensor, old: torch.Tensor, any_device: bool = False) -> bool:
    """Whether an engine compiled for `old` can compute with `new`: refit's rule (same shape, a
    floating dtype converts), and on the same device unless the engine copies from anywhere."""
    if new.device != old.device and not any_device:
        return False
    return weight_mismatch(new.shape, new.dtype, old) is None
