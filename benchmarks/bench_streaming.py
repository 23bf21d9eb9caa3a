"""Weight streaming (issue 5): step time of the Llama-style model (2.2 GB fp16, kept on the host) at
device budgets 0/25/50/75/100%, against the floor max(compute time fully resident, bytes streamed per
step / pinned host-to-device bandwidth), both measured in the same run (the resident engine's time in
the same rounds as each budget's, call for call in turn), and against Hugging Face
accelerate's cpu_offload at budget 0.

    python -m benchmarks streaming --out DIR
"""

from __future__ import annotations

import copy
import time

import torch

import torchtrt_ext

from .models import LogitsOnly, llama
from .timing import step_and_host_interleaved_s, step_and_host_s

BUDGETS = (0, 25, 50, 75, 100)


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Medians of (step ms, host ms: until the call returns) over the same calls."""
    step, host = step_and_host_s(fn, torch.device("cuda"), repeats)
    return step * 1e3, host * 1e3


def _launch_profile(fn, steps: int = 3) -> dict:
    """Per step: kernel launches and the GPU's busy time (sum of kernel and copy durations), from
    torch.profiler. Same busy time and launches but a longer step: the difference is host work."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    launches = 0
    busy_us = 0.0
    for e in prof.key_averages():
        if "LaunchKernel" in e.key:
            launches += e.count
        if str(getattr(e, "device_type", "")).endswith("CUDA"):  # the kernels and copies themselves
            busy_us += e.self_device_time_total
    return {"launches_per_step": launches // steps, "gpu_busy_ms": round(busy_us / steps / 1e3, 2)}


def _time_ms(fn, repeats: int) -> float:
    return _timed(fn, repeats)[0]


def _pinned_bandwidth(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    seconds = _time_ms(lambda: dst.copy_(src, non_blocking=True), 5) / 1e3
    return nbytes / seconds


def _streamed_bytes(engine) -> int:
    program = engine._streamed
    sizes = [m.numel() * m.element_size() for m in program._masters]
    return sum(sizes[w] for ws in program.placement.streamed for w in ws)


def run(device: torch.device, quick: bool = False) -> list[dict]:
    if device.type != "cuda":
        raise RuntimeError("the streaming benchmark needs a CUDA device")
    shapes = [(1, 128)] if quick else [(1, 128), (8, 512)]
    model = LogitsOnly(llama(torch.device("cpu"), torch.float16)).eval()  # on the host, as for a big model
    bandwidth = _pinned_bandwidth(1 << 30)
    rows = []
    with torch.no_grad():
        gpu_model = copy.deepcopy(model).to(device)
        for batch, tokens in shapes:
            ids = torch.randint(0, 32000, (batch, tokens), device=device)
            resident = torchtrt_ext.compile(gpu_model, (ids,), dynamic_batch=False)
            resident_profile = _launch_profile(lambda: resident(ids))
            t_eager = _time_ms(lambda: gpu_model(ids), 5)  # an anchor against the engine benchmark's runs
            reference = resident(ids).float()

            start = time.perf_counter()
            streamed = torchtrt_ext.compile(model, (ids,), weight_streaming=True, dynamic_batch=False)
            compile_s = time.perf_counter() - start
            engine = streamed.engines[0]
            with torchtrt_ext.weight_streaming(streamed) as ws:
                for percent in BUDGETS:
                    ws.device_budget = f"{percent}%"
                    out = streamed(ids).float()
                    rel_err = ((out - reference).norm() / reference.norm()).item()
                    # Step and floor from the same rounds: the streamed and the resident engine in turn.
                    both = step_and_host_interleaved_s(
                        {"streamed": lambda: streamed(ids), "resident": lambda: resident(ids)}, device, 9
                    )
                    t, host = (x * 1e3 for x in both["streamed"])
                    t_res, host_res = (x * 1e3 for x in both["resident"])
                    profiled = _launch_profile(lambda: streamed(ids)) if percent == 100 else {}
                    moved = _streamed_bytes(engine)
                    floor = max(t_res, moved / bandwidth * 1e3)
                    rows.append(
                        {
                            "shape": f"{batch}x{tokens}",
                            "budget": f"{percent}%",
                            "resident_MB": round(ws.resident_bytes / 1e6),
                            "ring_MB": round(ws.ring_bytes / 1e6),
                            "streamed_MB_per_step": round(moved / 1e6),
                            "step_ms": round(t, 2),
                            "floor_ms": round(floor, 2),
                            "vs_floor": round(t / floor, 3),
                            "host_ms": round(host, 2),
                            "resident_engine_ms": round(t_res, 2),
                            "resident_host_ms": round(host_res, 2),
                            "eager_ms": round(t_eager, 2),
                            **profiled,
                            **({"resident_" + k: v for k, v in resident_profile.items()} if percent == 100 else {}),
                            "rel_err_vs_resident": round(rel_err, 5),
                            "segments": len(engine._streamed.segments),
                            "compile_s": round(compile_s, 1),
                        }
                    )
                    print(rows[-1], flush=True)
            del streamed, engine, resident
            torch.cuda.empty_cache()
        del gpu_model
        torch.cuda.empty_cache()

        # The peer: accelerate's cpu_offload (weights on the host, moved at each module's call).
        from accelerate import cpu_offload

        offloaded = cpu_offload(copy.deepcopy(model), execution_device=device)
        for batch, tokens in shapes:
            ids = torch.randint(0, 32000, (batch, tokens), device=device)
            t_acc = _time_ms(lambda: offloaded(ids), 3)
            ours = next(r for r in rows if r["shape"] == f"{batch}x{tokens}" and r["budget"] == "0%")
            rows.append(
                {
                    "shape": f"{batch}x{tokens}",
                    "budget": "0% (accelerate cpu_offload)",
                    "step_ms": round(t_acc, 1),
                    "vs_floor": round(t_acc / ours["floor_ms"], 2),
                    "ours_faster_x": round(t_acc / ours["step_ms"], 1),
                }
            )
            print(rows[-1], flush=True)
    rows.append({"shape": "(pinned H2D GB/s)", "step_ms": round(bandwidth / 1e9, 1)})
    return rows
