"""Stream stress: threads x streams calling compiled zoo models, producer and consumer on other streams.

Each call: a producer stream makes a fresh input, the engine stream waits for it (an event) and runs
the compiled model, a consumer stream waits for the engine (an event) and compares every element with
eager PyTorch. Cross-stream tensor use is declared with record_stream, as torch asks; nothing else
orders the streams. Engine streams include the legacy default stream (our fenced side-stream path).

    python -m tests.stress_streams --calls 10000 --threads 4     # prints wrong outputs (must be 0)
"""

from __future__ import annotations

import argparse
import random
import threading

import torch

from tests import zoo

NAMES = ("mlp", "cnn", "encoder", "buffers")


def cross_stream_call(fn, source, producer, engine_stream, consumer, check):
    """The producer writes a fresh copy of `source`; the engine stream waits for it (an event) and runs
    fn; the consumer waits for that (an event) and returns check(output), computed on the consumer.
    Cross-stream use is declared with record_stream, as torch asks; nothing else orders the streams."""
    with torch.cuda.stream(producer):
        x = source * 1.0
        produced = torch.cuda.Event()
        produced.record(producer)
    with torch.cuda.stream(engine_stream):
        engine_stream.wait_event(produced)
        x.record_stream(engine_stream)
        y = fn(x)
        done = torch.cuda.Event()
        done.record(engine_stream)
    with torch.cuda.stream(consumer):
        consumer.wait_event(done)
        y.record_stream(consumer)
        return check(y)


def run_threads(worker, threads: int) -> None:
    """worker(t) on `threads` threads at once, then wait for all of them and for the device."""
    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    torch.cuda.synchronize()


def run(
    calls: int = 10_000, threads: int = 4, streams: int = 4, seed: int = 0, names=NAMES, cuda_graphs: bool = False
) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(seed)
    models = {n: zoo.build(n, device, seed=i) for i, n in enumerate(names)}
    options = {"cuda_graphs": cuda_graphs}
    compiled = {n: torch.compile(models[n], backend="torchtrt_ext", options=options, dynamic=False) for n in names}
    inputs, refs = {}, {}
    with torch.no_grad():
        for n in names:
            inputs[n] = [zoo.inputs(n, 4, device)[0][0] for _ in range(8)]
            refs[n] = [models[n](x) for x in inputs[n]]
            for x, ref in zip(inputs[n], refs[n]):  # compile, and check once single-threaded
                zoo.assert_matches(compiled[n](x), ref, torch.float32)
    torch.cuda.synchronize()
    pool = [torch.cuda.Stream() for _ in range(streams)]
    engine_streams = pool + [torch.cuda.default_stream()]
    tol = zoo.TOLERANCE[torch.float32]
    results: list[list[torch.Tensor]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        rng = random.Random(seed * 1000 + t)
        try:
            with torch.no_grad():
                for _ in range(calls // threads):
                    n = rng.choice(names)
                    k = rng.randrange(len(inputs[n]))
                    producer, consumer = rng.choice(pool), rng.choice(pool)
                    engine_stream = rng.choice(engine_streams)
                    ref = refs[n][k]
                    results[t].append(
                        cross_stream_call(
                            compiled[n],
                            inputs[n][k],
                            producer,
                            engine_stream,
                            consumer,
                            lambda y, ref=ref: ((y - ref).abs() > tol["atol"] + tol["rtol"] * ref.abs()).any(),
                        )
                    )
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    run_threads(worker, threads)
    if errors:
        raise errors[0]
    flags = [bool(f) for per_thread in results for f in per_thread]
    return {"calls": len(flags), "wrong": sum(flags), "threads": threads, "streams": streams}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--names", default=",".join(NAMES))
    parser.add_argument("--cuda-graphs", action="store_true")
    args = parser.parse_args()
    result = run(args.calls, args.threads, names=tuple(args.names.split(",")), cuda_graphs=args.cuda_graphs)
    print(f"stress: {result['calls']} calls, {result['threads']} threads, {result['streams']} streams, "
          f"{result['wrong']} wrong outputs")
    raise SystemExit(1 if result["wrong"] else 0)


if __name__ == "__main__":
    main()
