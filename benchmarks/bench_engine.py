"""Built-in engine against eager and plain torch.compile, same inputs, same run (issue 2).

ResNet-50 (torchvision, random weights) at batch 1 and 32, and a Llama-style decoder (transformers
config: hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632, vocab 32000) at batch 1 x 128
tokens, all fp16. Variants: eager; torch.compile (Inductor); our backend through torch.compile; our
drop-in wrapper (torch.export frontend).
"""

from __future__ import annotations

import gc
import time

import torch

import torchtrt_ext
from benchmarks import models
from benchmarks.timing import latency_ms

DTYPE = torch.float16


def _cases(models_wanted: tuple[str, ...], quick: bool):
    def resnet_input(dev, b):
        return torch.randn(b, 3, 224, 224, device=dev, dtype=DTYPE)

    def llama_input(dev, b):
        return torch.randint(0, models.LLAMA_CONFIG["vocab_size"], (b, 128), device=dev)

    if "llama" in models_wanted and not quick:
        yield "llama-1.1b", 1, lambda dev: models.LogitsOnly(models.llama(dev, DTYPE)), llama_input
    if "resnet50" in models_wanted:
        for batch in (1,) if quick else (1, 32):
            yield "resnet50", batch, lambda dev: models.resnet50(dev, DTYPE), resnet_input


def _on_stream(stream: torch.cuda.Stream, fn, x):
    with torch.cuda.stream(stream):
        return fn(x)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run(
    device: torch.device,
    quick: bool = False,
    models_wanted: tuple[str, ...] = ("llama", "resnet50"),
    with_wrapper: bool = True,
    with_streams: bool = False,
) -> list[dict]:
    rows = []
    for name, batch, make_model, make_input in _cases(models_wanted, quick):
        torch._dynamo.reset()
        model = make_model(device)
        x = make_input(device, batch)
        compiled: dict[str, torch.nn.Module] = {"eager": model}
        compile_s: dict[str, float] = {"eager": 0.0}
        with torch.no_grad():
            ref = model(x)
            builds = [
                ("torch.compile", lambda: torch.compile(model, dynamic=False)),
                ("ours: backend", lambda: torch.compile(model, backend="torchtrt_ext", dynamic=False)),
            ]
            if with_wrapper:
                builds.append(("ours: wrapper", lambda: torchtrt_ext.compile(model, (x,), dynamic_batch=False)))
            for variant, build in builds:
                start = time.perf_counter()
                fn = build()
                fn(x)
                torch.cuda.synchronize(device) if device.type == "cuda" else None
                compile_s[variant] = time.perf_counter() - start
                compiled[variant] = fn
            errors = {v: _rel_err(fn(x), ref) for v, fn in compiled.items()}
            calls = {v: (lambda fn=fn: fn(x)) for v, fn in compiled.items()}
            if device.type == "cuda" and with_streams:
                # The same compiled functions called under a custom stream: on the legacy default stream
                # our runtime runs the engine on a blocking side stream, on a custom stream in place.
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                for v in ("torch.compile", "ours: backend"):
                    fn = compiled[v]
                    calls[f"{v} (custom stream)"] = lambda fn=fn: _on_stream(side, fn, x)
                    errors[f"{v} (custom stream)"] = errors[v]
            timings = latency_ms(calls, device)
        base = timings["torch.compile"]
        for variant in calls:
            t = timings[variant]
            rows.append(
                {
                    "model": name,
                    "batch": batch if name != "llama-1.1b" else "1x128",
                    "variant": variant,
                    "latency_ms": round(t["latency"], 4),
                    "latency_spread": round(t["latency_spread"], 4),
                    "back_to_back_ms": round(t["throughput"], 4),
                    "back_to_back_min_ms": round(t["throughput_min"], 4),
                    "latency_vs_torch_compile": round(t["latency"] / base["latency"], 4),
                    "back_to_back_vs_torch_compile": round(t["throughput"] / base["throughput"], 4),
                    "compile_s": round(compile_s.get(variant, 0.0), 1),
                    "rel_err_vs_eager": float(f"{errors[variant]:.3g}"),
                }
            )
        del compiled, calls, model, x, ref
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def run_llama(device: torch.device, quick: bool = False) -> list[dict]:
    return run(device, quick, ("llama",))


def run_resnet50(device: torch.device, quick: bool = False) -> list[dict]:
    """ResNet-50 through the backend only (the wrapper's export graph is timed on Llama), to fit the
    GPU session's time."""
    return run(device, quick, ("resnet50",), with_wrapper=False, with_streams=True)
