"""The ``torch.compile`` backend: ``torch.compile(model, backend="torchtrt_ext", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point (works after ``pip install`` without
importing torchtrt_ext) and again on ``import torchtrt_ext``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from . import lifting, registry
from .engines import Engine, build_engine
from .errors import OptionError
from .settings import Settings

BACKEND_NAME = "torchtrt_ext"


class DynamoGraph:
    """What the backend hands back to dynamo: picks the caller's inputs out of dynamo's argument list
    (which also carries the module's weights) and runs the engine, which uses its own weight table."""

    def __init__(self, engine: Engine, input_positions: Sequence[int]):
        self.engine = engine
        self._input_positions = tuple(input_positions)

    def __call__(self, *args: Any) -> list[torch.Tensor]:
        return self.engine(*[args[i] for i in self._input_positions])


def torchtrt_ext_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | Settings | None = None,
    **unexpected: Any,
) -> DynamoGraph:
    if unexpected:
        raise OptionError(
            f"the torchtrt_ext backend takes its settings as options={{...}}, got {sorted(unexpected)} "
            "(torch.compile's mode= is not used by this backend)"
        )
    settings = options if isinstance(options, Settings) else Settings.from_options(options, for_backend=True)
    lifted = lifting.from_dynamo(gm, example_inputs)
    engine = build_engine(lifted, settings)
    registry.add(engine, [w.tensor for w in lifted.weights])
    return DynamoGraph(engine, lifted.input_positions)


def register() -> None:
    """Make backend="torchtrt_ext" resolvable. Idempotent, and safe alongside the entry point: the name
    is offered to dynamo's registry the way an entry point is, so dynamo registers it exactly once."""
    from torch._dynamo.backends import registry as dynamo_registry

    if BACKEND_NAME in dynamo_registry._COMPILER_FNS:
        return
    if dynamo_registry._BACKENDS.get(BACKEND_NAME) is None:
        dynamo_registry._BACKENDS[BACKEND_NAME] = _EntryPoint()


class _EntryPoint:
    """Stands in for an importlib entry point in dynamo's registry when the package is not installed."""

    name = BACKEND_NAME

    @staticmethod
    def load() -> Any:
        return torchtrt_ext_backend
