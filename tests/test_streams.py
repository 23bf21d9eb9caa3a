"""The stream-following runtime on CUDA: any stream, concurrent streams, CUDA-graph capture."""

import threading

import pytest
import torch

import torchtrt_ext
from tests import stress_streams, zoo

pytestmark = pytest.mark.cuda


def test_relu_repro_default_and_custom_streams_exact_1000_times():
    """The Torch-TensorRT bug: fp16 ReLU outputs all zeros at random under torch.cuda.stream(s)."""
    model = torch.nn.ReLU()
    compiled = torch.compile(model, backend="torchtrt_ext", dynamic=False)
    base = torch.randn(1, 3, 2160, 3840, dtype=torch.half, device="cuda")
    custom = torch.cuda.Stream()
    wrong = {"default": torch.zeros((), dtype=torch.long, device="cuda"),
             "custom": torch.zeros((), dtype=torch.long, device="cuda")}
    custom.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        for i in range(1000):
            where = "custom" if i % 2 else "default"
            stream = custom if i % 2 else torch.cuda.default_stream()
            with torch.cuda.stream(stream):
                x = base * (1.0 + (i % 7) / 8)  # a fresh input produced on the caller's stream
                y = compiled(x)
                wrong[where] += (y != torch.relu(x)).sum()
    torch.cuda.synchronize()
    assert wrong["default"].item() == 0 and wrong["custom"].item() == 0


def test_stress_threads_and_streams_zero_wrong_outputs():
    result = stress_streams.run(calls=10_000, threads=4)
    assert result["calls"] == 10_000
    assert result["wrong"] == 0


def test_stress_in_cuda_graph_mode_zero_wrong_outputs():
    result = stress_streams.run(calls=2_000, threads=4, cuda_graphs=True)
    assert result["calls"] == 2_000
    assert result["wrong"] == 0


def test_cuda_graph_mode_one_graph_set_per_stream_and_outputs_not_overwritten():
    model = zoo.build("encoder", "cuda")
    compiled = torchtrt_ext.compile(model, (torch.randn(4, 12, 64, device="cuda"),), cuda_graphs=True)
    engine = compiled.engines[0]
    streams = [torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.default_stream()]
    with torch.no_grad():
        kept = []
        for batch in (4, 6):
            for s in streams:
                with torch.cuda.stream(s):
                    for _ in range(3):
                        x = torch.randn(batch, 12, 64, device="cuda")
                        kept.append((x, compiled(x)))  # earlier outputs must survive later replays
        torch.cuda.synchronize()
        for x, y in kept:
            zoo.assert_matches(y, model(x), torch.float32)
    assert engine.slots_created == 3
    assert engine.graphs_captured == 6  # 3 streams x 2 batch sizes


class _Noisy(torch.nn.Module):
    def forward(self, x):
        return x * 2 + torch.rand_like(x)


def test_cuda_graph_mode_falls_back_with_a_warning_where_capture_fails_and_leaves_rng_usable():
    """Random numbers cannot be captured by the runtime's graphs (torch's generator is not told), so such
    an engine warns and runs without a graph; the generator stays usable for everyone else."""
    compiled = torchtrt_ext.compile(_Noisy().eval(), (torch.randn(8, 16, device="cuda"),), cuda_graphs=True)
    x = torch.randn(8, 16, device="cuda")
    with pytest.warns(RuntimeWarning, match="could not capture a CUDA graph for this input signature"):
        first = compiled(x)
    for out in (first, compiled(x)):
        noise = out - 2 * x
        assert bool(((noise >= 0) & (noise < 1)).all()) and noise.std().item() > 0.1
    assert compiled.engines[0].graphs_captured == 0
    assert torch.randn(4, device="cuda").isfinite().all()


@pytest.mark.parametrize("capture_stream", ["given", "torch_default"])
def test_cuda_graph_capture_on_a_custom_stream_replays_correctly(capture_stream):
    model = zoo.build("encoder", "cuda")
    compiled = torch.compile(model, backend="torchtrt_ext", dynamic=False)
    static_x = torch.randn(4, 12, 64, device="cuda")
    s = torch.cuda.Stream()
    with torch.no_grad():
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                compiled(static_x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s if capture_stream == "given" else None):
            static_y = compiled(static_x)
        for _ in range(10):
            static_x.copy_(torch.randn(4, 12, 64, device="cuda"))
            graph.replay()
            torch.cuda.synchronize()
            zoo.assert_matches(static_y, model(static_x), torch.float32)


def test_each_concurrent_stream_gets_its_own_slot():
    from torchtrt_ext.core.runtime import Runner

    runner = Runner("cuda", 16)
    streams = [torch.cuda.Stream() for _ in range(3)]
    seen: dict[int, set[int]] = {}

    def spy(inputs, slot):
        seen.setdefault(torch.cuda.current_stream().stream_id, set()).add(slot)
        return inputs[0] * 2

    for _ in range(5):
        for s in streams:
            with torch.cuda.stream(s):
                x = torch.randn(4, device="cuda")
                assert torch.equal(runner.run(spy, (x,)), x * 2)
    assert len(seen) == 3
    slots = [next(iter(v)) for v in seen.values()]
    assert all(len(v) == 1 for v in seen.values()), "a stream kept its slot"
    assert len(set(slots)) == 3, "different streams, different slots"

    model = zoo.build("mlp", "cuda")  # the same through an engine, whose runtime calls the compiled code
    compiled = torchtrt_ext.compile(model, (torch.randn(4, 32, device="cuda"),))
    with torch.no_grad():
        for _ in range(5):
            for s in streams:
                with torch.cuda.stream(s):
                    x = torch.randn(4, 32, device="cuda")
                    zoo.assert_matches(compiled(x), model(x), torch.float32)
    assert compiled.engines[0].slots_created == 3


def test_default_stream_caller_sees_outputs_and_engine_sees_inputs():
    """Legacy default stream: the engine runs on a fenced side stream; results are ordered for the caller."""
    model = zoo.build("cnn", "cuda")
    compiled = torch.compile(model, backend="torchtrt_ext", dynamic=False)
    with torch.no_grad():
        x0 = torch.randn(8, 3, 16, 16, device="cuda")
        compiled(x0)
        torch.cuda.synchronize()
        for _ in range(50):
            torch.cuda._sleep(200_000)  # keep the default stream busy: an unfenced engine would race
            x = torch.randn(8, 3, 16, 16, device="cuda")
            y = compiled(x)
            assert torch.cuda.current_stream() == torch.cuda.default_stream()
            zoo.assert_matches(y, model(x), torch.float32)


def test_engine_error_on_side_stream_leaves_the_engine_usable():
    model = zoo.build("mlp", "cuda")
    compiled = torchtrt_ext.compile(model, (torch.randn(4, 32, device="cuda"),))
    engine = compiled.engines[0]
    with torch.no_grad():
        with pytest.raises(Exception):
            engine(torch.randn(4, 31, device="cuda"))  # wrong width: Inductor's shape assertion
        x = torch.randn(4, 32, device="cuda")
        zoo.assert_matches(compiled(x), model(x), torch.float32)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


def test_threads_on_one_engine_never_share_a_slot():
    """Four threads on four streams through one CUDA runner; fn sleeps (GIL released) while it holds
    its slot, so overlapping holders of one slot would be seen."""
    import time

    from torchtrt_ext.core.runtime import Runner

    runner = Runner("cuda", 16)
    lock = threading.Condition()
    active: set[int] = set()
    clashes, overlaps = [], []

    def fn(inputs, slot):
        with lock:
            if slot in active:
                clashes.append(slot)
            active.add(slot)
            if len(active) > 1:
                overlaps.append(len(active))
                lock.notify_all()
            elif not overlaps:  # until an overlap is seen, wait a while for another thread to come in
                lock.wait_for(lambda: len(active) > 1, timeout=0.05)
        try:
            time.sleep(0.0005)
            return inputs[0] + 1
        finally:
            with lock:
                active.discard(slot)

    def worker():
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            for _ in range(200):
                x = torch.randn(4, device="cuda")
                assert torch.equal(runner.run(fn, (x,)), x + 1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    assert not clashes
    assert overlaps, "the threads never overlapped, so the test proved nothing"
