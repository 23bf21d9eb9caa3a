"""The drop-in wrapper behaves as the nn.Module it stands in for (issue 14: D1, D2, D5, D7, D9, D10)."""

from __future__ import annotations

import copy
import pickle
import sys
import threading

import pytest
import torch
import torch.nn as nn

import torchtrt_ext
from torchtrt_ext import InputError, RefitError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.bn(self.drop(torch.relu(self.fc1(x)))))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
    return net  # in training mode, as a model built from a config comes


def test_eval_after_wrapping_uses_the_engines_and_training_mode_runs_eagerly(caplog):
    model = _net()
    compiled = torchtrt_ext.compile(model)
    x = torch.randn(6, 16)
    with torch.no_grad():
        with caplog.at_level("WARNING", logger="torchtrt_ext"):
            first, second = compiled(x), compiled(x)
        assert not torch.equal(first, second)  # training mode: dropout fires, as in eager
        assert "is in training mode" in caplog.text and not compiled.variants
        compiled.eval()
        assert not model.training and not model.drop.training
        out = compiled(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
        assert len(compiled.variants) == 1
        running = model.bn.running_mean.clone()
        compiled(x)
        assert torch.equal(model.bn.running_mean, running)  # eval mode: batch statistics stay
        model.train()  # on the original: the wrapper follows
        compiled(x)
        assert not torch.equal(model.bn.running_mean, running)


def test_compiling_with_example_inputs_in_training_mode_captures_eval_mode_and_keeps_the_users_mode():
    model = _net()
    x = torch.randn(6, 16)
    compiled = torchtrt_ext.compile(model, (x,))
    assert model.training and model.drop.training  # the user's modes are unchanged
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x), compiled(x), rtol=0, atol=0)


@pytest.mark.grad
def test_gradients_are_never_dropped():
    model = _net().eval()
    compiled = torchtrt_ext.compile(model)
    head = nn.Linear(8, 1)
    x = torch.randn(4, 16)
    head(compiled(x)).sum().backward()  # grad mode, parameters require grad: the original runs
    assert model.fc1.weight.grad is not None and model.fc1.weight.grad.abs().sum() > 0
    expected = model.fc1.weight.grad.clone()
    model.zero_grad()
    head(model(x)).sum().backward()
    torch.testing.assert_close(model.fc1.weight.grad, expected)
    with torch.no_grad():
        compiled(x)
    assert len(compiled.variants) == 1  # and without gradients, the engines


def test_the_users_model_is_unchanged_and_still_deep_copies():
    model = _net().eval()
    children = dict(model.named_children())
    compiled = torchtrt_ext.compile(model, frontend="dynamo")
    with torch.no_grad():
        compiled(torch.randn(3, 16))
    assert dict(model.named_children()) == children
    clone = copy.deepcopy(model)
    assert set(clone.state_dict()) == set(model.state_dict())
    assert set(compiled.state_dict()) == set(model.state_dict())
    repr(model), repr(compiled)


def test_calls_during_another_threads_capture_run_and_follow_nothing_fake():
    """torch.export (non-strict) swaps the model's weights for fake tensors while it traces: a call
    on another thread meanwhile must neither take them for the user's change nor touch them."""
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    compiled = torchtrt_ext.compile(model)
    x2, x3 = torch.randn(4, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        compiled(x2)
        expected2 = model(x2)  # now: during a capture the model itself cannot run (its weights are fakes)
    stop, errors, calls = threading.Event(), [], [0]

    def keep_calling():
        try:
            with torch.no_grad():
                while not stop.is_set():
                    torch.testing.assert_close(compiled(x2), expected2, rtol=1e-5, atol=1e-5)
                    calls[0] += 1
        except Exception as exc:  # surfaced below
            errors.append(exc)

    caller = threading.Thread(target=keep_calling)
    caller.start()
    try:
        with torch.no_grad():
            for _ in range(3):  # new ranks: captured while the other thread calls
                got = compiled(x3)
                stop.set()
                caller.join()
                torch.testing.assert_close(got, model(x3), rtol=1e-5, atol=1e-5)
                stop.clear()
                caller = threading.Thread(target=keep_calling)
                caller.start()
                x3 = torch.randn(*x3.shape[:-1], 2, 16)
    finally:
        stop.set()
        caller.join()
    assert not errors, errors[0]
    assert calls[0] > 0 and len(compiled.variants) >= 2


def test_pickle_deepcopy_and_torch_save_name_the_way_to_save(tmp_path):
    compiled = torchtrt_ext.compile(_net().eval(), (torch.randn(2, 16),))
    for attempt in (lambda: pickle.dumps(compiled), lambda: copy.deepcopy(compiled), lambda: torch.save(compiled, tmp_path / "m.pt")):
        with pytest.raises(TypeError, match=r"torchtrt_ext\.save\(module, path\)"):
            attempt()


def test_eight_threads_on_a_first_call_compile_once():
    model = _net().eval()
    compiled = torchtrt_ext.compile(model)
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = model(x)
    barrier, outs, errors = threading.Barrier(8), [None] * 8, []

    def call(i):
        try:
            barrier.wait()
            with torch.no_grad():
                outs[i] = compiled(x)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(compiled.variants) == 1 and not compiled.uses_dynamo
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_refit_none_refuses_changed_weights_and_identical_refuses_other_values():
    x = torch.randn(3, 16)
    model = _net().eval()
    frozen = torchtrt_ext.compile(model, (x,), refit="none")
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    with pytest.raises(RefitError, match=r"fc1\.weight.*refit='none'"):
        with torch.no_grad():
            frozen(x)
    model = _net().eval()
    same = torchtrt_ext.compile(model, (x,), refit="identical")
    same.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})  # equal values: fine
    with pytest.raises(RefitError, match=r"fc2\.bias.*refit='identical'"):
        same.load_state_dict(_net(seed=3).eval().state_dict())


@pytest.mark.zoo
def test_half_after_compile_follows_for_an_integer_input_model():
    """BERT takes token ids: a .half() changes no input, only the weights; the engines follow (D8)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    compiled = torchtrt_ext.compile(model)
    assert compiled(input_ids=ids).logits.dtype == torch.float32
    compiled.half()
    out = compiled(input_ids=ids).logits
    assert out.dtype == torch.float16 and len(compiled.variants) == 1
    assert all(t.dtype == torch.float16 for t in compiled.engines[0].weight_tensors() if t.is_floating_point())
    torch.testing.assert_close(out, model(input_ids=ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bad", ["feature size", "dtype"])
def test_an_input_eager_rejects_gets_eagers_own_error_and_the_wrapper_stays_usable(bad, capfd):
    model = _net().eval()
    x = torch.randn(4, 16)
    compiled = torchtrt_ext.compile(model, (x,))
    wrong = torch.randn(4, 15) if bad == "feature size" else x.half()
    with pytest.raises(Exception) as eager:
        model(wrong)
    with pytest.raises(type(eager.value)) as ours:
        compiled(wrong)
    assert str(ours.value) == str(eager.value)
    assert "failed while attempting to run meta" not in capfd.readouterr().err  # no torch-internal error log
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)  # still usable
    assert len(compiled.variants) == 1


def test_batch_1_then_other_batches_compile_twice_without_export_warnings(capfd):
    """Export fixes a size of 1: a first call of batch 1 is compiled for batch 1 alone, and the next
    batch size compiles the batch dimension as dynamic, once, for every size after it. No export
    warning about the specialization reaches the user."""
    model = _net().eval()
    compiled = torchtrt_ext.compile(model)
    with torch.no_grad():
        for batch in (1, 4, 7, 1, 2):
            x = torch.randn(batch, 16)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(compiled.variants) == 2
    assert "specialized" not in capfd.readouterr().err


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    return transformers, config, transformers.LlamaForCausalLM(config).eval()  # default use_cache=True


@pytest.mark.zoo
def test_generate_runs_the_engines_and_equals_eager():
    """A decoder at default settings (DynamicCache): wrapped.generate() sends its forward calls through
    the engines (D4), and its tokens equal eager greedy generate()."""
    _, _, model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 6))
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    compiled = torchtrt_ext.compile(model)
    got = compiled.generate(ids, max_new_tokens=4, do_sample=False)
    assert got.tolist() == expected.tolist()
    assert sum(e.calls for e in compiled.engines) >= 4  # the prefill and every decode step
    assert "forward" not in vars(model)  # the routing is undone


@pytest.mark.zoo
def test_a_decode_loop_with_a_dynamic_cache_equals_eager():
    """The wrapper never runs the model on the caller's own inputs outside the engines: a KV cache
    passed in is appended to exactly once per call."""
    transformers, config, model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 6))

    def decode(f):
        out = f(input_ids=ids, past_key_values=transformers.DynamicCache(config=config), use_cache=True)
        logits = []
        for _ in range(4):
            logits.append(out.logits[:, -1])
            out = f(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        return torch.stack(logits)

    expected = decode(model)
    got = decode(torchtrt_ext.compile(model))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_non_contiguous_and_channels_last_inputs_work_in_both_entry_points():
    """D3: the compiled code's input strides are part of its signature; a slice is copied, a
    channels_last input gets its own compiled signature."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    compiled = torchtrt_ext.compile(model)
    backend = torch.compile(model, backend="torchtrt_ext")
    calls = [
        x,
        x.to(memory_format=torch.channels_last),
        torch.randn(2, 3, 12, 24)[..., ::2],  # not dense: a strided slice
        torch.randn(2, 12, 12, 3).permute(0, 3, 1, 2),  # channels_last by permutation
        x.transpose(2, 3),
    ]
    for value in calls:
        torch.testing.assert_close(compiled(value), model(value), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(backend(value), model(value), rtol=1e-5, atol=1e-5)
    assert len(compiled.variants) == 2  # contiguous and channels_last
    ids = torch.randint(0, 10, (4, 96))
    emb = torchtrt_ext.compile(nn.Embedding(10, 8).eval())
    torch.testing.assert_close(emb(ids[:, :32]), emb.original(ids[:, :32]))  # a column slice, as BART's decoder ids


class _TakesKwargs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, **kwargs):
        y = self.fc(x)
        return y * kwargs["scale"] if "scale" in kwargs else y


def test_an_extra_keyword_to_a_kwargs_forward_takes_the_export_path():
    model = _TakesKwargs().eval()
    compiled = torchtrt_ext.compile(model)
    for batch in (3, 5):
        x, scale = torch.randn(batch, 4), torch.randn(batch, 4)
        torch.testing.assert_close(compiled(x, scale=scale), model(x, scale=scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    # one variant per structure (with and without scale): the batch size is dynamic in both
    assert not compiled.uses_dynamo and len(compiled.variants) == 2


def test_a_kwargs_forward_saves_and_loads_and_is_called_as_the_model_is(tmp_path):
    """Captured through its flattened inputs (export cannot take **kwargs with dynamic sizes), the
    program still takes the model's own call: the loaded module is called with keywords."""
    model = _TakesKwargs().eval()
    compiled = torchtrt_ext.compile(model)
    x, scale = torch.randn(3, 4), torch.randn(3, 4)
    compiled(x, scale=scale)
    torchtrt_ext.save(compiled, tmp_path / "kwargs.ttx")
    loaded = torchtrt_ext.load(tmp_path / "kwargs.ttx")
    for batch in (3, 6):
        x, scale = torch.randn(batch, 4), torch.randn(batch, 4)
        torch.testing.assert_close(loaded(x, scale=scale), model(x, scale=scale), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match=r"fits none of the 1 input signatures compiled into .*kwargs.ttx \(against the "
                       r"first: the structure of the arguments differs\); a loaded module holds compiled code only"):
        loaded(x)  # without scale: a signature the file does not hold


class _BranchesOnData(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if y.sum() > 0 else y - 1  # a branch on a value: export cannot capture it


def test_the_fallback_warning_gives_exports_reason_and_what_avoids_it(caplog):
    model = _BranchesOnData().eval()
    x = torch.randn(3, 4)
    with caplog.at_level("WARNING", logger="torchtrt_ext"):
        compiled = torchtrt_ext.compile(model, (x,))
    assert compiled.uses_dynamo
    assert "torch.export could not capture _BranchesOnData.forward" in caplog.text
    assert "data-dependent" in caplog.text  # export's own reason
    assert "frontend='dynamo'" in caplog.text  # what avoids the attempt
    with torch.no_grad():
        for sign in (1, -1):
            x = sign * torch.randn(3, 4).abs()
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_failed_capture_prints_no_traced_graph_and_keeps_the_models_own_output(capsys):
    """torch.export prints the partial graph of a failed capture to stderr, and symbolic shapes warn
    about it: pages of torch's internals before the one line that says what happened. Neither reaches
    the user; what the model itself prints still does."""

    class Talks(_BranchesOnData):
        def forward(self, x):
            print("the model's own line", file=sys.stderr)
            return super().forward(x)

    stderr = sys.stderr
    torchtrt_ext.compile(Talks().eval(), (torch.randn(3, 4),))
    assert sys.stderr is stderr  # put back
    err = capsys.readouterr().err
    assert "def forward" not in err and "Unable to find user code" not in err
    assert "the model's own line" in err


@pytest.mark.zoo
def test_a_decoder_at_default_settings_takes_the_export_path_with_its_cache():
    """D1: LlamaForCausalLM with use_cache=True returns a DynamicCache; the wrapper exports it (the
    cache flattened and rebuilt through transformers' pytree registrations), leaves the model's
    module tree alone, and a decode step that passes the cache back equals eager."""
    _, _, model = _tiny_llama()
    children = dict(model.named_children())
    compiled = torchtrt_ext.compile(model)
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        expected, got = model(input_ids=ids, attention_mask=mask), compiled(input_ids=ids, attention_mask=mask)
        assert not compiled.uses_dynamo and dict(model.named_children()) == children
        assert type(got.past_key_values) is type(expected.past_key_values)
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # logits and every cached key and value
        step = torch.randint(0, 128, (2, 1))
        longer = torch.ones(2, 7, dtype=torch.long)
        expected = model(input_ids=step, attention_mask=longer, past_key_values=expected.past_key_values)
        got = compiled(input_ids=step, attention_mask=longer, past_key_values=got.past_key_values)
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.zoo
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_a_left_padded_batch_and_its_mask_equals_eager(arch):
    """generate() reads forward's signature to build attention masks and position ids: the routed
    forward shows the model's own (with `*args, **kwargs` it built neither: GPT-2 was 0.41 off)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, pad_token_id=0)).eval()
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0)).eval()
    ids = torch.randint(1, 99, (3, 6))
    mask = torch.ones_like(ids)
    ids[0, :2] = 0  # left padding
    mask[0, :2] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)
    expected = model.generate(**kwargs)
    got = torchtrt_ext.compile(model).generate(**kwargs)
    assert got.sequences.tolist() == expected.sequences.tolist()
    for g, e in zip(got.scores, expected.scores):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_a_replaced_submodule_is_followed_and_a_misshapen_one_refused():
    """model.fc2 = nn.Linear(...) after wrapping (a new head): the engines compute with the new layer's
    weights, as eager does; one of another shape is an error that names it, never a silent result."""
    model = _net().eval()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    wrapped = torchtrt_ext.compile(model, (x,))
    with torch.no_grad():
        first = wrapped(x)
        torch.manual_seed(5)
        model.fc2 = nn.Linear(32, 8)
        out = wrapped(x)
        assert not torch.allclose(out, first)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
        assert torchtrt_ext.refit(wrapped, _net(seed=3).state_dict()).engines == 1  # refit reaches the new layer
        assert torch.equal(model.fc2.weight, _net(seed=3).fc2.weight)
        torch.testing.assert_close(wrapped(x), _net(seed=3).eval()(x), rtol=1e-5, atol=1e-5)
        model.fc2 = nn.Linear(32, 4)
        with pytest.raises(RefitError, match=r"fc2.weight: is now \(4, 32\)"):
            wrapped(x)
