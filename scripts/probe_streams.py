"""Probe for the concurrency benchmark: is a DeepNarrow call host-bound or GPU-bound, and do its
kernels overlap across streams? Prints host us/call (no sync), GPU us/call (events, back to back on
one stream) and GPU us/call when 4 streams are fed round-robin from one thread."""

import time

import torch

import torchtrt_ext
from benchmarks.bench_streams import DeepNarrow


def probe(width, depth, dtype, graphs):
    torch.manual_seed(0)
    model = DeepNarrow(width, depth).cuda().to(dtype).eval()
    x = torch.randn(8, width, device="cuda", dtype=dtype)
    fn = torchtrt_ext.compile(model, (x,), cuda_graphs=graphs, dynamic_batch=False)
    streams = [torch.cuda.Stream() for _ in range(4)]
    with torch.no_grad():
        for s in streams:
            with torch.cuda.stream(s):
                for _ in range(5):
                    fn(x)
        torch.cuda.synchronize()
        s0 = streams[0]
        with torch.cuda.stream(s0):
            t = time.perf_counter()
            for _ in range(200):
                fn(x)
            host = (time.perf_counter() - t) / 200 * 1e6
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(200):
                fn(x)
            b.record()
        torch.cuda.synchronize()
        one = a.elapsed_time(b) / 200 * 1e3
        t = time.perf_counter()
        for i in range(400):
            with torch.cuda.stream(streams[i % 4]):
                fn(x)
        torch.cuda.synchronize()
        four = (time.perf_counter() - t) / 400 * 1e6
    print(f"width {width} depth {depth} {dtype} graphs={graphs}: host {host:.0f} us/call, "
          f"1 stream {one:.0f} us/call, 4 streams round-robin {four:.0f} us/call", flush=True)


for args in [(256, 24, torch.float32, False), (256, 24, torch.float32, True), (256, 24, torch.float16, True), (64, 64, torch.float16, True)]:
    try:
        probe(*args)
    except Exception as exc:
        print(args, "failed:", type(exc).__name__, str(exc)[:200])
