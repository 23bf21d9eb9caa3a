"""Weight streaming (issue 5): step time of the Llama-style model (2.2 GB fp16, kept on the host) at
device budgets 0/25/50/75/100%, against the floor max(step of the resident engine, one pinned
host-to-device copy_ of the bytes streamed per step), all timed in the same rounds, call for call in
turn (the host's speed and the link's drift within a run). Both without CUDA graphs (the default) and
with cuda_graphs=True, each against the resident engine in the same mode; and against Hugging Face
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


def _streamed_bytes(engine) -> int:
    return engine.streamed_bytes


def run(device: torch.device, quick: bool = False) -> list[dict]:
    if device.type != "cuda":
        raise RuntimeError("the streaming benchmark needs a CUDA device")
    shapes = [(1, 128)] if quick else [(1, 128), (8, 512)]
    model = LogitsOnly(llama(torch.device("cpu"), torch.float16)).eval()  # on the host, as for a big model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # The copy floor's own copy: the same bytes as a budget streams, pinned host to device in one copy_,
    # timed in the same rounds as the engines (the link's speed drifts: 41 to 54 GB/s across one run).
    pinned_src = torch.empty(total, dtype=torch.uint8).pin_memory()
    copy_dst = torch.empty(total, dtype=torch.uint8, device=device)
    rows = []
    began = time.perf_counter()

    def stage(label: str) -> None:  # where a time-limited run spends its time (stdout only)
        print(f"[streaming] {label}: {time.perf_counter() - began:.1f} s", flush=True)

    with torch.no_grad():
        gpu_model = copy.deepcopy(model).to(device)
        for batch, tokens in shapes:
            ids = torch.randint(0, 32000, (batch, tokens), device=device)
            # Each mode against the resident engine in the same mode: without CUDA graphs (the default)
            # and with cuda_graphs=True (the host's launches out of the step).
            resident = torchtrt_ext.compile(gpu_model, (ids,), dynamic_batch=False)
            resident_graphs = torchtrt_ext.compile(gpu_model, (ids,), dynamic_batch=False, cuda_graphs=True)
            stage(f"{batch}x{tokens}: resident engines compiled")
            resident_profile = _launch_profile(lambda: resident(ids))
            t_eager = _time_ms(lambda: gpu_model(ids), 5)  # an anchor against the engine benchmark's runs
            reference = resident(ids).float()

            start = time.perf_counter()
            streamed = torchtrt_ext.compile(model, (ids,), weight_streaming=True, dynamic_batch=False)
            compile_s = time.perf_counter() - start
            streamed_graphs = torchtrt_ext.compile(model, (ids,), weight_streaming=True, dynamic_batch=False, cuda_graphs=True)
            stage(f"{batch}x{tokens}: streamed engines compiled")
            engine = streamed.engines[0]
            ws, ws_graphs = torchtrt_ext.weight_streaming(streamed), torchtrt_ext.weight_streaming(streamed_graphs)
            for percent in BUDGETS:
                ws.device_budget = ws_graphs.device_budget = f"{percent}%"
                moved = _streamed_bytes(engine)
                assert moved == _streamed_bytes(streamed_graphs.engines[0])
                errors = {}
                for name, m in (("eager", streamed), ("graphs", streamed_graphs)):
                    out = m(ids).float()
                    out = m(ids).float()  # with graphs: a replay, not the capture run
                    errors[name] = ((out - reference).norm() / reference.norm()).item()
                variants = {
                    "streamed": lambda: streamed(ids),
                    "resident": lambda: resident(ids),
                    "streamed_graphs": lambda: streamed_graphs(ids),
                    "resident_graphs": lambda: resident_graphs(ids),
                }
                if moved:
                    variants["copy"] = lambda: copy_dst[:moved].copy_(pinned_src[:moved], non_blocking=True)
                timed = {k: (v[0] * 1e3, v[1] * 1e3) for k, v in step_and_host_interleaved_s(variants, device, 9).items()}
                t_copy = timed["copy"][0] if moved else 0.0
                profiled = _launch_profile(lambda: streamed(ids)) if percent == 100 else {}
                for mode, key, ref_key in (("eager", "streamed", "resident"), ("graphs", "streamed_graphs", "resident_graphs")):
                    t, host = timed[key]
                    t_res, host_res = timed[ref_key]
                    floor = max(t_res, t_copy)
                    rows.append(
                        {
                            "shape": f"{batch}x{tokens}",
                            "budget": f"{percent}%",
                            "cuda_graphs": mode == "graphs",
                            "resident_MB": round(ws.resident_bytes / 1e6),
                            "ring_MB": round(ws.ring_bytes / 1e6),
                            "streamed_MB_per_step": round(moved / 1e6),
                            "step_ms": round(t, 2),
                            "floor_ms": round(floor, 2),
                            "vs_floor": round(t / floor, 3),
                            "host_ms": round(host, 2),
                            "resident_engine_ms": round(t_res, 2),
                            "resident_host_ms": round(host_res, 2),
                            "copy_ms": round(t_copy, 2),
                            "copy_GBps": round(moved / t_copy / 1e6, 1) if moved else None,
                            "eager_ms": round(t_eager, 2),
                            **(profiled if mode == "eager" else {}),
                            **({"resident_" + k: v for k, v in resident_profile.items()} if percent == 100 and mode == "eager" else {}),
                            "rel_err_vs_resident": round(errors[mode], 5),
                            "segments": engine.segment_count,
                            "compile_s": round(compile_s, 1),
                        }
                    )
                    print(rows[-1], flush=True)
            del streamed, streamed_graphs, engine, resident, resident_graphs
            torch.cuda.empty_cache()
        del gpu_model, copy_dst
        torch.cuda.empty_cache()

        stage("ours timed")
        # The peer: accelerate's cpu_offload (weights on the host, moved at each module's call).
        from accelerate import cpu_offload

        offloaded = cpu_offload(copy.deepcopy(model), execution_device=device)
        for batch, tokens in shapes:
            ids = torch.randint(0, 32000, (batch, tokens), device=device)
            t_acc = _time_ms(lambda: offloaded(ids), 3)
            ours = {r["cuda_graphs"]: r for r in rows if r["shape"] == f"{batch}x{tokens}" and r["budget"] == "0%"}
            rows.append(
                {
                    "shape": f"{batch}x{tokens}",
                    "budget": "0% (accelerate cpu_offload)",
                    "step_ms": round(t_acc, 1),
                    "vs_floor": round(t_acc / ours[False]["floor_ms"], 2),
                    "ours_faster_x": round(t_acc / ours[False]["step_ms"], 1),
                    "ours_graphs_faster_x": round(t_acc / ours[True]["step_ms"], 1),
                }
            )
            print(rows[-1], flush=True)
    return rows
