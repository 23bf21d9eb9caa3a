"""A generated sequence sees one set of weights (issue 15's hot adapter swap): a refit on another thread
waits for the wrapper's running generate() calls, and generate() calls on several threads at once all
run the engines."""

import threading
import time

import pytest
import torch

import torchtrt_ext
from torchtrt_ext.core.sequences import SequenceGate

from .test_generate import GREEDY, _llama, _merged, _prompts


def test_gate_a_waiting_refit_goes_before_new_sequences():
    gate, order = SequenceGate(), []
    first_in, release = threading.Event(), threading.Event()

    def sequence(name, hold=None):
        with gate.sequence():
            order.append(name)
            if hold is not None:
                first_in.set()
                hold.wait(5)

    def refit():
        with gate.exclusive():
            order.append("refit")

    a = threading.Thread(target=sequence, args=("a", release))
    a.start()
    first_in.wait(5)
    r = threading.Thread(target=refit)
    r.start()
    for _ in range(500):  # until the refit waits for a
        if gate.waiting:
            break
        time.sleep(0.01)
    assert gate.waiting == 1
    b = threading.Thread(target=sequence, args=("b",))
    b.start()
    time.sleep(0.1)  # b waits for the refit
    assert order == ["a"] and gate.running == 1
    release.set()
    for t in (a, r, b):
        t.join(5)
    assert order == ["a", "refit", "b"] and gate.running == 0


def test_gate_refit_from_inside_a_sequence_does_not_wait_for_itself():
    gate = SequenceGate()
    with gate.sequence(), gate.exclusive(), gate.sequence():
        pass
    with gate.exclusive():  # and the gate is free again
        pass




class _PauseAt:
    """A logits processor that, at decode step `step`, says so and waits until released."""

    def __init__(self, step):
        self.step, self.seen = step, 0
        self.reached, self.release = threading.Event(), threading.Event()

    def __call__(self, input_ids, scores):
        self.seen += 1
        if self.seen == self.step:
            self.reached.set()
            self.release.wait(10)
        return scores


@pytest.mark.zoo
def test_a_refit_on_another_thread_waits_for_the_running_generate():
    pytest.importorskip("transformers")
    from transformers import LogitsProcessorList

    base = _llama()
    ids, mask = _prompts()
    adapters = {seed: _merged(base, seed) for seed in (11, 12)}
    expected = {seed: m.generate(ids, attention_mask=mask, **GREEDY).tolist() for seed, m in adapters.items()}
    assert expected[11] != expected[12]
    compiled = torchtrt_ext.compile(base)
    with torch.no_grad():
        compiled.generate(ids, attention_mask=mask, **GREEDY)  # compiled: prefill and decode
    torchtrt_ext.refit(compiled, adapters[11].state_dict())
    pause, got, times = _PauseAt(4), {}, {}

    def generate():
        with torch.no_grad():
            got["a"] = compiled.generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([pause]), **GREEDY).tolist()

    def refit():
        torchtrt_ext.refit(compiled, adapters[12].state_dict())
        times["refit"] = time.perf_counter()

    g = threading.Thread(target=generate)
    g.start()
    assert pause.reached.wait(30)  # mid-sequence, on adapter 11's weights
    r = threading.Thread(target=refit)
    r.start()
    time.sleep(0.3)  # without the gate the refit completes here, and the rest of the sequence uses 12
    assert "refit" not in times
    pause.release.set()
    g.join(30)
    r.join(30)
    assert got["a"] == expected[11]  # the whole sequence on one adapter
    assert "refit" in times  # and the refit went ahead once the sequence ended
    with torch.no_grad():
        assert compiled.generate(ids, attention_mask=mask, **GREEDY).tolist() == expected[12]


@pytest.mark.zoo
def test_generate_on_two_threads_at_once_both_run_the_engines():
    pytest.importorskip("transformers")
    from transformers import LogitsProcessorList

    model = _llama()
    ids, mask = _prompts()
    expected = model.generate(ids, attention_mask=mask, **GREEDY).tolist()
    compiled = torchtrt_ext.compile(model)
    with torch.no_grad():
        compiled.generate(ids, attention_mask=mask, **GREEDY)
    pauses, got = {"first": _PauseAt(3), "second": _PauseAt(3)}, {}

    def run(name):
        with torch.no_grad():
            got[name] = compiled.generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([pauses[name]]), **GREEDY).tolist()

    threads = {name: threading.Thread(target=run, args=(name,)) for name in pauses}
    threads["first"].start()
    assert pauses["first"].reached.wait(30)
    threads["second"].start()  # starts while the first runs
    assert pauses["second"].reached.wait(30)
    pauses["first"].release.set()  # the first ends while the second runs
    threads["first"].join(30)
    # the second generate is still running: its forward must still be routed through the engines
    assert "forward" in model.__dict__
    calls = sum(e.calls for e in compiled.engines)
    pauses["second"].release.set()
    threads["second"].join(30)
    assert sum(e.calls for e in compiled.engines) - calls >= GREEDY["max_new_tokens"] - 3  # the second's later steps
    assert got["first"] == expected and got["second"] == expected
    assert "forward" not in model.__dict__  # the model is left as it was


@pytest.mark.zoo
def test_a_refit_from_inside_generate_on_the_same_thread_applies_at_once():
    pytest.importorskip("transformers")
    from transformers import LogitsProcessorList

    base = _llama()
    ids, mask = _prompts()
    adapter = _merged(base, 12)
    compiled = torchtrt_ext.compile(base)
    done = []

    def swap(input_ids, scores):
        if not done:
            torchtrt_ext.refit(compiled, adapter.state_dict())  # must not wait for its own sequence
            done.append(True)
        return scores

    with torch.no_grad():
        compiled.generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([swap]), **GREEDY)
    assert done
    with torch.no_grad():
        assert compiled.generate(ids, attention_mask=mask, **GREEDY).tolist() == adapter.generate(ids, attention_mask=mask, **GREEDY).tolist()


def test_a_refit_from_inside_a_sequence_while_another_thread_runs_one_is_refused():
    gate = SequenceGate()
    inside, release = threading.Event(), threading.Event()

    def other():
        with gate.sequence():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(5)
    try:
        with gate.sequence():
            with pytest.raises(torchtrt_ext.RefitError, match="other thread"):
                with gate.exclusive():
                    pass
    finally:
        release.set()
        t.join(5)


def test_a_routed_method_returning_a_generator_runs_each_step_through_the_engines():
    class Streamer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x)

        def stream(self, x, n):
            for _ in range(n):
                x = self(x)
                yield x

    model = Streamer().eval()
    x = torch.randn(2, 8)
    expected = list(model.stream(x, 3))
    compiled = torchtrt_ext.compile(model, (x,))
    calls = sum(e.calls for e in compiled.engines)
    got = list(compiled.stream(x, 3))
    assert len(got) == 3 and all(torch.allclose(g, e, rtol=1e-5, atol=1e-6) for g, e in zip(got, expected))
    assert sum(e.calls for e in compiled.engines) - calls == 3  # each step ran the engine
    assert "forward" not in model.__dict__
