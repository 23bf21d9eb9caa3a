"""The runtime's CUDA streams and events (_C.CopyStream, _C.Event): owned by their Python objects, freed
with them, counted by _C.live_streams() / _C.live_events(); and copy_async's ordering through them."""

import pytest
import torch

from torchtrt_ext.core import runtime as _runtime
from torchtrt_ext.core.runtime import _C


def test_raw_handle_functions_are_gone():
    for name in ("create_stream", "create_event", "destroy_event"):
        assert not hasattr(_C, name), name


@pytest.mark.skipif(_runtime.built_with_cuda, reason="this build has CUDA")
def test_cpu_build_counts_nothing_and_refuses_streams_and_events_with_the_fix():
    assert _C.live_streams() == 0 and _C.live_events() == 0
    with pytest.raises(RuntimeError, match=r"built without CUDA .* cannot make a CopyStream .* Rebuild with CUDA_HOME"):
        _C.CopyStream(0)
    with pytest.raises(RuntimeError, match=r"built without CUDA .* cannot make an Event .* Rebuild with CUDA_HOME"):
        _C.Event(0)
    assert _C.live_streams() == 0 and _C.live_events() == 0
    _C.copy_async([], [])  # nothing to copy: fine in every build
    with pytest.raises(ValueError, match="copy_async: this build has no CUDA"):
        _C.copy_async([torch.zeros(2)], [torch.ones(2)])


@pytest.mark.cuda
def test_streams_and_events_are_freed_with_their_objects():
    streams, events = _C.live_streams(), _C.live_events()
    made = [(_C.CopyStream(0), _C.Event(0)) for _ in range(50)]
    assert _C.live_streams() == streams + 50 and _C.live_events() == events + 50
    assert all(s.device == 0 and e.device == 0 for s, e in made)
    del made
    assert _C.live_streams() == streams and _C.live_events() == events
    for _ in range(50):  # made and dropped one at a time
        _C.CopyStream(0)
        _C.Event(0)
    assert _C.live_streams() == streams and _C.live_events() == events


def _late(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random tensor and a tensor that becomes equal to it on the current stream only after a long
    GPU sleep: work on another stream that does not wait for the current stream sees zeros."""
    expected = torch.randn(n, device="cuda")
    late = torch.zeros(n, device="cuda")
    torch.cuda._sleep(20_000_000)  # tens of milliseconds of GPU time on the current stream
    late.copy_(expected)
    return expected, late


@pytest.mark.cuda
def test_copy_async_on_a_stream_waits_for_its_event_and_records_the_other():
    stream, ready, done = _C.CopyStream(0), _C.Event(0), _C.Event(0)
    for n in (1, 1000, 1 << 20):
        expected, src = _late(n)
        _C.current_record(0, ready)  # src is written once the current stream reaches this
        dst = torch.empty_like(src)
        _C.copy_async([dst], [src], stream=stream, wait=ready, record=done)
        _C.current_wait(0, done)  # dst is read after the copy
        assert torch.equal(dst, expected)


@pytest.mark.cuda
def test_copy_async_from_pinned_host_memory_on_a_side_current_stream():
    stream, done = _C.CopyStream(0), _C.Event(0)
    side = torch.cuda.Stream()
    src = [torch.randn(4096).pin_memory(), torch.randint(0, 100, (7, 3), dtype=torch.int32).pin_memory()]
    with torch.cuda.stream(side):
        dst = [torch.empty(s.shape, dtype=s.dtype, device="cuda") for s in src]
        _C.copy_async(dst, src, stream, None, done)
        _C.current_wait(0, done)
        assert all(torch.equal(d.cpu(), s) for d, s in zip(dst, src))


@pytest.mark.cuda
def test_work_enqueued_on_a_stream_completes_after_its_object_is_dropped():
    streams = _C.live_streams()
    expected = torch.randn(1 << 22, device="cuda")
    dst = torch.empty_like(expected)
    stream = _C.CopyStream(0)
    _C.copy_async([dst], [expected], stream=stream)
    del stream  # destroyed now; CUDA frees it once the copy is done
    assert _C.live_streams() == streams
    torch.cuda.synchronize()
    assert torch.equal(dst, expected)


@pytest.mark.cuda
def test_copy_async_takes_objects_or_none_and_checks_them():
    src, dst = [torch.randn(8, device="cuda")], [torch.empty(8, device="cuda")]
    event = _C.Event(0)
    with pytest.raises(ValueError, match="copy_async: wait and record need a stream"):
        _C.copy_async(dst, src, None, None, event)
    with pytest.raises(ValueError, match="copy_async: wait and record need a stream"):
        _C.copy_async(dst, src, wait=event)
    with pytest.raises(TypeError):
        _C.copy_async(dst, src, 0)  # raw handles are no longer accepted
    with pytest.raises(TypeError):
        _C.copy_async(dst, src, _C.CopyStream(0), _C.CopyStream(0))  # a stream is not an event
    with pytest.raises(TypeError):
        _C.current_record(0, 0)
    _C.copy_async(dst, src)  # the current stream
    assert torch.equal(dst[0], src[0])
