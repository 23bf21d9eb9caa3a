"""torchtrt_ext.compile(model, ...): a drop-in nn.Module with the same signature and answers."""

import logging

import pytest
import torch

import torchtrt_ext
from tests import zoo
from tests.conftest import CPU_AND_CUDA
from torchtrt_ext import InputError


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_matches_eager(name, device):
    model = zoo.build(name, device)
    args, kwargs = zoo.inputs(name, 4, device)
    compiled = torchtrt_ext.compile(model, args, kwargs, engine="builtin")
    assert isinstance(compiled, torch.nn.Module)
    with torch.no_grad():
        for batch in (4, 6, 9):
            args, kwargs = zoo.inputs(name, batch, device)
            zoo.assert_matches(compiled(*args, **kwargs), model(*args, **kwargs), torch.float32)
    assert compiled.engines and all(e.kind == "builtin" for e in compiled.engines)
    if name != "graph_break":  # export captures it whole; batch 6 and 9 reuse the dynamic-batch engine
        assert len(compiled.variants) == 1 and not compiled.uses_dynamo


def test_graph_break_falls_back_to_dynamo_and_says_why(caplog):
    model = zoo.build("graph_break")
    with caplog.at_level(logging.WARNING, logger="torchtrt_ext"):
        compiled = torchtrt_ext.compile(model, zoo.inputs("graph_break", 4)[0])
    assert "torch.export could not capture GraphBreak.forward" in caplog.text
    assert compiled.uses_dynamo and len(compiled.engines) >= 2
    with torch.no_grad():
        for _ in range(4):  # both sides of the branch
            (x,), _ = zoo.inputs("graph_break", 5)
            zoo.assert_matches(compiled(x), model(x), torch.float32)


def test_frontend_export_refuses_to_fall_back():
    model = zoo.build("graph_break")
    with pytest.raises(Exception, match="(?i)data.dependent"):
        torchtrt_ext.compile(model, zoo.inputs("graph_break", 4)[0], frontend="export")


def test_frontend_dynamo_is_used_when_asked():
    model = zoo.build("mlp")
    compiled = torchtrt_ext.compile(model, zoo.inputs("mlp", 3)[0], frontend="dynamo")
    assert compiled.uses_dynamo and not compiled.variants
    (x,), _ = zoo.inputs("mlp", 3)
    with torch.no_grad():
        zoo.assert_matches(compiled(x), model(x), torch.float32)


def test_lazy_compile_on_first_call():
    model = zoo.build("mlp")
    compiled = torchtrt_ext.compile(model)
    assert not compiled.engines
    (x,), _ = zoo.inputs("mlp", 3)
    with torch.no_grad():
        zoo.assert_matches(compiled(x), model(x), torch.float32)
    assert len(compiled.engines) == 1


def test_keyword_order_does_not_matter_and_kwargs_change_signature():
    model = zoo.build("multi_io")
    (x, y), kw = zoo.inputs("multi_io", 4)
    compiled = torchtrt_ext.compile(model, (x, y), kw)
    with torch.no_grad():
        zoo.assert_matches(compiled(x, y=y, scale=kw["scale"]), model(x, y, scale=kw["scale"]), torch.float32)
        zoo.assert_matches(compiled(x, y), model(x, y), torch.float32)  # no scale: a second signature
    assert len(compiled.variants) == 2


def test_new_shapes_compile_variants_up_to_the_limit():
    """A second spatial size compiles those dimensions as dynamic sizes (as dynamo does at a recompile):
    further sizes fit it. Another layout is another signature, refused once max_variants is reached."""
    model = zoo.build("cnn")
    compiled = torchtrt_ext.compile(model, max_variants=2)
    with torch.no_grad():
        for hw in (16, 20, 24, 13):
            x = torch.randn(2, 3, hw, hw)
            zoo.assert_matches(compiled(x), model(x), torch.float32)
        assert len(compiled.variants) == 2
        with pytest.raises(InputError) as e:
            compiled(torch.randn(2, 3, 24, 24).to(memory_format=torch.channels_last))
    assert "fits none of the 2 compiled input signatures (against the first: input x is channels_last, compiled for contiguous)" in str(e.value)
    assert "max_variants=2 is reached" in str(e.value)


def test_state_dict_and_parameters_are_the_originals():
    model = zoo.build("buffers")
    compiled = torchtrt_ext.compile(model, zoo.inputs("buffers", 2)[0])
    assert list(compiled.state_dict()) == list(model.state_dict())
    for (n1, p1), (n2, p2) in zip(compiled.named_parameters(), model.named_parameters()):
        assert n1 == n2 and p1 is p2
    assert compiled.fc is model.fc
    assert compiled.original is model
    compiled.load_state_dict(model.state_dict())  # the original's checkpoint loads as is


def test_attributes_of_the_original_are_reachable():
    model = zoo.build("mlp")
    model.config = {"hidden": 64}
    compiled = torchtrt_ext.compile(model)
    assert compiled.config == {"hidden": 64}
    with pytest.raises(AttributeError):
        compiled.no_such_attribute


def test_engine_shares_the_models_memory():
    model = zoo.build("cnn")
    compiled = torchtrt_ext.compile(model, zoo.inputs("cnn", 2)[0])
    mem = compiled.engines[0].memory()
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert mem.weight_bytes == total and mem.owned_bytes == 0


def test_input_on_wrong_device_is_a_clear_error():
    model = zoo.build("mlp")
    compiled = torchtrt_ext.compile(model, zoo.inputs("mlp", 2)[0])
    with pytest.raises(InputError) as e, torch.no_grad():
        compiled(torch.randn(2, 32, device="meta"))
    assert str(e.value) == (
        "input x is on meta but the model's weights are on cpu; move it with .to('cpu')"
    )


def test_wrong_dtype_raises_like_eager():
    model = zoo.build("mlp")
    compiled = torchtrt_ext.compile(model, zoo.inputs("mlp", 2)[0])
    x = torch.randn(2, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError) as eager_error:
        model(x)
    with pytest.raises(RuntimeError) as ours:
        compiled(x)
    assert "dtype" in str(eager_error.value) and "dtype" in str(ours.value)


def test_training_mode_batchnorm_updates_statistics_like_eager():
    model = zoo.build("cnn").train()
    twin = zoo.build("cnn").train()
    compiled = torchtrt_ext.compile(model, zoo.inputs("cnn", 4)[0])
    with torch.no_grad():
        for _ in range(3):
            (x,), _ = zoo.inputs("cnn", 4)
            zoo.assert_matches(compiled(x), twin(x), torch.float32)
    for name, value in twin.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert int(model.bn1.num_batches_tracked) == 3


class _Counting(torch.nn.Module):
    """Updates a buffer and an input in place, the way a stateful module does."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("total", torch.zeros(8))

    def forward(self, x, acc):
        self.calls += 1
        y = self.fc(x)
        self.total.add_(y.sum(0))
        acc.mul_(0.5).add_(y)
        return y * self.calls


def test_in_place_updates_of_buffers_and_inputs_match_eager():
    model, twin = _Counting().eval(), _Counting().eval()  # eval: the engines run (training mode runs the model)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 8)
    compiled = torchtrt_ext.compile(model, (x, torch.randn(4, 8)))
    with torch.no_grad():
        for _ in range(3):
            x, acc = torch.randn(4, 8), torch.randn(4, 8)
            acc_twin = acc.clone()
            zoo.assert_matches(compiled(x, acc), twin(x, acc_twin), torch.float32)
            torch.testing.assert_close(acc, acc_twin)
    assert float(model.calls) == 3  # export traced with fake tensors: the real buffers untouched
    torch.testing.assert_close(model.total, twin.total)


def test_the_engine_writes_inputs_in_place_itself_even_through_a_conformed_copy():
    """A graph that writes a caller input (a KV cache) writes it in the compiled code: the wrapper
    copies nothing back, except where the input was not dense and the code ran on a dense copy."""
    model, twin = _Counting().eval(), _Counting().eval()
    twin.load_state_dict(model.state_dict())
    compiled = torchtrt_ext.compile(model, (torch.randn(4, 8), torch.randn(4, 8)))
    with torch.no_grad():
        for dense_acc in (True, False, True):
            x = torch.randn(4, 8)
            acc = torch.randn(4, 8) if dense_acc else torch.randn(8, 4).t()  # a transposed view
            acc_twin, address = acc.clone(), acc.data_ptr()
            zoo.assert_matches(compiled(x, acc), twin(x, acc_twin), torch.float32)
            torch.testing.assert_close(acc, acc_twin)
            assert acc.data_ptr() == address
    variant = compiled.variants[0]
    assert len(compiled.variants) == 1 and variant.writes == (1,)
    assert not any(isinstance(u, int) for u in variant.updates)  # acc is the engine's to write


_WRITES = {
    "out=": lambda x: torch.add(x, 1, out=x),
    "split item": lambda x: x.split(2)[0].add_(1),
    "unbind item": lambda x: x.unbind(1)[0].zero_(),
    "chunk item": lambda x: x.chunk(2, 1)[1].fill_(7),
    "foreach": lambda x: torch._foreach_add_([x], 1),
    "setitem": lambda x: x.__setitem__((slice(None), 0), 5.0),
}


@pytest.mark.parametrize("how", sorted(_WRITES))
def test_every_way_of_writing_a_non_dense_input_reaches_the_callers_tensor(how):
    class Writes(torch.nn.Module):
        def forward(self, x):
            _WRITES[how](x)
            return x.sum(0) * 2

    model = Writes().eval()
    compiled = torchtrt_ext.compile(model)
    for _ in range(2):
        x = torch.randn(6, 4).t()  # not dense-contiguous: the compiled code runs on a copy
        expected_x = x.clone()
        expected = model(expected_x)
        got = compiled(x)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(x, expected_x)  # the write reached the caller's tensor
    assert compiled.variants[0].writes == (0,)


def test_not_a_module_is_refused():
    with pytest.raises(TypeError, match="torchtrt_ext.compile takes an nn.Module, got function"):
        torchtrt_ext.compile(lambda x: x)


def test_unknown_option_is_refused_before_tracing():
    with pytest.raises(torchtrt_ext.OptionError, match="unknown option 'cudagraphs'. Did you mean 'cuda_graphs'?"):
        torchtrt_ext.compile(zoo.build("mlp"), cudagraphs=True)


def test_tied_weights_are_one_slot_with_both_names():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(8, 8)
            self.dec = self.enc

        def forward(self, x):
            return self.dec(torch.relu(self.enc(x)))

    model = Tied().eval()
    x = torch.randn(3, 8)
    compiled = torchtrt_ext.compile(model, (x,))
    (engine,) = compiled.engines
    weights = engine.named_weights()
    assert weights["enc.weight"] is weights["dec.weight"]
    with torch.no_grad():
        zoo.assert_matches(compiled(x), model(x), torch.float32)
    assert engine.memory().weight_bytes == (64 + 8) * 4


class _Box:
    """A cache-like object of the user's: a tensor written in place, a count fixed per structure."""

    def __init__(self, t, size):
        self.t, self.size = t, size


torch.utils._pytree.register_pytree_node(
    _Box,
    lambda b: ([b.t], b.size),
    lambda leaves, size: _Box(leaves[0], size),
    serialized_type_name="tests._Box",
    flatten_with_keys_fn=lambda b: ([(torch.utils._pytree.GetAttrKey("t"), b.t)], b.size),
)


def _box_and_twin(t):
    """A box holding t, and one holding a copy of t (for the eager run)."""
    return _Box(t, 3), _Box(t.clone(), 3)


class _UpdatesBox(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, box):
        y = self.fc(x)
        box.t.add_(y)  # written in place, and returned: as a model returns the KV cache it was given
        return {"y": y.relu(), "box": box}


def test_an_input_object_written_in_place_and_returned_comes_back_as_itself():
    """Eager returns the very object it was given; so does the wrapper (no object rebuilt from its
    leaves at each call, and the caller's object stays the one the next call gets)."""
    model = _UpdatesBox().eval()
    compiled = torchtrt_ext.compile(model)
    with torch.no_grad():
        box, twin = _box_and_twin(torch.randn(3, 4))
        for _ in range(3):
            x = torch.randn(3, 4)
            got, expected = compiled(x, box), model(x, twin)
            assert got["box"] is box and expected["box"] is twin
            torch.testing.assert_close(got["y"], expected["y"])
            torch.testing.assert_close(box.t, twin.t)
        other, other_twin = _box_and_twin(torch.randn(4, 3).t())  # not dense: the code writes a copy, so a box is rebuilt
        got, expected = compiled(x, other), model(x, other_twin)
        torch.testing.assert_close(got["box"].t, expected["box"].t)
        torch.testing.assert_close(other.t, other_twin.t)


def test_with_an_engine_cache_the_first_call_writes_an_input_once(tmp_path):
    """The engine cache runs a new engine once before storing it (to keep Inductor's autotuning): not
    an engine whose code writes an input in place, which that run would write twice."""
    model, twin = _UpdatesBox().eval(), _UpdatesBox().eval()
    twin.load_state_dict(model.state_dict())
    compiled = torchtrt_ext.compile(model, cache_dir=tmp_path)
    with torch.no_grad():
        box, box_twin = _box_and_twin(torch.randn(3, 4))
        x = torch.randn(3, 4)
        compiled(x, box), twin(x, box_twin)
    torch.testing.assert_close(box.t, box_twin.t)


class _NewBoxAndOld(_UpdatesBox):
    def forward(self, x, box):
        out = super().forward(x, box)
        return {"snapshot": _Box(box.t, box.size), **out}  # a new object of the same tensors, first


class _NewBoxOnly(_UpdatesBox):
    def forward(self, x, box):
        return {"y": super().forward(x, box)["y"], "box": _Box(box.t, box.size)}


@pytest.mark.parametrize("model_type", [_NewBoxAndOld, _NewBoxOnly])
def test_a_new_object_made_of_an_inputs_tensors_comes_back_new_as_in_eager(model_type):
    """Only an object the forward returns as itself comes back as the caller's: a new object holding
    the same tensors is a new object through the wrapper too."""
    model = model_type().eval()
    compiled = torchtrt_ext.compile(model)
    with torch.no_grad():
        box, twin = _box_and_twin(torch.randn(3, 4))
        for _ in range(2):
            x = torch.randn(3, 4)
            got, expected = compiled(x, box), model(x, twin)
            assert {k: v is box for k, v in got.items() if isinstance(v, _Box)} == {
                k: v is twin for k, v in expected.items() if isinstance(v, _Box)
            }
            torch.testing.assert_close(box.t, twin.t)
