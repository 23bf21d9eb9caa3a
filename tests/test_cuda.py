"""The built-in engine on CUDA: half precision, CUDA-graph mode, weights never copied."""

import warnings

import pytest
import torch

import torchtrt_ext
from tests import zoo

pytestmark = pytest.mark.cuda

HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", ["mlp", "cnn", "encoder", "multi_io"])
def test_backend_half_precision_matches_eager(name, dtype):
    model = zoo.build(name, "cuda", dtype)
    compiled = torch.compile(model, backend="torchtrt_ext")
    with torch.no_grad():
        for batch in (2, 7):
            args, kwargs = zoo.inputs(name, batch, "cuda", dtype)
            zoo.assert_matches(compiled(*args, **kwargs), model(*args, **kwargs), dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", ["cnn", "encoder"])
def test_wrapper_half_precision_matches_eager(name, dtype):
    model = zoo.build(name, "cuda", dtype)
    compiled = torchtrt_ext.compile(model, zoo.inputs(name, 4, "cuda", dtype)[0])
    with torch.no_grad():
        for batch in (4, 9):
            args, kwargs = zoo.inputs(name, batch, "cuda", dtype)
            zoo.assert_matches(compiled(*args, **kwargs), model(*args, **kwargs), dtype)


class _Wide(torch.nn.Module):
    """Large weights (3 x 64 MiB) and a tiny input: what CUDA-graph mode is for. Large enough that a
    weight copy stands out against what a graph legitimately adds: the cuBLAS workspace of its capture
    stream (32 MiB on Hopper) and its activations."""

    def __init__(self, width: int = 4096):
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(3)])

    def forward(self, x):
        return torch.tanh(self.layers(x))


@pytest.mark.parametrize("entry", ["backend", "wrapper"])
def test_cuda_graphs_match_eager_and_never_copy_the_weights(entry):
    torch.manual_seed(0)
    model = _Wide().cuda().eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randn(2, 4096, device="cuda")
    if entry == "backend":
        compiled = torch.compile(model, backend="torchtrt_ext", options={"cuda_graphs": True}, dynamic=False)
    else:
        compiled = torchtrt_ext.compile(model, (x,), cuda_graphs=True, dynamic_batch=False)
    with torch.no_grad():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(6):  # the first call compiles and records the CUDA graph
            x = torch.randn(2, 4096, device="cuda")
            out = compiled(x).clone()
            zoo.assert_matches(out, model(x), torch.float32)
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before
    assert grown < weight_bytes / 4, f"memory grew by {grown} bytes: weights copied into the CUDA graph?"
    engines = torchtrt_ext.engines_of(model)
    assert engines and all(e.memory().owned_bytes == 0 for e in engines)
    assert sum(e.graphs_captured for e in engines) >= 1


def test_engine_reports_device_memory_shared_with_the_model():
    model = _Wide(512).cuda().eval()
    compiled = torchtrt_ext.compile(model, (torch.randn(2, 512, device="cuda"),))
    mem = compiled.engines[0].memory()
    assert mem.device == torch.device("cuda", torch.cuda.current_device())
    assert mem.weight_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert mem.owned_bytes == 0


def test_cpu_input_to_cuda_engine_is_a_clear_error():
    model = zoo.build("mlp", "cuda")
    compiled = torch.compile(model, backend="torchtrt_ext")
    with torch.no_grad():
        compiled(torch.randn(2, 32, device="cuda"))
        engine = torchtrt_ext.engines_of(model)[0]
        with pytest.raises(torchtrt_ext.InputError, match=r"input 0 is on cpu but the engine runs on cuda:0"):
            engine(torch.randn(2, 32))


class _Accumulates(torch.nn.Module):
    """Writes its second input in place, as a KV cache update does."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)

    def forward(self, x, acc):
        y = self.fc(x)
        acc.mul_(0.5).add_(y)
        return y.relu()


def _with_cuda_graphs(model, entry):
    """The model compiled with cuda_graphs=True and static shapes, through one entry point."""
    if entry == "backend":
        return torch.compile(model, backend="torchtrt_ext", options={"cuda_graphs": True}, dynamic=False)
    return torchtrt_ext.compile(model, cuda_graphs=True, dynamic_batch=False)


@pytest.mark.parametrize("same_tensor", [True, False])
@pytest.mark.parametrize("entry", ["backend", "wrapper"])
def test_cuda_graphs_capture_an_input_the_code_writes_at_its_own_address(entry, same_tensor):
    """The runtime's graphs replay on copies of the inputs, except an input the code writes (a KV
    cache): that one is captured at its own address, so the caller's tensor takes each call's writes
    exactly once (the warm-up before a capture runs on a scratch copy). The same tensor again replays
    the graph captured for it; another tensor gets its own graph."""
    torch.manual_seed(0)
    model = _Accumulates().cuda().eval()
    compiled = _with_cuda_graphs(model, entry)
    acc = torch.randn(8, 64, device="cuda")
    expected_acc = acc.clone()
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(8, 64, device="cuda")
            if not same_tensor:
                acc = torch.randn(8, 64, device="cuda")
                expected_acc = acc.clone()
            expected = model(x, expected_acc)
            zoo.assert_matches(compiled(x, acc), expected, torch.float32)
            torch.testing.assert_close(acc, expected_acc, rtol=1e-5, atol=1e-5)
    (engine,) = torchtrt_ext.engines_of(model)
    assert engine.writes == (1,)
    assert engine.graphs_captured == 1 if same_tensor else 1 <= engine.graphs_captured <= 4


def test_graphs_on_written_inputs_of_new_addresses_make_room_for_each_other():
    """A new KV cache per request, each used for 40 steps: each gets its graph, and once a stream's 16
    graphs are taken the one out of use longest goes (the first cache's comes back when it does),
    rather than every later cache running without graphs."""
    torch.manual_seed(0)
    model = _Accumulates().cuda().eval()
    compiled = torchtrt_ext.compile(model, cuda_graphs=True, dynamic_batch=False)
    caches = [torch.randn(8, 64, device="cuda") for _ in range(20)]  # all alive: 20 addresses
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "further signatures run without graphs"
        for acc in caches + caches[:1]:
            expected_acc = acc.clone()
            for _ in range(40):
                x = torch.randn(8, 64, device="cuda")
                expected = model(x, expected_acc)
                zoo.assert_matches(compiled(x, acc), expected, torch.float32)
            torch.testing.assert_close(acc, expected_acc, rtol=1e-4, atol=1e-4)
    (engine,) = compiled.engines
    assert engine.graphs_captured == 16


class _AccumulatesAndReturns(_Accumulates):
    def forward(self, x, acc):
        y = self.fc(x)
        acc.mul_(0.5).add_(y)
        return y.relu(), acc  # the written input returned, as a model returns its KV cache


@pytest.mark.parametrize("entry", ["backend", "wrapper"])
def test_a_written_input_the_code_returns_comes_back_from_a_graph_as_the_callers_tensor(entry):
    """A replay clones its outputs out of the graph's pool, except an output that is a written input
    itself: that one is the caller's tensor (not a copy of a whole KV cache at each step, and not a new
    address for the next call to capture another graph on)."""
    torch.manual_seed(0)
    model = _AccumulatesAndReturns().cuda().eval()
    compiled = _with_cuda_graphs(model, entry)
    acc = torch.randn(8, 64, device="cuda")
    expected_acc = acc.clone()
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(8, 64, device="cuda")
            got, expected = compiled(x, acc), model(x, expected_acc)
            zoo.assert_matches(got[0], expected[0], torch.float32)
            torch.testing.assert_close(acc, expected_acc, rtol=1e-5, atol=1e-5)
            assert got[1].data_ptr() == acc.data_ptr()
            if entry == "wrapper":
                assert got[1] is acc
    (engine,) = torchtrt_ext.engines_of(model)
    assert engine.graphs_captured == 1


def test_static_cache_generate_with_cuda_graphs_equals_eager_on_both_routes():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).cuda().eval()  # fp32: greedy tokens compared exactly
    ids = torch.randint(1, 128, (2, 9), device="cuda")
    mask = torch.ones(2, 9, dtype=torch.long, device="cuda")
    mask[1, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    greedy = dict(max_new_tokens=16, do_sample=False, cache_implementation="static")

    def replayed(engines):  # the decode steps ran as graph replays: few captures, many calls
        calls, captured = sum(e.calls for e in engines), sum(e.graphs_captured for e in engines)
        assert 1 <= captured <= 4 < calls, (captured, calls)
        assert any(e.writes for e in engines)  # the cache, written by the engines in place

    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, disable_compile=True, **greedy).tolist()  # eager
        wrapped = torchtrt_ext.compile(model, cuda_graphs=True)
        assert wrapped.generate(ids, attention_mask=mask, **greedy).tolist() == expected
        replayed(wrapped.engines)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="torchtrt_ext", options={"cuda_graphs": True})
        # as the README says for this route: transformers' own compile of __call__ would wrap the
        # compiled forward once more (tests/test_generate.py runs that combination on the CPU)
        assert model.generate(ids, attention_mask=mask, disable_compile=True, **greedy).tolist() == expected
        replayed([e for e in torchtrt_ext.engines_of(model) if e not in wrapped.engines])
