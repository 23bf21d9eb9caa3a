"""Quantized engines' graphs (precision 'int8' or 'fp8', issue 16), for both engine kinds: the lifted graph
quantized by core.quantize_pass (or, for compiled code loaded whole, extended by the plan saved with
it), the quantized weights an engine file holds put in place of the computed ones, and the new values
of the quantized weights when their float weights change (a refit, or the model's own change)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import torch

from ..core import quantize_pass
from ..core.errors import EngineFileError, TorchTRTExtError
from ..core.lifting import LiftedGraph
from ..core.quantize_pass import QuantPlan
from ..core.settings import Settings
from .base import Engine


@dataclasses.dataclass(frozen=True)
class SavedQuantization:
    """A quantized engine as an engine file holds it: its plan, and its quantized weights and their scales
    by name (QuantPlan.extend's names: '<weight>:int8', '<weight>:int8_scales'), on the engine's device;
    empty where the file was saved without weights (an engine cache entry, a weight-stripped file): they
    are then quantized from the weights the engine is given. source names the file and graph in errors."""

    plan: QuantPlan
    tensors: Mapping[str, torch.Tensor]
    source: str


def quantized_graph(
    lifted: LiftedGraph, settings: Settings, saved: SavedQuantization | None = None, compiled_from: Engine | None = None,
    device: torch.device | None = None,
) -> tuple[LiftedGraph, QuantPlan | None]:
    """The graph quantized (settings.precision) and its plan. compiled_from: an engine of the same graph
    whose compiled code the new one shares (its plan quantizes these weights). saved: the plan and
    quantized weights of an engine file: the graph's own plan must be it (else an EngineFileError), and
    where lifted has no graph (compiled code loaded whole), it is what extends lifted. device: where the
    engine runs, where the graph's values were captured elsewhere (a streamed engine's, on the host)."""
    if compiled_from is not None:
        # Compiled code shared with an engine of the same graph, for other tensors at the same places
        # (the backend: weights replaced, another instance of the model): its plan quantizes these
        # weights, with the activation scales of the layers of those names. (A graph that dynamo serves
        # several layers with, after a graph break inside a repeated layer, names them relative to the
        # layer, which a model's calibration names never are: quantize_graph refused it already.)
        plan = compiled_from.quantization
        return (plan.extend(lifted) if plan is not None and plan.sources else lifted), plan
    if lifted.gm is not None:
        extended, plan = quantize_pass.quantize_graph(lifted, settings.precision, settings.calibration, settings.calibration_coverage, device)
        if saved is not None and plan != saved.plan:
            raise EngineFileError(
                f"{saved.source}: the quantization plan saved with it ({_describe(saved.plan)}) is not what its graph "
                f"and calibration cache give this torchtrt_ext ({_describe(plan)}); compile and save the model again"
            )
    elif saved is None:
        raise TorchTRTExtError("a quantized engine is built from its graph, or from compiled code with the plan saved with it")
    else:
        plan = saved.plan
        try:
            extended = plan.extend(lifted) if plan.sources else lifted
        except ValueError as exc:
            raise EngineFileError(f"{saved.source}: the quantization plan saved with it does not fit its compiled code ({exc})") from None
    if saved is not None and saved.tensors and plan.sources:
        extended = _with_saved(extended, plan, saved)
    return extended, plan


def _with_saved(extended: LiftedGraph, plan: QuantPlan, saved: SavedQuantization) -> LiftedGraph:
    """extended with the file's quantized weights in its quantized slots, each checked to be, bit for bit,
    the quantization of its float weight (the file's), as a refit would make it."""
    weights, args = list(extended.weights), list(extended.example_args)
    for index in range(plan.num_weights, len(weights)):
        slot = weights[index]
        given = saved.tensors.get(slot.name)
        if given is None:
            raise EngineFileError(f"{saved.source}: the file holds no quantized tensor {slot.name!r}, which its plan makes")
        computed = slot.tensor
        if given.shape != computed.shape or given.dtype != computed.dtype or not torch.equal(
            given.reshape(-1).view(torch.uint8), computed.to(given.device).reshape(-1).view(torch.uint8)
        ):
            source = extended.weights[plan.sources[(index - plan.num_weights) // 2]].name
            raise EngineFileError(
                f"{saved.source}: the quantized tensor {slot.name!r} ({given.dtype} {tuple(given.shape)}) is not the "
                f"quantization of the weight {source!r} that the file holds (written inconsistently); save the model again"
            )
        weights[index] = dataclasses.replace(slot, tensor=given)
        if args[slot.position] is computed:
            args[slot.position] = given
    return LiftedGraph(extended.gm, args, weights, list(extended.input_positions))


def requantized(
    plan: QuantPlan | None,
    values: Mapping[int, torch.Tensor],
    like: Callable[[int], torch.Tensor],
    device: torch.device | None = None,
) -> dict[int, torch.Tensor]:
    """The new values of the quantized weights made from these float weights (engine index -> value):
    each value first in the dtype of the engine's weight (`like(index)`), as at build time, on `device`
    (None: where the value is; the quantized bits are the same on every device)."""
    if plan is None:
        return {}
    out: dict[int, torch.Tensor] = {}
    for index, value in values.items():
        if plan.quantized_indices(index) is not None:
            value = value.to(device=device if device is not None else value.device, dtype=like(index).dtype)
            out.update(plan.requantize(index, value))
    return out


def _describe(plan: QuantPlan) -> str:
    return (
        f"{plan.fmt.name}, {len(plan.sources)} weight(s) of {plan.num_weights}, layers {', '.join(plan.layers) or 'none'}"
        + (f", unquantized {', '.join(plan.uncovered)}" if plan.uncovered else "")
    )
