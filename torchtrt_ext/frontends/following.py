"""The drop-in wrapper's auto-refit: it watches its model's parameter and buffer slots and makes the
engines follow what changes (load_state_dict, an optimizer step, assignment), by the settings' refit
mode: 'refit' follows, 'none' refuses any change, 'identical' refuses other values."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from typing import Any, Iterator, Mapping

import torch

from ..core import registry
from ..core.errors import RefitError
from ..core.file_layout import host_view, tensor_bytes
from ..core.sequences import SequenceGate
from . import capture


class FollowsWeights:
    """Mixed into CompiledModule, which provides original, settings, engines and weight_names_of, and
    calls start_following from its __init__. The watch and its lock are this class's own."""

    def start_following(self, module: torch.nn.Module) -> None:
        """Watch every parameter and buffer slot of `module` (capture.watch_weights)."""
        self._watch, self._watched, self._watched_names = capture.watch_weights(module)
        self._weights_lock = threading.RLock()
        self._sequences = SequenceGate()

    _capturing = False

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Around a capture (under the wrapper's compile lock: one at a time), during which the model's
        weights are the tracer's fake tensors."""
        self.__dict__["_capturing"] = True
        try:
            yield
        finally:
            self.__dict__["_capturing"] = False

    @property
    def weights_lock(self) -> threading.RLock:
        return self._weights_lock

    @property
    def sequences(self) -> SequenceGate:
        return self._sequences

    @property
    def weight_names(self) -> frozenset[str]:
        """Every parameter and buffer name of the original module (tied ones under each name)."""
        return frozenset(self._watched_names)

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers by every name, read from the watched slots: a refit of a
        22-layer Llama spent 0.7 ms of its 1.46 (CPU machine) walking the module tree for them. Where a
        submodule was replaced since the last call, the slots are not all the model's: the tree is walked."""
        if any(i >= len(self._watched) for i in self._watch.changed()):
            module = self.original
            return {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}
        tensors = {}
        for (owner, key), name in zip(self._watched, self._watched_names):
            value = owner.get(key)
            if value is not None:
                tensors[name] = value
        return tensors

    def accept_weights(self) -> None:
        """What the model's weights hold now is what the engines compute with."""
        self._watch.accept_all()

    def _follow_weights(self) -> None:
        """Auto-refit: where the model's weights were replaced or written in place since the last
        call (load_state_dict, an optimizer step, assignment), make the engines use the new values.
        One pass of the runtime's WeightWatch when nothing changed."""
        if not self._watch.changed():
            return
        if self._capturing:
            # Another thread's torch.export swaps the model's weights for fake tensors while it traces
            # (non-strict export): what the watch sees now is not the user's change. Followed at a later
            # call, once the capture has put the weights back.
            return
        with self._weights_lock:  # a refit on another thread may be loading these very weights
            changed = self._watch.changed()
            if any(i >= len(self._watched) for i in changed):  # a submodule replaced (model.head = ...)
                changed = self._watch_again(changed)
            if changed:
                self._follow(changed)

    def _watch_again(self, changed: list[int]) -> list[int]:
        """The module tree changed: watch its slots anew. Returns the new watch's entries whose tensor
        is not the one the engines were last given (a replaced submodule's, or one changed meanwhile)."""
        given, changed_set = {}, set(changed)
        for i, ((owner, key), name) in enumerate(zip(self._watched, self._watched_names)):
            given[name] = None if i in changed_set else owner.get(key)
        self._watch, self._watched, self._watched_names = capture.watch_weights(self.original)
        self.__dict__.pop("_state_dict_names", None)  # CompiledModule's, taken anew from the new tree
        return [
            i
            for i, ((owner, key), name) in enumerate(zip(self._watched, self._watched_names))
            if owner.get(key) is not given.get(name)
        ]

    def _follow(self, changed: list[int]) -> None:
        current: dict[str, torch.Tensor] = {}
        for i in changed:
            owner, key = self._watched[i]
            value = owner.get(key)
            if isinstance(value, torch.Tensor):
                current[self._watched_names[i]] = value
        engines = self.engines
        if self.settings.refit == "none" and engines:
            raise RefitError(
                f"{type(self.original).__name__}'s weights changed ({_listed(current)}), but it was compiled with "
                "refit='none', so its engines cannot follow: compile with refit='refit', or restore the weights",
                {name: "changed after a compile with refit='none'" for name in current},
            )
        indexes = [self.weight_names_of(engine) for engine in engines]
        if not self.uses_dynamo and not self.settings.weight_streaming and _converted(engines, indexes, current):
            # The model moved to another dtype or device (.half(), .to()): its engines are compiled
            # anew for it at the next call, and the old ones (with their memory) are dropped.
            self.drop_variants(f"its weights are now {_kinds(current)}")
            for i in changed:
                self._watch.accept(i)
            return
        problems: dict[str, str] = {}
        for engine, index in zip(engines, indexes):  # everything checked before any engine changes
            tensors = engine.weight_tensors()
            any_device = engine.settings.weight_streaming  # the engine copies weights from anywhere
            for name, t in current.items():
                if name in index and not capture.follows(t, tensors[index[name]], any_device):
                    old = tensors[index[name]]
                    problems[name] = (
                        f"is now {tuple(t.shape)} {t.dtype} on {t.device}, but the engine was compiled for "
                        f"{tuple(old.shape)} {old.dtype} on {old.device}"
                    )
                elif name in index and engine.settings.refit == "identical" and not self._as_built(name, t):
                    problems[name] = (
                        "holds other values than the engine was built with, and refit='identical' takes only "
                        "those (compile with refit='refit' for new values)"
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

    def _as_built(self, name: str, value: torch.Tensor) -> bool:
        """refit='identical': whether `value` holds the values the engines were built with. The engines
        read the model's memory, so the values as built are kept as digests, taken at the first compile."""
        built = self.__dict__.setdefault("_built_fingerprints", {})
        return built.get(name) in (None, _fingerprint(value))

    def _remember_values(self) -> None:
        if self.settings.refit == "identical" and "_built_fingerprints" not in self.__dict__:
            self.__dict__["_built_fingerprints"] = {
                name: _fingerprint(t) for name, t in self.original.state_dict(keep_vars=True).items()
            }



def _converted(engines: list, indexes: list, current: Mapping[str, torch.Tensor]) -> bool:
    """Whether some changed weight has another dtype or device than the engine computes with."""
    for engine, index in zip(engines, indexes):
        tensors = engine.weight_tensors()
        for name, t in current.items():
            if name in index:
                old = tensors[index[name]]
                if t.shape == old.shape and (t.dtype != old.dtype or t.device != old.device):
                    return True
    return False


def _kinds(tensors: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(sorted({f"{t.dtype} on {t.device}" for t in tensors.values()}))


def _listed(tensors: Mapping[str, Any], most: int = 5) -> str:
    names = sorted(tensors)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _fingerprint(t: torch.Tensor) -> str:
    """A digest of a tensor's values (refit='identical' keeps one per weight, as built)."""
    return hashlib.sha256(host_view(tensor_bytes(t).cpu())).hexdigest()
