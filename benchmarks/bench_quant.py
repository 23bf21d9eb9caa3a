"""Quantized engines (issue 16): speed and accuracy against the fp16 built-in engine, same run.

    python -m benchmarks quant --out DIR [--quick]          # QUANT_PARTS=gemm,speed,accuracy,streamed

* gemm: the low-precision products alone at the 1.1B model's shapes (M = 8 x 512 = 4096 rows):
  torch._scaled_mm fp8 with row-wise scales and torch._int_mm int8, against an fp16 torch.mm.
* speed: the 1.1B Llama-style model (logits, 8x512) and ViT-B/16 (b64), fp16, through the wrapper:
  the fp16 engine, then fp8 and int8 engines from one calibration of 32 batches; latency ratios
  taken round by round against the fp16 engine, cosine similarity of the outputs to it.
* accuracy: every zoo model (benchmarks.bench_zoo's models and inputs), calibrated on 32 batches from
  its input distribution; cosine of the fp8 and int8 engines' first output against the fp16 engine's,
  and how many layers were quantized: linear layers, transformers' Conv1D (GPT-2) and convolutions
  (these through quantized_conv, which stores quantized weights but has no low-precision kernel).
* streamed: weight streaming of the quantized engines ("weight-streamed FP8 moves half the bytes of
  fp16, and its step stays within 1.15x of its copy floor"). The 1.1B model stays on the host in fp16;
  one calibration (4 batches, on a device copy of the model), then weight_streaming=True and
  cuda_graphs=True engines at fp16 (the model's precision), fp8 and int8. Per budget: the bytes each
  step streams (checked to be exactly the quantized weights at one byte, their float32 scales and the
  float weights left, against the fp16 engine's), their ratio to fp16's, the step against its copy
  floor (one pinned host-to-device copy_ of that many bytes, timed in the same interleaved rounds), and
  the logits' cosine against the fp16 streamed engine. 1x128 at budgets 25% and 0% (the budget changes
  at run time: 0% costs seconds, not a compile); QUANT_STREAMED_SHAPES=1x128,8x512,
  QUANT_STREAMED_BUDGETS=0,25,50 and QUANT_STREAMED_RESIDENT=1 (a resident cuda_graphs fp8 engine's
  step, one compile more) widen it. About 2 minutes on the H200 (3 streamed compiles of ~30 s each, the
  model's build on the host, calibration); the part prints its time by phase. On the CPU compile
  refuses weight streaming (it needs a CUDA device): the part builds the engines as the CPU tests do,
  running the same program with synchronous copies, and the floor is a host memcpy of the bytes.
Quick mode (and the CPU): tiny configs, fewer batches, float32.
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

import torchtrt_ext
from benchmarks import models
from benchmarks.bench_zoo import as_call, build_case, first_line, have_timm, model_specs, tensors
from benchmarks.parts import run_parts
from benchmarks.timing import latency_ms, step_and_host_interleaved_s
from torchtrt_ext.core import lifting
from torchtrt_ext.core.settings import Settings
from torchtrt_ext.engines.streamed import StreamedEngine
from torchtrt_ext.operations.weight_streaming import WeightStreaming

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


def _env_list(name: str, default: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _streamed_engine(model: torch.nn.Module, ids: torch.Tensor, precision: str | None, cache: Any):
    """(call, engine, its WeightStreaming) of a weight-streaming engine of the host model. CUDA: through
    compile, with CUDA graphs. The CPU: compile refuses streaming there, so the engine is built as the CPU
    tests build it (the same program, synchronous copies)."""
    options = dict(precision=precision, calibration=cache) if precision else {}
    if ids.device.type == "cuda":
        compiled = torchtrt_ext.compile(model, (ids,), weight_streaming=True, dynamic_batch=False, cuda_graphs=True, **options)
        return compiled, compiled.engines[0], torchtrt_ext.weight_streaming(compiled)
    with torch.no_grad():
        ep = torch.export.export(model, (ids,), strict=False)
    settings = Settings(engine="builtin", weight_streaming=True, weight_streaming_budget=0, **options)
    engine = StreamedEngine(lifting.from_export(ep), settings, ids.device)
    return (lambda x: engine(x)[0]), engine, WeightStreaming([engine])


def _expected_total(model: torch.nn.Module, float_total: int, plan: Any) -> int:
    """The quantized engine's weight bytes from the float engine's and the model: each quantized layer's
    float weight out, its copy at one byte an element and float32 scales per output channel in."""
    seen: set[int] = set()
    total = float_total
    for name in plan.layers:
        weight = model.get_submodule(name.rsplit(":", 1)[0]).weight
        if id(weight) not in seen:
            seen.add(id(weight))
            total += weight.numel() + 4 * weight.shape[0] - _nbytes(weight)
    return total


def _streamed_part(device: torch.device, quick: bool) -> list[dict]:
    tiny = quick or device.type != "cuda"
    dtype = torch.float32 if tiny else torch.float16
    float_name = {torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    shapes = [(2, 16)] if tiny else [tuple(map(int, s.split("x"))) for s in _env_list("QUANT_STREAMED_SHAPES", "1x128")]
    budgets = [int(b) for b in _env_list("QUANT_STREAMED_BUDGETS", "25,0")]
    resident_ref = tiny or os.environ.get("QUANT_STREAMED_RESIDENT") == "1"
    rounds = 3 if tiny else 9
    if not tiny:
        estimate = len(shapes) * (20 + 30 * (3 + resident_ref) + 3 * len(budgets)) + 20
        print(f"streamed part: about {estimate} s of device time (model build, calibration, "
              f"{3 + resident_ref} compiles of ~30 s per shape, timing)", flush=True)
    phases: dict[str, float] = {}
    start = time.perf_counter()
    host = torch.device("cpu")
    lm = models.LogitsOnly((models.tiny_llama if tiny else models.llama)(host, dtype)).eval()  # kept on the host
    vocab = lm.lm.config.vocab_size
    phases["build"] = time.perf_counter() - start
    rows = []
    with torch.no_grad():
        for batch, tokens in shapes:
            t0 = time.perf_counter()
            on_device = copy.deepcopy(lm).to(device) if device.type == "cuda" else lm
            batches = [(torch.randint(0, vocab, (batch, tokens), device=device),) for _ in range(4)]
            cache = torchtrt_ext.calibrate(on_device, batches, progress=False)
            ids = torch.randint(0, vocab, (batch, tokens), device=device)
            resident = None
            if resident_ref:
                resident = torchtrt_ext.compile(on_device, (ids,), dynamic_batch=False, cuda_graphs=device.type == "cuda",
                                                precision="fp8", calibration=cache)
            del on_device
            t1 = time.perf_counter()
            phases["calibrate"] = phases.get("calibrate", 0.0) + t1 - t0
            engines, compile_s = {}, {}
            for precision in (float_name, "fp8", "int8"):
                t = time.perf_counter()
                engines[precision] = _streamed_engine(lm, ids, None if precision == float_name else precision, cache)
                compile_s[precision] = time.perf_counter() - t
            phases["compile_engines"] = phases.get("compile_engines", 0.0) + time.perf_counter() - t1
            t2 = time.perf_counter()
            totals = {p: ws.total_bytes for p, (_, _, ws) in engines.items()}
            for p in ("fp8", "int8"):  # exact: a benchmark that reports wrong bytes is no benchmark
                expected = _expected_total(lm, totals[float_name], engines[p][1].quantization)
                assert totals[p] == expected, f"{p} engine streams {totals[p]} bytes in all, expected {expected}"
            if not tiny:  # the 1.1B model: the float embedding (6% of fp16) is what keeps it above one half
                assert 0.45 < totals["fp8"] / totals[float_name] < 0.6, totals
            most = max(totals.values())
            src = torch.empty(most, dtype=torch.uint8, pin_memory=device.type == "cuda")
            dst = torch.empty(most, dtype=torch.uint8, device=device)
            for percent in budgets:
                moved = {}
                for p, (_, engine, ws) in engines.items():
                    ws.device_budget = f"{percent}%"
                    moved[p] = engine.streamed_bytes
                    if percent == 0:  # every weight streams (less buffers that no segment reads)
                        assert 0.99 * totals[p] <= moved[p] <= totals[p], (p, moved[p], totals[p])
                # twice: with CUDA graphs the second call is a replay; cloned, as a replay may reuse its output
                outputs = {p: [call(ids) for _ in range(2)][-1].float().clone() for p, (call, _, _) in engines.items()}
                variants = {p: (lambda call=call: call(ids)) for p, (call, _, _) in engines.items()}
                for n in sorted(set(moved.values()) - {0}):
                    variants[f"copy {n}"] = lambda n=n: dst[:n].copy_(src[:n], non_blocking=True)
                if resident is not None:
                    variants["resident fp8"] = lambda: resident(ids)
                timed = {k: v[0] * 1e3 for k, v in step_and_host_interleaved_s(variants, device, rounds).items()}
                for p, (_, _, ws) in engines.items():
                    floor = timed[f"copy {moved[p]}"] if moved[p] else 0.0
                    rows.append({
                        "part": "streamed", "shape": f"{batch}x{tokens}", "precision": p, "budget": f"{percent}%",
                        "total_MB": round(totals[p] / 1e6, 3), "resident_MB": round(ws.resident_bytes / 1e6, 3),
                        "streamed_MB_per_step": round(moved[p] / 1e6, 3),
                        f"bytes_vs_{float_name}": round(moved[p] / moved[float_name], 3) if moved[float_name] else None,
                        "step_ms": round(timed[p], 3), "copy_floor_ms": round(floor, 3),
                        "vs_floor": round(timed[p] / floor, 3) if floor else None,
                        "copy_GBps": round(moved[p] / floor / 1e6, 1) if floor else None,
                        f"cosine_vs_{float_name}": round(_cosine(outputs[p], outputs[float_name]), 5),
                        "resident_fp8_ms": round(timed["resident fp8"], 3) if resident is not None else None,
                        "compile_s": round(compile_s[p], 1),
                    })
                    print(rows[-1], flush=True)
            phases["time"] = phases.get("time", 0.0) + time.perf_counter() - t2
            del engines, resident, src, dst
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    phases["total"] = time.perf_counter() - start
    times = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
    print(f"streamed part on {device}: {times}", flush=True)
    rows.append({"part": "streamed", "shape": "(part time, s)", **{f"{k}_s": round(v, 1) for k, v in phases.items()}})
    return rows


PARTS = {"gemm": _gemm_part, "speed": _speed_part, "accuracy": _accuracy_part, "streamed": _streamed_part}


def run(device: torch.device, quick: bool = False) -> list[dict]:
    return run_parts("QUANT_PARTS", PARTS, device, quick)
