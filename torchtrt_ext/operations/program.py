"""What the operations on a compiled program (refit, weight-streaming control, save, the engine cache)
use of it: a small public surface, which the drop-in wrapper implements. The operations never read a
frontend's private state, and never import a frontend."""

from __future__ import annotations

import abc
import inspect
import threading
from typing import Any, Mapping

import torch

from ..core.sequences import SequenceGate


class CompiledProgram(abc.ABC):
    """A model compiled into engines, as the operations see it."""

    @property
    @abc.abstractmethod
    def model(self) -> torch.nn.Module:
        """The user's model, whose parameters and buffers the engines were built from."""

    @property
    @abc.abstractmethod
    def engines(self) -> list[Any]:
        """The engines serving the model (one per compiled input signature, or per dynamo graph)."""

    @property
    @abc.abstractmethod
    def variants(self) -> list[Any]:
        """The compiled input signatures (export path): each with .engine, .exported and .binding()."""

    @property
    @abc.abstractmethod
    def uses_dynamo(self) -> bool:
        """Whether calls go through dynamo, which may run parts of the model eagerly."""

    @property
    @abc.abstractmethod
    def weights_lock(self) -> threading.RLock:
        """Held while the engines' weights change (refit, or following the model's own changes)."""

    @property
    @abc.abstractmethod
    def sequences(self) -> SequenceGate:
        """Held shared by the model's own methods run through the engines (generate()) for their whole
        run, and exclusively by a refit: a sequence sees one set of weights."""

    @property
    @abc.abstractmethod
    def weight_names(self) -> frozenset[str]:
        """Every parameter and buffer name of the model (tied ones under each name)."""

    @abc.abstractmethod
    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers by every name (tied ones under each), as they are now."""

    @property
    @abc.abstractmethod
    def state_dict_names(self) -> frozenset[str]:
        """The model's state_dict names (parameters and persistent buffers)."""

    @property
    @abc.abstractmethod
    def forward_signature(self) -> inspect.Signature:
        """The signature calls are normalised against (which arguments may be positional)."""

    @abc.abstractmethod
    def weight_names_of(self, engine: Any) -> Mapping[str, int]:
        """The model's names of an engine's weights: name -> the engine's weight index."""

    @abc.abstractmethod
    def sync_weights(self) -> None:
        """Make the engines follow changes made to the model's own weights since the last call."""

    @abc.abstractmethod
    def weights_given(self, complete: bool) -> None:
        """The engines now hold what the model's weights hold (after a refit); complete: every
        weight the model needs has a value (a weight-stripped load becomes usable)."""
