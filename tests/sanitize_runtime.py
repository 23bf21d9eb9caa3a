"""A short run of the C++ runtime for compute-sanitizer: several threads and streams (the legacy default
stream included) drive an engine whose body is plain torch ops, with producer and consumer on other
streams. No Inductor, so it starts quickly under the sanitizer. Exits non-zero on a wrong output.

    compute-sanitizer --tool memcheck python -m tests.sanitize_runtime
"""

from __future__ import annotations

import random
import threading

import torch

from tests.stress_streams import cross_stream_call, run_threads
from torchtrt_ext.core.runtime import Runner


def main(calls: int = 200, threads: int = 3) -> None:
    runner = Runner("cuda:0", 4)
    weight = torch.randn(64, 64, device="cuda")

    def engine(inputs, slot):
        (x,) = inputs
        return [torch.tanh(x @ weight) + 1.0]

    streams = [torch.cuda.Stream() for _ in range(3)]
    engine_streams = streams + [torch.cuda.default_stream()]
    xs = [torch.randn(16, 64, device="cuda") for _ in range(4)]
    refs = [torch.tanh(x @ weight) + 1.0 for x in xs]
    torch.cuda.synchronize()
    flags: list[torch.Tensor] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        rng = random.Random(t)
        for _ in range(calls // threads):
            k = rng.randrange(len(xs))
            producer, consumer, where = rng.choice(streams), rng.choice(streams), rng.choice(engine_streams)
            bad = cross_stream_call(
                lambda x: runner.run(engine, (x,))[0],
                xs[k],
                producer,
                where,
                consumer,
                lambda y, ref=refs[k]: ((y - ref).abs() > 1e-4).any(),
            )
            with lock:
                flags.append(bad)

    run_threads(worker, threads)
    wrong = sum(bool(f) for f in flags)
    print(f"sanitize_runtime: {len(flags)} calls, {threads} threads, {wrong} wrong outputs")
    raise SystemExit(1 if wrong else 0)


if __name__ == "__main__":
    main()
