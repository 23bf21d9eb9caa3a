"""Quantized engines (issue 16): speed and accuracy against the fp16 built-in engine, same run.

    python -m benchmarks quant --out DIR [--quick]          # QUANT_PARTS=gemm,speed,accuracy

* gemm: the low-precision products alone at the 1.1B model's shapes (M = 8 x 512 = 4096 rows):
  torch._scaled_mm fp8 with row-wise scales and torch._int_mm int8, against an fp16 torch.mm.
* speed: the 1.1B Llama-style model (logits, 8x512) and ViT-B/16 (b64), fp16, through the wrapper:
  the fp16 engine, then fp8 and int8 engines from one calibration of 32 batches; latency ratios
  taken round by round against the fp16 engine, cosine similarity of the outputs to it.
* accuracy: every zoo model (benchmarks.bench_zoo's models and inputs), calibrated on 32 batches from
  its input distribution; cosine of the fp8 and int8 engines' first output against the fp16 engine's,
  and how many layers were quantized: linear layers, transformers' Conv1D (GPT-2) and convolutions
  (these through quantized_conv, which stores quantized weights but has no low-precision kernel).
Quick mode (and the CPU): tiny configs, fewer batches, float32.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from typing import Any, Callable

import torch

import torchtrt_ext
from benchmarks import models
from benchmarks.bench_zoo import as_call, build_case, first_line, have_timm, model_specs, tensors
from benchmarks.parts import run_parts
from benchmarks.timing import latency_ms

PRECISIONS = ("fp8", "int8")
SHAPES = [(4096, 2048, 5632), (4096, 5632, 2048), (4096, 2048, 2048)]  # M, K, N of the 1.1B model at 8x512


def _cosine(a: Any, b: Any) -> float:
    x, y = tensors(a)[0].float().flatten(), tensors(b)[0].float().flatten()
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def _gemm_part(device: torch.device, quick: bool) -> list[dict]:
    if device.type != "cuda":
        return []
    rows = []
    for m, k, n in SHAPES[:1] if quick else SHAPES:
        a = torch.randn(m, k, device=device, dtype=torch.float16)
        b = torch.randn(n, k, device=device, dtype=torch.float16)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        ai, bi = a.clamp(-127, 127).to(torch.int8), b.clamp(-127, 127).to(torch.int8)
        sa = torch.ones(m, 1, device=device)
        sb = torch.ones(1, n, device=device)
        fns = {
            "fp16 mm": lambda: torch.mm(a, b.t()),
            "fp8 _scaled_mm rowwise": lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
            "int8 _int_mm": lambda: torch._int_mm(ai, bi.t()),
        }
        times = latency_ms(fns, device, warmup=3, rounds=5, calls=20)
        for name, t in times.items():
            rows.append({"part": "gemm", "case": f"{m}x{k}x{n}", "variant": name, "ms": round(t["throughput"], 4),
                         "speedup_vs_fp16": round(times["fp16 mm"]["throughput"] / t["throughput"], 2)})
            print(rows[-1], flush=True)
    return rows


def _compare(name: str, model: torch.nn.Module, make_call: Callable[[], tuple[tuple, dict]], device: torch.device,
             batches: int, timing: dict | None, case: str) -> list[dict]:
    """The model through the wrapper at its dtype and at each precision, from one calibration."""
    calib = [make_call() for _ in range(batches)]
    start = time.perf_counter()
    cache = torchtrt_ext.calibrate(model, [kw if kw else args for args, kw in calib], progress=False)
    calib_s = time.perf_counter() - start
    args, kwargs = make_call()
    engines = {"model dtype": torchtrt_ext.compile(model, args or None, kwargs or None)}
    errors = {}
    for precision in PRECISIONS:
        try:
            engines[precision] = torchtrt_ext.compile(model, args or None, kwargs or None, precision=precision,
                                                      calibration=cache, calibration_coverage="warn")
        except Exception as exc:
            errors[precision] = first_line(exc)
    outputs = {v: fn(*args, **kwargs) for v, fn in engines.items()}
    times = latency_ms({v: (lambda fn=fn: fn(*args, **kwargs)) for v, fn in engines.items()}, device, **timing) if timing else {}
    rows = []
    for variant, fn in engines.items():
        plan = fn.engines[0].quantization if variant in PRECISIONS and fn.engines else None
        row = {"part": "speed" if timing else "accuracy", "model": name, "case": case, "variant": variant,
               "quantized_layers": len(plan.layers) if plan else 0,
               "cosine_vs_model_dtype": round(_cosine(outputs[variant], outputs["model dtype"]), 5)}
        if times:
            row["ms"] = round(times[variant]["latency"], 3)
            row["speedup_vs_model_dtype"] = round(statistics.median(
                b / a for a, b in zip(times[variant]["round_latency"], times["model dtype"]["round_latency"])), 3)
        if variant == "model dtype":
            row["calibrate_s"] = round(calib_s, 1)
        rows.append(row)
        print(row, flush=True)
    rows += [{"part": "speed" if timing else "accuracy", "model": name, "variant": p, "error": e} for p, e in errors.items()]
    return rows


def _speed_part(device: torch.device, quick: bool) -> list[dict]:
    dtype = torch.float32 if quick or device.type != "cuda" else torch.float16
    timing = dict(warmup=1, rounds=2, calls=2) if quick else dict(warmup=3, rounds=9, calls=5)
    rows = []
    with torch.no_grad():
        if quick:
            lm = models.LogitsOnly(models.tiny_llama(device, dtype))
            shape = (2, 16)
        else:
            lm = models.LogitsOnly(models.llama(device, dtype))
            shape = (8, 512)
        vocab = lm.lm.config.vocab_size
        rows += _compare("llama-1.1b" if not quick else "llama-tiny", lm,
                         lambda: ((torch.randint(0, vocab, shape, device=device),), {}), device, 4 if quick else 32, timing,
                         f"{shape[0]}x{shape[1]}")
        del lm
        gc.collect()
        import transformers as tf

        cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8) if quick else tf.ViTConfig()
        torch.manual_seed(0)
        vit = tf.ViTModel(cfg).to(device, dtype).eval()
        b = 2 if quick else 64
        rows += _compare("vit-b16", vit, lambda: ((), {"pixel_values": torch.randn(b, 3, cfg.image_size, cfg.image_size,
                                                                                   device=device, dtype=dtype)}),
                         device, 4 if quick else 32, timing, f"b{b}")
    return rows


def _accuracy_part(device: torch.device, quick: bool) -> list[dict]:
    tiny = quick or device.type != "cuda"
    rows = []
    for name, spec in model_specs(tiny, have_timm()).items():
        torch._dynamo.reset()
        try:
            model, make_inputs, _, dtype = build_case(spec, device, tiny)

            def call():
                return as_call(make_inputs(device, dtype))

            with torch.no_grad():
                rows += _compare(name, model, call, device, 4 if quick else 32, None, "")
        except Exception as exc:
            rows.append({"part": "accuracy", "model": name, "error": first_line(exc)})
            print(rows[-1], file=sys.stderr, flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


PARTS = {"gemm": _gemm_part, "speed": _speed_part, "accuracy": _accuracy_part}


def run(device: torch.device, quick: bool = False) -> list[dict]:
    return run_parts("QUANT_PARTS", PARTS, device, quick)
