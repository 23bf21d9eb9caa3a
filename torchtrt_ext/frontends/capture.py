"""How the drop-in wrapper captures a model with torch.export, and what it watches of the model."""

from __future__ import annotations

import contextlib
import inspect
import itertools
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind

from ..core.errors import InputError, TorchTRTExtError
from ..core.runtime import WeightWatch
from ..core.settings import Settings
from ..operations.refit import weight_mismatch


def export(model: torch.nn.Module, args: tuple, kwargs: dict, settings: Settings) -> torch.export.ExportedProgram:
    """torch.export of one call, under no_grad (engines only run inference): a forward decorated with
    @torch.no_grad (Hugging Face's rotary embeddings) is then traced inline instead of as a
    wrap_with_set_grad_enabled node, which AOTAutograd's cache refuses (an engine cache hit would then
    trace the graph again). Weight streaming captures on the model's device with static shapes;
    otherwise dynamic_batch lets dimension 0 of every tensor input vary."""
    with torch.no_grad():
        if settings.weight_streaming:
            home = next(itertools.chain(model.parameters(), model.buffers()), None)
            if home is not None:
                args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(home.device), (args, kwargs))
            return torch.export.export(model, args, kwargs, strict=False)
        dynamic = None
        if settings.dynamic_batch:
            dims = torch.export.ShapesCollection()
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
                    dims[leaf] = {0: torch.export.Dim.AUTO}
            dynamic = dims.dynamic_shapes(model, args, kwargs)
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)


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


def follows(new: torch.Tensor, old: torch.Tensor, any_device: bool = False) -> bool:
    """Whether an engine compiled for `old` can compute with `new`: refit's rule (same shape, a
    floating dtype converts), and on the same device unless the engine copies from anywhere."""
    if new.device != old.device and not any_device:
        return False
    return weight_mismatch(new.shape, new.dtype, old) is None
