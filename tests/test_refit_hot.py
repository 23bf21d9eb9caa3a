"""Hot refit on CUDA: one stream refits weights A and B in turn while another runs inference
continuously; with refit_double_buffer every output is exactly f(A) or f(B), never a mix."""

import threading

import pytest
import torch

import torchtrt_ext

pytestmark = pytest.mark.cuda


class _Deep(torch.nn.Module):
    def __init__(self, width: int = 2048, depth: int = 8):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.cuda() for k, v in _Deep().state_dict().items()}


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_hot_refit_every_output_is_exactly_f_of_a_or_f_of_b(cuda_graphs):
    model = _Deep().cuda().eval()
    x = torch.randn(64, 2048, device="cuda")
    compiled = torchtrt_ext.compile(model, (x,), refit_double_buffer=True, cuda_graphs=cuda_graphs, dynamic_batch=False)
    a, b = _weights(1), _weights(2)
    infer_stream, refit_stream = torch.cuda.Stream(), torch.cuda.Stream()
    infer_stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(infer_stream):
        # f(A) and f(B) from the engine itself, on the inference stream: exact references.
        torchtrt_ext.refit(compiled, a)
        f_a = compiled(x).clone()
        torchtrt_ext.refit(compiled, b)
        f_b = compiled(x).clone()
    torch.cuda.synchronize()
    assert not torch.equal(f_a, f_b)

    stop = threading.Event()
    counts = {"calls": 0}
    wrong = torch.zeros((), dtype=torch.int64, device="cuda")
    errors = []

    def infer():
        try:
            with torch.no_grad(), torch.cuda.stream(infer_stream):
                while not stop.is_set() or counts["calls"] < 200:
                    y = compiled(x)
                    exact = torch.eq(y, f_a).all() | torch.eq(y, f_b).all()
                    wrong.add_((~exact).long())
                    counts["calls"] += 1
        except Exception as exc:  # surfaced below
            errors.append(exc)

    def refit():
        try:
            with torch.no_grad(), torch.cuda.stream(refit_stream):
                for i in range(300):
                    torchtrt_ext.refit(compiled, a if i % 2 else b)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=infer), threading.Thread(target=refit)]
    for t in threads:
        t.start()
    threads[1].join()
    stop.set()
    threads[0].join()
    torch.cuda.synchronize()
    assert not errors, errors[0]
    assert counts["calls"] >= 200
    assert wrong.item() == 0, f"{wrong.item()} of {counts['calls']} outputs were neither f(A) nor f(B)"
    with torch.no_grad(), torch.cuda.stream(refit_stream):  # and the last refit (A) is what runs now
        assert torch.equal(compiled(x), f_a)
