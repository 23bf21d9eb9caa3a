"""The C++ runtime (torchtrt_ext.core._C.Runner) on the CPU: device checks, execution slots, threads."""

import threading
import time

import pytest
import torch

from torchtrt_ext import InputError
from torchtrt_ext.core import runtime as _runtime
from torchtrt_ext.core.runtime import Runner


def test_run_passes_inputs_and_a_slot_and_returns_the_result():
    runner = Runner("cpu", 4)
    x = torch.randn(3)
    out = runner.run(lambda inputs, slot: (inputs[0] * 2, slot), (x,))
    assert torch.equal(out[0], x * 2) and out[1] == 0
    assert runner.device == "cpu" and runner.max_slots == 4 and runner.slots_created == 1


def test_input_on_another_device_is_named():
    runner = Runner("cpu", 1)
    with pytest.raises(InputError) as e:
        runner.run(lambda inputs, slot: None, (torch.ones(2), 3, torch.ones(2, device="meta")))
    assert str(e.value) == (
        "input 2 is on meta but the engine runs on cpu; every tensor input must be on cpu (move it with .to('cpu'))"
    )


def test_bound_callable_gets_the_arguments_with_inputs_put_in_and_fn_is_not_called():
    runner = Runner("cpu", 2)
    w = torch.randn(3)
    runner.bind(lambda *args: [args[0] * args[2], args[1]], [w, None, None], [2, 1])

    def never(inputs, slot):
        raise AssertionError("fn called although a callable is bound")

    x = torch.randn(3)
    out = runner.run(never, (x, "tag"))
    assert torch.equal(out[0], w * x) and out[1] == "tag"
    w2 = torch.randn(3)
    runner.bind(lambda *args: args[0] + args[1], [w2, None], [1])  # a new binding takes effect at once
    assert torch.equal(runner.run(never, (x,)), w2 + x)
    with pytest.raises(InputError) as e:
        runner.run(never, (x, x))
    assert str(e.value) == "the engine takes 1 inputs, got 2"
    with pytest.raises(ValueError, match="input position 5 is outside the 2 arguments"):
        runner.bind(lambda *args: None, [w2, None], [5])


def test_cpu_scalars_mix_with_any_device():
    runner = Runner("cpu", 1)
    assert runner.run(lambda inputs, slot: len(inputs), (torch.tensor(2.0), torch.ones(3))) == 2


def test_an_exception_in_the_engine_propagates_and_frees_the_slot():
    runner = Runner("cpu", 1)

    def boom(inputs, slot):
        raise KeyError("engine failed")

    for _ in range(5):
        with pytest.raises(KeyError, match="engine failed"):
            runner.run(boom, ())
    assert runner.run(lambda inputs, slot: slot, ()) == 0  # the single slot was released every time


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_slots must be at least 1, got 0"):
        Runner("cpu", 0)
    with pytest.raises(ValueError, match="engines run on cpu or cuda devices, got meta"):
        Runner("meta", 1)


@pytest.mark.skipif(_runtime.built_with_cuda, reason="this build has CUDA")
def test_cpu_build_refuses_cuda_engines_with_the_fix():
    with pytest.raises(RuntimeError, match="built without CUDA .* Rebuild with CUDA_HOME set"):
        Runner("cuda:0", 1)


def test_threads_never_share_a_slot_and_wait_when_all_are_busy():
    runner = Runner("cpu", 2)
    lock = threading.Lock()
    active: dict[int, int] = {}
    peak = [0]
    errors = []

    def engine(inputs, slot):
        with lock:
            if slot in active:
                errors.append(f"slot {slot} used by two callers at once")
            active[slot] = threading.get_ident()
            peak[0] = max(peak[0], len(active))
        time.sleep(0.002)  # releases the GIL: other threads reach the runner meanwhile
        with lock:
            del active[slot]
        return slot

    def worker():
        for _ in range(50):
            runner.run(engine, ())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert peak[0] == 2  # both slots were in use at once, never more
    assert runner.slots_created == 2
