"""torch.compile(model, backend="torchtrt_ext"): same answers as eager, on the built-in engine."""

import operator
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torchtrt_ext
from tests import zoo
from tests.conftest import CPU_AND_CUDA
from torchtrt_ext import OptionError
from torchtrt_ext.core import lifting
from torchtrt_ext.core.settings import Settings
from torchtrt_ext.core.writes import written_inputs


def _compile(model, **options):
    return torch.compile(model, backend="torchtrt_ext", options=options or None)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_matches_eager(name, device):
    model = zoo.build(name, device)
    compiled = _compile(model, engine="builtin")
    with torch.no_grad():
        for batch in (3, 5):
            args, kwargs = zoo.inputs(name, batch, device)
            zoo.assert_matches(compiled(*args, **kwargs), model(*args, **kwargs), torch.float32)
    engines = torchtrt_ext.engines_of(model)
    assert engines and all(e.kind == "builtin" for e in engines)
    if name == "graph_break":
        assert len(engines) >= 2, "a graph break must give one engine per captured graph"


@pytest.mark.parametrize("name", ["mlp", "encoder"])
def test_bfloat16_on_cpu(name):
    model = zoo.build(name, "cpu", torch.bfloat16)
    compiled = _compile(model)
    with torch.no_grad():
        args, kwargs = zoo.inputs(name, 4, "cpu", torch.bfloat16)
        zoo.assert_matches(compiled(*args, **kwargs), model(*args, **kwargs), torch.bfloat16)


def test_engine_weights_are_the_models_by_state_dict_name():
    model = zoo.build("buffers")
    compiled = _compile(model)
    with torch.no_grad():
        compiled(*zoo.inputs("buffers", 4)[0])
    (engine,) = torchtrt_ext.engines_of(model)
    weights = engine.named_weights()
    state = model.state_dict()
    used = {"fc.weight", "fc.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "scale"}
    assert used <= set(weights)
    for name in used:
        assert torch.equal(weights[name], state[name])
        assert weights[name].data_ptr() == state[name].data_ptr(), "the engine must not copy the weights"
    mem = engine.memory()
    expected = sum(state[n].numel() * state[n].element_size() for n in used) + model.shift.numel() * 4
    assert mem.weight_bytes == expected
    assert mem.shared_bytes == mem.weight_bytes and mem.owned_bytes == 0


def test_dynamic_batch_reuses_one_engine_after_dynamo_marks_it_dynamic():
    model = zoo.build("mlp")
    compiled = _compile(model)
    with torch.no_grad():
        for batch in (2, 3, 7, 11):
            (x,), _ = zoo.inputs("mlp", batch)
            zoo.assert_matches(compiled(x), model(x), torch.float32)
    # batch 2 compiles static, batch 3 makes dynamo mark the batch dynamic; 7 and 11 reuse that graph
    assert len(torchtrt_ext.engines_of(model)) == 2


@pytest.mark.grad
def test_gradients_are_never_dropped_in_grad_mode_and_no_grad_uses_the_engine(caplog):
    model = zoo.build("mlp")
    compiled = _compile(model)
    x = torch.randn(4, 32, requires_grad=True)
    with caplog.at_level("WARNING", logger="torchtrt_ext"):
        out = compiled(x)
    assert out.requires_grad and "gradients are needed" in caplog.text
    out.sum().backward()
    assert model.fc1.weight.grad is not None and x.grad is not None
    expected = model.fc1.weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(model.fc1.weight.grad, expected)
    assert not torchtrt_ext.engines_of(model)
    with torch.no_grad():
        zoo.assert_matches(compiled(x), model(x), torch.float32)
    assert len(torchtrt_ext.engines_of(model)) == 1


def test_unknown_option_through_torch_compile_names_it():
    compiled = _compile(zoo.build("mlp"), cuda_graph=True)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as e:
        compiled(torch.randn(2, 32))
    assert isinstance(e.value.inner_exception, OptionError)
    assert "OptionError: unknown option 'cuda_graph'. Did you mean 'cuda_graphs'?" in str(e.value)


def test_bad_value_through_torch_compile_names_it():
    compiled = _compile(zoo.build("mlp"), engine="fast")
    with pytest.raises(Exception, match="option 'engine' must be one of 'auto', 'builtin', 'tensorrt', got 'fast'"):
        compiled(torch.randn(2, 32))


def test_cuda_graphs_on_cpu_is_refused():
    compiled = _compile(zoo.build("mlp"), cuda_graphs=True)
    with pytest.raises(Exception, match="cuda_graphs=True needs a CUDA engine, but this one runs on cpu"):
        compiled(torch.randn(2, 32))


class _TwoDevices(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.here = torch.nn.Linear(4, 4)
        self.there = torch.nn.Linear(4, 4, device="meta")

    def forward(self, x, y):
        return self.here(x), self.there(y)


def test_weights_on_several_devices_are_refused():
    compiled = _compile(_TwoDevices())
    with pytest.raises(Exception, match=r"the model's weights are on several devices \(cpu: here.weight, here.bias; meta"):
        compiled(torch.randn(2, 4), torch.randn(2, 4, device="meta"))


def _run_fresh(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=600)


def test_backend_name_works_without_importing_the_package():
    """The torch_dynamo_backends entry point (or, from a source tree, nothing) makes the name resolvable."""
    result = _run_fresh(
        """
        import sys, torch
        m = torch.nn.Linear(8, 8).eval()
        x = torch.randn(3, 8)
        with torch.no_grad():
            out = torch.compile(m, backend="torchtrt_ext")(x)
        torch.testing.assert_close(out, m(x).detach(), rtol=1e-5, atol=1e-5)
        assert "torchtrt_ext" in sys.modules  # loaded by dynamo through the entry point
        import torchtrt_ext                    # importing afterwards must not re-register
        with torch.no_grad():
            out = torch.compile(torch.nn.Linear(8, 2), backend="torchtrt_ext")(x)
        print("ok", out.shape)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok torch.Size([3, 2])" in result.stdout


def test_a_stale_entry_point_of_another_install_does_not_shadow_the_backend():
    """An entry point left by another install (naming a module this version does not have) would fail
    to load when torch.compile resolves the name: importing the package takes the name over."""
    result = _run_fresh(
        """
        import importlib.metadata as md
        stale = md.EntryPoints([md.EntryPoint(
            name="torchtrt_ext", value="torchtrt_ext.backend:torchtrt_ext_backend", group="torch_dynamo_backends")])
        found = md.entry_points
        md.entry_points = lambda **kw: stale if kw.get("group") == "torch_dynamo_backends" else found(**kw)

        import torch
        import torchtrt_ext
        m = torch.nn.Linear(8, 8).eval()
        x = torch.randn(3, 8)
        with torch.no_grad():
            out = torch.compile(m, backend="torchtrt_ext")(x)
        torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-5)
        assert torchtrt_ext.engines_of(m)
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout


def test_backend_name_works_after_import():
    result = _run_fresh(
        """
        import torch, torchtrt_ext
        assert "torchtrt_ext" in torch._dynamo.list_backends()
        m = torch.nn.Linear(8, 8).eval()
        with torch.no_grad():
            out = torch.compile(m, backend="torchtrt_ext", options={"engine": "builtin"})(torch.ones(2, 8) * 0.5)
        assert len(torchtrt_ext.engines_of(m)) == 1
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout


def test_an_engine_called_under_another_torch_compile_is_not_traced_into():
    """Engines call Inductor's code without its dynamo.disable wrapper where dynamo is off (every call
    from the backend and the wrapper). Called from a graph break of an outer torch.compile, the code
    must still run as it is: the outer compile never sees its operations."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        _compile(model)(x)
        (engine,) = torchtrt_ext.engines_of(model)
        seen = []

        def outer_backend(gm, example_inputs):
            seen.append(gm)
            return gm.forward

        out = torch.compile(lambda t: engine(t * 1.0)[0] * 2, backend=outer_backend)(x)
        torch.testing.assert_close(out, model(x) * 2)
    ops = {str(n.target) for gm in seen for n in gm.graph.nodes if n.op == "call_function"}
    assert seen and ops <= {str(operator.mul)}, ops


# Ways a forward writes its input `acc`, as dynamo records them: a method, an item assignment, an
# augmented assignment, out=, a torch function, a view's method.
_DYNAMO_WRITES = {
    "method": lambda acc, y: acc.mul_(0.5).add_(y),
    "setitem": lambda acc, y: acc.__setitem__((slice(None), slice(0, 2)), y[:, :2]),
    "augmented": lambda acc, y: operator.iadd(acc, y),
    "out=": lambda acc, y: torch.add(y, 1, out=acc),
    "function": lambda acc, y: torch.relu_(acc),
    "view": lambda acc, y: acc[:, 1:].zero_(),
    ".data": lambda acc, y: acc.data.add_(y),  # .data has a version counter of its own
    "foreach": lambda acc, y: torch._foreach_add_([acc], [y]),
}


class _WritesAcc(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc, self.how = torch.nn.Linear(4, 4), how

    def forward(self, x, acc):
        y = self.fc(x)
        _DYNAMO_WRITES[self.how](acc, y)
        return y.relu()


def _finding_writes_always(monkeypatch) -> list:
    """Engines find the inputs their graph writes only where they need them (cuda_graphs=True, which
    the CPU cannot run): make every engine find them, as a CUDA-graph engine would. Returns the list of
    graphs analysed (one entry per analysis)."""
    analysed = []

    def find(lifted, settings):
        analysed.append(lifted.gm)
        return written_inputs(lifted)

    monkeypatch.setattr(torchtrt_ext.engines, "needed_writes", find)
    return analysed


@pytest.mark.parametrize("how", sorted(_DYNAMO_WRITES))
def test_the_inputs_a_dynamo_graph_writes_are_found_and_keep_the_writes(how, monkeypatch):
    """Dynamo's graphs hold torch-level calls (acc.mul_, acc[...] = y), not aten ops with schemas: the
    writes are still found (engine.writes), which is what lets the runtime's CUDA graphs capture a
    written input at its own address instead of on a copy that would take the writes."""
    _finding_writes_always(monkeypatch)
    model = _WritesAcc(how).eval()
    compiled = _compile(model)
    with torch.no_grad():
        for _ in range(2):
            x, acc = torch.randn(3, 4), torch.randn(3, 4)
            expected_acc = acc.clone()
            expected = model(x, expected_acc)
            torch.testing.assert_close(compiled(x, acc), expected)
            torch.testing.assert_close(acc, expected_acc)
    (engine,) = torchtrt_ext.engines_of(model)
    assert engine.writes == (1,)  # acc; x is read only


def test_a_graph_dynamo_reuses_for_another_layer_keeps_its_writes(monkeypatch):
    """Dynamo compiles a layer's code once and calls that graph with each layer's weights; the engine
    built for the second layer's weights (without the graph at hand) writes the same input, taken from
    the first engine: the graph is analysed once."""
    analysed = _finding_writes_always(monkeypatch)
    layers = [_WritesAcc("method").eval() for _ in range(2)]
    with torch.no_grad():
        for layer in layers:
            x, acc = torch.randn(3, 4), torch.randn(3, 4)
            expected_acc = acc.clone()
            expected = layer(x, expected_acc)
            torch.testing.assert_close(_compile(layer)(x, acc), expected)
            torch.testing.assert_close(acc, expected_acc)
    assert [e.writes for layer in layers for e in torchtrt_ext.engines_of(layer)] == [(1,), (1,)]
    assert len(analysed) == 1


def test_the_backend_analyses_writes_only_for_cuda_graphs(monkeypatch):
    """Without cuda_graphs nothing in a backend engine reads the written inputs, so their analysis (a
    fake run of each dynamo graph: 0.36 s on a 22-layer graph) is skipped, and the writes still happen;
    with cuda_graphs it runs."""
    runs = []

    def counted(lifted):
        runs.append(lifted)
        return written_inputs(lifted)

    monkeypatch.setattr(torchtrt_ext.engines, "written_inputs", counted)
    model = _WritesAcc("method").eval()
    with torch.no_grad():
        x, acc = torch.randn(3, 4), torch.randn(3, 4)
        expected_acc = acc.clone()
        expected = model(x, expected_acc)
        torch.testing.assert_close(_compile(model)(x, acc), expected)
        torch.testing.assert_close(acc, expected_acc)
    (engine,) = torchtrt_ext.engines_of(model)
    assert engine.writes == () and runs == []
    (lifted,) = _captured(model, torch.randn(3, 4), torch.randn(3, 4))
    assert torchtrt_ext.engines.needed_writes(lifted, Settings.from_options({"cuda_graphs": True}, for_backend=True)) == [1]
    assert len(runs) == 1
    assert torchtrt_ext.engines.needed_writes(lifted, Settings.from_options(None, for_backend=True)) == []


def _captured(model, *args) -> list:
    """The lifted graphs dynamo captures from model(*args)."""
    captured = []

    def capture(gm, example_inputs):
        captured.append(lifting.from_dynamo(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(*args)
    return captured


def test_writes_to_a_dynamo_graphs_own_intermediates_are_not_writes_to_its_inputs():
    captured = []

    def capture(gm, example_inputs):
        captured.append(lifting.from_dynamo(gm, example_inputs))
        return gm.forward

    class Intermediates(torch.nn.Module):
        def forward(self, x, acc):
            z = x.clone()
            z += 1
            torch.relu_(z)
            acc[:, 0] = z[:, 0]
            return z * 2

    with torch.no_grad():
        torch.compile(Intermediates(), backend=capture)(torch.randn(3, 4), torch.randn(3, 4))
    (lifted,) = captured
    assert written_inputs(lifted) == [1]


def test_a_dropped_model_takes_its_weights_and_engines_with_it():
    """The backend keeps no strong path to a model's weights once the model and its compile are gone
    (a weight set's finalizers reach their graph weakly)."""
    import gc
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    weight = weakref.ref(model[0].weight)
    compiled = torch.compile(model, backend="torchtrt_ext")
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    del compiled, model
    torch._dynamo.reset()
    gc.collect()
    assert weight() is None
