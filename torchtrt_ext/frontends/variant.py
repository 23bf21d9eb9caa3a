"""One compiled input signature of the drop-in wrapper: its engine, what binds it to the model, and
how its outputs are put back into the forward's structure."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from ..core import trees
from ..core.signature import InputSignature
from ..engines import Engine
from . import passthrough

log = logging.getLogger("torchtrt_ext")


class Variant:
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
        writes: Sequence[int] = (),
        returned: Sequence[tuple] = (),
    ):
        self.engine = engine
        self.signature = signature
        self.out_spec = out_spec
        self.updates = list(updates)  # per leading graph output: a model buffer, or a caller-input index
        # caller inputs the compiled code writes itself (a KV cache): where a call's input is not in the
        # layout compiled for, the code writes a conformed copy, whose values go back to the input
        self.writes = tuple(writes)
        # JSON: where the weights and inputs go (LiftedGraph.describe) and what the updates are (a
        # buffer's name, or a caller-input index): with the signature and out_spec, all that binds the
        # engine's compiled code to a model again (binding()).
        self._description = description
        self._exported: torch.export.ExportedProgram | None = None  # the graph it was built from
        # or how to read it (a variant built from compiled code alone, from an engine file)
        self.read_exported: Callable[[], torch.export.ExportedProgram] | None = None
        self.from_cache = False  # built from an engine cache entry
        # The input objects that the traced forward returned as themselves (a KV cache), as (side, key,
        # first output leaf), and how one comes back, found at a call (None: not looked for yet;
        # False: none): passthrough.py.
        self.returned = tuple(tuple(r) for r in returned)
        self._passthrough: passthrough.Passthrough | bool | None = None

    @property
    def exported(self) -> torch.export.ExportedProgram | None:
        """The graph (save needs it). A variant built from compiled code alone deserializes it the first
        time (torch.export.load of the graph bytes read with the engine file, kept in memory)."""
        if self._exported is None and self.read_exported is not None:
            self._exported = self.read_exported()
            self.read_exported = None
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
            trees.loads(binding["out_spec"], "the out_spec")
        except Exception as exc:
            log.warning("torchtrt_ext: the compiled code is not kept in the engine file (%s)", first_line(exc))
            return None
        return binding

    def __call__(self, flat: Sequence[Any], tree: tuple[tuple, dict] | None = None) -> Any:
        """Run on the flattened inputs; tree: the (args, kwargs) they came from, whose objects an
        output may be (a KV cache written in place and returned)."""
        conformed = self.signature.conform(flat)
        outputs = self.engine(*conformed)
        if conformed is not flat:
            for i in self.writes:
                if conformed[i] is not flat[i]:
                    with torch.no_grad():
                        flat[i].copy_(conformed[i])
        if self.updates:
            with torch.no_grad():
                for target, value in zip(self.updates, outputs):
                    (flat[target] if isinstance(target, int) else target).copy_(value)
            outputs = outputs[len(self.updates) :]
        if tree is not None and conformed is flat and self.returned:
            if self._passthrough is None:
                self._passthrough = passthrough.find(self.signature.in_spec, flat, self.out_spec, outputs, self.returned) or False
            if self._passthrough:
                built = self._passthrough.build(flat, tree, outputs)
                if built is not None:
                    return built
        return pytree.tree_unflatten(outputs, self.out_spec)


def read_binding(binding: dict, inputs: int) -> tuple[list[str | int], list[int], list[tuple]]:
    """The updates, written inputs and returned input objects that an engine file's binding holds
    (ValueError, KeyError or TypeError where they are malformed)."""
    updates = [u if isinstance(u, int) else str(u) for u in binding["updates"]]
    writes = [int(i) for i in binding.get("writes", [])]  # caller inputs the compiled code writes
    if any(not 0 <= i < inputs for i in writes):
        raise ValueError(f"writes {writes} outside the {inputs} inputs")
    returned = [tuple(r) for r in binding.get("returned", [])]
    if any(not (len(r) == 3 and (r[0], type(r[1])) in ((0, int), (1, str)) and type(r[2]) is int) for r in returned):
        raise ValueError(f"returned {returned}: each is [0, position, output] or [1, name, output]")
    return updates, writes, returned


def varying_dims(variants: Sequence[Variant], spec: pytree.TreeSpec, flat: Sequence[Any]) -> list[set[int]] | None:
    """Per flattened input, the dimensions in which a call differs from the compiled signatures of the
    same structure: compiled as dynamic sizes the next time (as dynamo does at a recompile), so that a
    sequence that grows (a decode loop, a batch of another size) compiles once more, not at every size."""
    union: list[set[int]] | None = None
    for variant in variants:
        found = variant.signature.varying_dims(spec, flat)
        if found is not None:
            union = found if union is None else [a | b for a, b in zip(union, found)]
    return union


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
