"""The stream bridge: host overhead per call, and throughput with 1, 2 and 4 concurrent streams (issue 3).

Overhead: a tiny graph (Linear 16x16, batch 1), host time per call of the engine against calling the
Inductor-compiled function directly in the same run, on a custom stream and on the legacy default
stream (where the engine runs on a fenced side stream).

Concurrency: a deep, narrow MLP at batch 8 (24 x Linear(256, 256) + GELU) whose kernels leave most of
the GPU idle, in CUDA-graph mode (our runtime replays its graphs with the GIL released); N threads,
each with its own stream, call it back to back. Peer: plain torch.compile(mode="reduce-overhead") of
the same model under the same threads (Inductor's CUDA-graph trees, replayed from Python).
"""

from __future__ import annotations

import threading
import time

import torch
import torch.nn as nn

import torchtrt_ext
from benchmarks.timing import host_us_interleaved


class DeepNarrow(nn.Module):
    def __init__(self, width: int = 256, depth: int = 24):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return x


def _overhead(device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Linear(16, 16).to(device).eval()
    x = torch.randn(1, 16, device=device)
    compiled = torchtrt_ext.compile(model, (x,), dynamic_batch=False)
    engine = compiled.engines[0]
    direct, args = engine.compiled_call(x)
    calls = 20_000
    rows = []
    custom = torch.cuda.Stream(device)
    with torch.no_grad():
        for where, stream in [("custom stream", custom), ("legacy default stream", torch.cuda.default_stream(device))]:
            with torch.cuda.stream(stream):
                for _ in range(200):
                    direct(*args), engine(x), compiled(x)
                torch.cuda.synchronize(device)
                t = host_us_interleaved(
                    {"direct": lambda: direct(*args), "engine": lambda: engine(x), "wrapper": lambda: compiled(x)},
                    calls // 4,
                )
                t_direct, t_engine, t_wrapper = t["direct"], t["engine"], t["wrapper"]
                torch.cuda.synchronize(device)
            rows.append(
                {
                    "measure": "host overhead per call",
                    "where": where,
                    "direct_us": round(t_direct, 2),
                    "engine_us": round(t_engine, 2),
                    "bridge_overhead_us": round(t_engine - t_direct, 2),
                    "wrapper_us": round(t_wrapper, 2),
                    "wrapper_overhead_us": round(t_wrapper - t_direct, 2),
                }
            )
    return rows


def _throughput(fn_for_thread, device: torch.device, threads: int, calls: int) -> float:
    """Aggregate calls per second with `threads` threads, each on its own stream.

    Warm-up (which records CUDA graphs, per thread) runs one thread at a time: a capture must not
    overlap CUDA work from other threads. The timed calls then start together.
    """
    warmup_lock = threading.Lock()
    start_line = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            stream = torch.cuda.Stream(device)
            fn = fn_for_thread(t)
            with torch.no_grad(), torch.cuda.stream(stream):
                with warmup_lock:
                    # cuBLAS handles are per thread: create this thread's before any CUDA-graph capture
                    eye = torch.eye(8, device=device)
                    eye @ eye
                    torch.cuda.synchronize(device)
                    for _ in range(20):
                        fn()
                    torch.cuda.synchronize(device)
                start_line.wait()
                for _ in range(calls):
                    fn()
                stream.synchronize()
        except BaseException as exc:
            errors.append(exc)
            start_line.abort()

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    try:
        start_line.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return threads * calls / elapsed


def _concurrency(device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = DeepNarrow().to(device).eval()
    x = torch.randn(8, 256, device=device)
    ours = torchtrt_ext.compile(model, (x,), cuda_graphs=True, dynamic_batch=False)
    peer = torch.compile(model, mode="reduce-overhead", dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).clone(), model(x), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(peer(x).clone(), model(x), rtol=1e-3, atol=1e-3)
    inputs = [torch.randn(8, 256, device=device) for _ in range(4)]
    rows = []
    calls = 400
    variants = [("ours (cuda_graphs)", ours), ("torch.compile reduce-overhead", peer)]
    for name, fn in variants:
        base = None
        for threads in (1, 2, 4):
            try:
                rate = _throughput(lambda t, fn=fn: (lambda: fn(inputs[t])), device, threads, calls)
            except Exception as exc:  # keep the other rows; say what failed
                rows.append({"measure": "throughput", "variant": name, "streams": threads, "error": f"{type(exc).__name__}: {exc}"[:200]})
                break
            base = base or rate
            rows.append(
                {
                    "measure": "throughput",
                    "variant": name,
                    "streams": threads,
                    "calls_per_s": round(rate, 1),
                    "vs_1_stream": round(rate / base, 3),
                }
            )
    return rows


def run(device: torch.device, quick: bool = False) -> list[dict]:
    if device.type != "cuda":
        raise RuntimeError("the streams benchmark needs a CUDA device")
    rows = _overhead(device)
    print("\n".join(str(r) for r in rows), flush=True)  # kept in the log even if what follows fails
    return rows + _concurrency(device)
