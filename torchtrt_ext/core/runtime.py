"""Loads the C++ runtime (torchtrt_ext.core._C). A failed load is an error that says how to fix it."""

from __future__ import annotations

import torch  # noqa: F401  (loads the libtorch libraries that _C links against)

from .errors import InputError

try:
    from . import _C
except ImportError as exc:  # never hidden: nothing works without the runtime
    raise ImportError(
        f"torchtrt_ext's C++ runtime (torchtrt_ext.core._C) failed to load: {exc}. It is built when the "
        "project is installed; from the project root run: pip install --no-build-isolation -e ."
    ) from exc

_C.set_input_error(InputError)

Runner = _C.Runner
WeightWatch = _C.WeightWatch
LeafCheck = _C.LeafCheck
same_tensors = _C.same_tensors
built_with_cuda: bool = _C.built_with_cuda()

# CUDA streams and events owned by Python objects: each is destroyed with its object (CUDA finishes
# the work already enqueued first), and live_streams() / live_events() count those alive. The CPU
# build cannot make either (RuntimeError naming the missing CUDA) and counts 0.
CopyStream = _C.CopyStream
Event = _C.Event
live_streams = _C.live_streams
live_events = _C.live_events
