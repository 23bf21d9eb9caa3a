"""Weight streaming: outputs equal the non-streamed engine at every budget, also after a refit; memory
stays within the budget plus activations plus the ring; bad budgets are clear errors."""

import pytest
import torch
import torch.utils._pytree as pytree

import torchtrt_ext
from tests import zoo
from torchtrt_ext import OptionError, TorchTRTExtError
from torchtrt_ext.core import lifting
from torchtrt_ext.engines import tensorrt
from torchtrt_ext.core.settings import Settings
from torchtrt_ext.core.settings import Budget
from torchtrt_ext.engines.streamed import StreamedEngine

BUDGETS = (0, 25, 50, 75, 100)
STREAMABLE = ["mlp", "cnn", "encoder", "buffers", "multi_io"]  # graph_break: export cannot capture it


@pytest.mark.parametrize("name", STREAMABLE)
def test_program_logic_on_the_cpu_equals_eager_at_every_budget_and_after_a_load(name):
    """The segmented program with synchronous copies (what the CUDA path runs, less the streams)."""
    model = zoo.build(name)
    args, kwargs = zoo.inputs(name, 4)
    ep = torch.export.export(model, args, kwargs, strict=False)
    program = _cpu_engine(ep, 4)
    assert program.segment_count >= 2
    flat = pytree.tree_leaves((args, kwargs))
    new = zoo.build(name, seed=9)
    names = [w.name for w in lifting.from_export(torch.export.export(new, args, kwargs, strict=False)).weights]

    def tensors(m):
        return {**dict(m.named_parameters()), **dict(m.named_buffers())}

    new_values = {i: tensors(new)[n] for i, n in enumerate(names)}
    for percent in BUDGETS:
        placement = program.place(program.total_bytes * percent // 100)
        assert placement.resident_bytes <= program.total_bytes * percent // 100
        if percent == 0:
            assert placement.resident_bytes == 0 and placement.ring_bytes > 0
        if percent == 100:
            assert placement.ring_bytes == 0
        program.load_weights({i: tensors(zoo.build(name))[n] for i, n in enumerate(names)})
        zoo.assert_matches(pytree.tree_unflatten(program(*flat), ep.call_spec.out_spec), model(*args, **kwargs), torch.float32)
        program.load_weights(new_values)  # a refit at this budget
        zoo.assert_matches(pytree.tree_unflatten(program(*flat), ep.call_spec.out_spec), new(*args, **kwargs), torch.float32)


def _cpu_engine(ep, segments):
    """The streaming engine's program with synchronous copies on the CPU (what the CUDA path runs, less the streams)."""
    return StreamedEngine(lifting.from_export(ep), Settings(weight_streaming=True, weight_streaming_budget=0), torch.device("cpu"), segments)


def test_budget_forms_and_their_errors():
    assert Budget.parse(1000).resolve(4000, None) == 1000
    assert Budget.parse("25%").resolve(4000, None) == 1000
    assert Budget.parse(" 0% ").resolve(4000, None) == 0
    cases = {
        -1: "weight_streaming_budget must not be negative, got -1",
        4001: "weight_streaming_budget 4001 is above the 4000 bytes of streamable weights; use at most 4000 (or '100%')",
        "101%": "weight_streaming_budget '101%' must be a percentage from 0% to 100%",
        "half": "weight_streaming_budget 'half' must be bytes (int), a percentage like '40%' or 'auto'",
        2.5: "weight_streaming_budget must be bytes (int), a percentage like '40%' or 'auto', got 2.5",
    }
    for value, message in cases.items():
        with pytest.raises(OptionError) as e:
            Budget.parse(value).resolve(4000, None)
        assert str(e.value) == message


def test_streaming_options_are_checked():
    assert Settings(weight_streaming=True, cuda_graphs=True).cuda_graphs  # the built-in engine captures both
    with pytest.raises(OptionError, match="option 'weight_streaming_budget' applies only with weight_streaming=True"):
        Settings(weight_streaming_budget="50%")
    with pytest.raises(OptionError, match="must be a percentage from 0% to 100%"):
        Settings(weight_streaming=True, weight_streaming_budget="150%")


def test_streaming_without_cuda_inputs_is_refused_with_the_fix():
    model = zoo.build("mlp")
    with pytest.raises(TorchTRTExtError, match="weight streaming needs a CUDA device, but the inputs and weights are on cpu"):
        torchtrt_ext.compile(model, zoo.inputs("mlp", 4)[0], weight_streaming=True)
    with pytest.raises(TorchTRTExtError, match="no weight-streaming engines: compile it with weight_streaming=True"):
        torchtrt_ext.weight_streaming(torchtrt_ext.compile(model, zoo.inputs("mlp", 4)[0]))


def test_tensorrt_settings_map_refit_and_streaming_and_refuse_the_crashing_combination():
    s = Settings(refit="refit", weight_streaming=True, weight_streaming_budget="50%")
    assert tensorrt.compile_settings(s, "10.8.0") == {
        "immutable_weights": False,
        "refit_identical_engine_weights": False,
        "enable_weight_streaming": True,
    }
    assert tensorrt.compile_settings(Settings(refit="identical"), "10.3.0")["refit_identical_engine_weights"] is True
    assert tensorrt.compile_settings(Settings(refit="none"), "10.3.0")["immutable_weights"] is True
    with pytest.raises(OptionError) as e:
        tensorrt.compile_settings(s, "10.7.0")
    assert str(e.value) == (
        "TensorRT 10.7.0 crashes ('misaligned address') when an engine built with REFIT streams its weights "
        "(fixed in 10.8): use refit='identical' (REFIT_IDENTICAL works with weight streaming), refit='none', "
        "or TensorRT >= 10.8"
    )
    assert tensorrt.compile_settings(Settings(refit="identical", weight_streaming=True), "10.7.0")["enable_weight_streaming"]
    with pytest.raises(OptionError) as e:
        tensorrt.compile_settings(Settings(refit="identical", weight_streaming=True, cuda_graphs=True), "10.8.0")
    assert str(e.value) == (
        "the TensorRT engine does not capture weight streaming in CUDA graphs (TensorRT streams the weights "
        "itself, and torchtrt_ext has not been tested capturing that): use engine='builtin', or drop one of "
        "cuda_graphs and weight_streaming"
    )


# --- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("name", STREAMABLE)
def test_streamed_equals_the_resident_engine_at_every_budget_and_after_refit(name):
    model_cpu = zoo.build(name, "cpu")  # the model stays on the host
    args, kwargs = zoo.inputs(name, 4, "cuda")
    resident = torchtrt_ext.compile(zoo.build(name, "cuda"), args, kwargs, dynamic_batch=False)
    streamed = torchtrt_ext.compile(model_cpu, args, kwargs, weight_streaming=True, dynamic_batch=False)
    new_cuda = zoo.build(name, "cuda", seed=9)
    for key, buf in zoo.build(name, "cuda").named_buffers():  # not in state_dicts: refits keep them
        if key not in new_cuda.state_dict():
            new_cuda.get_buffer(key).copy_(buf)
    ws = torchtrt_ext.weight_streaming(streamed)
    with torch.no_grad():
        for percent in BUDGETS:
            ws.device_budget = f"{percent}%"
            assert ws.resident_bytes <= ws.total_bytes * percent // 100
            torchtrt_ext.refit(resident, zoo.build(name, "cuda").state_dict())
            torchtrt_ext.refit(streamed, zoo.build(name, "cpu").state_dict())
            for _ in range(2):
                zoo.assert_matches(streamed(*args, **kwargs), resident(*args, **kwargs), torch.float32)
            torchtrt_ext.refit(resident, new_cuda.state_dict())
            torchtrt_ext.refit(streamed, new_cuda.state_dict())  # CUDA values into host masters
            zoo.assert_matches(streamed(*args, **kwargs), resident(*args, **kwargs), torch.float32)
            zoo.assert_matches(streamed(*args, **kwargs), new_cuda(*args, **kwargs), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["mlp", "encoder", "multi_io"])
def test_streamed_cuda_graphs_equal_the_resident_engine_at_every_budget_and_after_refit(name):
    """A whole streamed call (copies and fences included) captured as one CUDA graph: replays equal the
    resident engine; a budget change drops the graphs (they read the old ring), a refit keeps them."""
    args, kwargs = zoo.inputs(name, 4, "cuda")
    resident = torchtrt_ext.compile(zoo.build(name, "cuda"), args, kwargs, dynamic_batch=False)
    streamed = torchtrt_ext.compile(zoo.build(name, "cpu"), args, kwargs, weight_streaming=True, cuda_graphs=True, dynamic_batch=False)
    engine = streamed.engines[0]
    new_cuda = zoo.build(name, "cuda", seed=9)
    for key, buf in zoo.build(name, "cuda").named_buffers():
        if key not in new_cuda.state_dict():
            new_cuda.get_buffer(key).copy_(buf)
    ws = torchtrt_ext.weight_streaming(streamed)
    with torch.no_grad():
        for percent in BUDGETS:
            ws.device_budget = f"{percent}%"
            assert engine.graphs_captured == 0
            torchtrt_ext.refit(resident, zoo.build(name, "cuda").state_dict())
            torchtrt_ext.refit(streamed, zoo.build(name, "cpu").state_dict())
            for _ in range(3):  # capture, then replays
                zoo.assert_matches(streamed(*args, **kwargs), resident(*args, **kwargs), torch.float32)
            assert engine.graphs_captured == 1
            torchtrt_ext.refit(resident, new_cuda.state_dict())
            torchtrt_ext.refit(streamed, new_cuda.state_dict())  # in place: the graph stays
            assert engine.graphs_captured == 1
            zoo.assert_matches(streamed(*args, **kwargs), new_cuda(*args, **kwargs), torch.float32)
            other = zoo.inputs(name, 4, "cuda")  # new random values, same signature: the same graph
            zoo.assert_matches(streamed(*other[0], **other[1]), new_cuda(*other[0], **other[1]), torch.float32)


@pytest.mark.cuda
def test_streamed_cuda_graph_replays_on_another_thread_while_the_budget_changes():
    """A thread replays on its own stream while the main thread changes the budget and refits the same
    values: a change waits for replays in progress, so every output is right."""
    import threading

    args, _ = zoo.inputs("mlp", 4, "cuda")
    model = zoo.build("mlp", "cuda")
    expected = model(*args).detach()
    streamed = torchtrt_ext.compile(zoo.build("mlp", "cpu"), args, weight_streaming=True, cuda_graphs=True, dynamic_batch=False)
    stop, errors, calls = threading.Event(), [], [0]

    def runner():
        try:
            with torch.no_grad(), torch.cuda.stream(torch.cuda.Stream()):
                while not stop.is_set():
                    out = streamed(*args)
                    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
                    calls[0] += 1
        except Exception as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=runner)
    thread.start()
    ws = torchtrt_ext.weight_streaming(streamed)
    for i in range(20):
        ws.device_budget = f"{(i % 5) * 25}%"
        torchtrt_ext.refit(streamed, model.state_dict())
    stop.set()
    thread.join()
    assert not errors, errors[0]
    assert calls[0] > 0
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(streamed(*args), expected, rtol=1e-4, atol=1e-4)
    assert streamed.engines[0].graphs_captured >= 1  # captured, not run without graphs


class _Deep(torch.nn.Module):
    def __init__(self, width=2048, depth=8):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return x


@pytest.mark.cuda
def test_peak_device_memory_stays_within_budget_plus_activations_plus_ring():
    torch.manual_seed(0)
    model = _Deep().half().eval()  # 8 x 8 MiB of fp16 weights, on the host
    x = torch.randn(16, 2048, device="cuda", dtype=torch.float16)
    expected = model.cuda()(x).float()
    model.cpu()
    torch.cuda.empty_cache()
    streamed = torchtrt_ext.compile(model, (x,), weight_streaming=True, dynamic_batch=False, weight_streaming_budget="100%")
    ws = torchtrt_ext.weight_streaming(streamed)
    with torch.no_grad():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        streamed(x)
        torch.cuda.synchronize()
        activations = torch.cuda.max_memory_allocated() - before  # fully resident: no ring, no copies
        assert ws.ring_bytes == 0
        for percent in (0, 25, 50, 75):
            ws.device_budget = f"{percent}%"
            streamed(x)  # rings are made at the first call
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = streamed(x)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            budget = ws.total_bytes * percent // 100
            assert ws.resident_bytes <= budget
            weights_and_ring = streamed.engines[0].memory().weight_bytes
            assert weights_and_ring <= budget + ws.ring_bytes
            assert peak - before <= activations + (1 << 20), f"{percent}%: the call took more than its activations"
            assert torch.cuda.memory_allocated() - before == out.numel() * out.element_size()  # only the output
            torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
            if percent < 75:
                assert ws.ring_bytes > 0
            del out  # the next budget's "before" must not count this output


class _ViewEscape(torch.nn.Module):
    """A view of a weight made in one segment and read in the next (both streamed)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(64, 64) / 8) for _ in range(4))

    def forward(self, x):
        t = self.w[0].t()
        y = x @ self.w[1]
        z = (y @ t) @ self.w[2]
        return z @ self.w[3], self.w[3]  # a weight returned as it is


class _ChannelsLast(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv2d(8, 16, 3)
        self.d = torch.nn.Conv2d(16, 16, 3)

    def forward(self, x):
        return self.d(self.c(x))


@pytest.mark.parametrize("case", ["view_escape", "channels_last"])
def test_program_handles_weight_views_weight_outputs_and_non_contiguous_weights(case):
    torch.manual_seed(0)
    if case == "view_escape":
        model, x = _ViewEscape().eval(), torch.randn(8, 64)
    else:
        model, x = _ChannelsLast().eval().to(memory_format=torch.channels_last), torch.randn(1, 8, 12, 12)
    ep = torch.export.export(model, (x,), strict=False)
    program = _cpu_engine(ep, 4)
    expected = pytree.tree_leaves(model(x))
    for percent in (0, 50, 100):
        program.place(program.total_bytes * percent // 100)
        for _ in range(2):  # the second call reuses the ring that held the first call's weights
            got = program(x)
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_budget_changes_and_refits_while_another_thread_runs():
    import threading

    model = zoo.build("mlp")
    args, _ = zoo.inputs("mlp", 4)
    ep = torch.export.export(model, args, strict=False)
    program = _cpu_engine(ep, 3)
    program.place(0)
    expected = model(*args)
    stop, errors, calls = threading.Event(), [], [0]

    def runner():
        try:
            while not stop.is_set():
                torch.testing.assert_close(program(args[0])[0], expected, rtol=1e-5, atol=1e-5)
                calls[0] += 1
        except Exception as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=runner)
    thread.start()
    values = {i: w.tensor for i, w in enumerate(lifting.from_export(ep).weights)}
    for i in range(60):
        program.place(program.total_bytes * (i % 5) // 4 if i % 5 < 5 else 0)
        program.load_weights(values)  # the same values: outputs must not change
    stop.set()
    thread.join()
    assert not errors, errors[0]
    assert calls[0] > 0


@pytest.mark.cuda
def test_fifty_streamed_engines_built_and_dropped_leave_no_stream_or_event():
    """Copy streams and events are the runtime's objects, freed with their engine: none leaks."""
    import gc

    from torchtrt_ext.core import runtime

    model = zoo.build("mlp", "cuda")
    args, _ = zoo.inputs("mlp", 4, "cuda")
    ep = torch.export.export(model, args, strict=False)
    gc.collect()
    streams, events = runtime.live_streams(), runtime.live_events()
    side = torch.cuda.Stream()
    for _ in range(50):
        engine = StreamedEngine(lifting.from_export(ep), Settings(weight_streaming=True, weight_streaming_budget=0), segments=3)
        engine(*args)
        with torch.cuda.stream(side):  # a second execution slot: its own copy stream and events
            engine(*args)
        torch.cuda.synchronize()
        assert runtime.live_streams() > streams and runtime.live_events() > events
        del engine
    gc.collect()
    assert (runtime.live_streams(), runtime.live_events()) == (streams, events)


class _StreamedAccumulator(torch.nn.Module):
    """Two layers whose weights stream, and an input written in place, as a decode step writes its
    KV cache."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 64)

    def forward(self, x, acc):
        y = self.b(torch.relu(self.a(x)))
        acc.mul_(0.5).add_(y)
        return y.sigmoid()


@pytest.mark.cuda
@pytest.mark.parametrize("percent", [0, 50])
def test_a_streamed_step_that_writes_its_input_is_one_graph_replayed_on_that_input(percent):
    """weight_streaming with cuda_graphs over a graph that writes an input: a whole streamed step,
    copies included, is one graph captured on the input's own address; the caller's tensor takes each
    call's write once, and the same tensor replays the graph."""
    torch.manual_seed(0)
    model = _StreamedAccumulator().eval()  # on the host
    gpu = _StreamedAccumulator().cuda().eval()
    gpu.load_state_dict(model.state_dict())
    acc = torch.randn(4, 64, device="cuda")
    expected_acc = acc.clone()
    streamed = torchtrt_ext.compile(
        model, (torch.randn(4, 256, device="cuda"), acc.clone()), weight_streaming=True,
        weight_streaming_budget=f"{percent}%", cuda_graphs=True, dynamic_batch=False,
    )
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(4, 256, device="cuda")
            zoo.assert_matches(streamed(x, acc), gpu(x, expected_acc), torch.float32)
            torch.testing.assert_close(acc, expected_acc, rtol=1e-5, atol=1e-5)
    (engine,) = streamed.engines
    assert engine.writes == (1,) and engine.graphs_captured == 1
