"""Refit latency (issue 4): new weights for the Llama-style model (2.2 GB fp16) from CUDA tensors, pinned
and pageable host tensors and a safetensors file, each against its floor (the same bytes moved by one
plain copy of one flat buffer, measured in the same run) and against recompiling.

    python -m benchmarks refit --out DIR
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time

import torch

import torchtrt_ext

from .models import LogitsOnly, llama
from .timing import step_and_host_s, sync


def _median_s(fn, device: torch.device, repeats: int) -> float:
    return step_and_host_s(fn, device, repeats)[0]


def _model(device: torch.device, quick: bool):
    if quick:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)]).to(device).eval()
        return model, torch.randn(4, 512, device=device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = LogitsOnly(llama(device, dtype)).eval()
    return model, torch.randint(0, 32000, (1, 128), device=device)


def run(device: torch.device, quick: bool = False) -> list[dict]:
    repeats = 2 if quick else 5
    model, example = _model(device, quick)
    with torch.no_grad():
        start = time.perf_counter()
        compiled = torchtrt_ext.compile(model, (example,), dynamic_batch=False)
        compiled(example)
        sync(device)
        first_compile_s = time.perf_counter() - start

        names = dict(compiled.engines[0].named_weights())
        torch.manual_seed(1)
        sources: dict[str, dict[str, torch.Tensor]] = {}
        if device.type == "cuda":
            sources["cuda tensors"] = {k: torch.randn_like(v) * 0.02 for k, v in names.items()}
            host = {k: v.cpu() for k, v in sources["cuda tensors"].items()}
            sources["pinned host tensors"] = {k: v.pin_memory() for k, v in host.items()}
        else:
            host = {k: torch.randn_like(v) * 0.02 for k, v in names.items()}
        sources["pageable host tensors"] = host
        total = sum(v.numel() * v.element_size() for v in host.values())

        folder = tempfile.mkdtemp(prefix="torchtrt_ext_refit_")
        path = os.path.join(folder, "weights.safetensors")
        import safetensors.torch

        safetensors.torch.save_file({k: v.contiguous() for k, v in host.items()}, path)

        # Floors: the same number of bytes moved by one copy of one flat buffer.
        dst = torch.empty(total, dtype=torch.uint8, device=device)
        floors: dict[str, float] = {}
        if device.type == "cuda":
            flat_gpu = torch.empty(total, dtype=torch.uint8, device=device).random_()
            floors["cuda tensors"] = _median_s(lambda: dst.copy_(flat_gpu), device, repeats)
            del flat_gpu
            flat_pinned = torch.empty(total, dtype=torch.uint8).pin_memory().random_()
            floors["pinned host tensors"] = _median_s(lambda: dst.copy_(flat_pinned, non_blocking=True), device, repeats)
            del flat_pinned
        flat_pageable = torch.empty(total, dtype=torch.uint8).random_()
        floors["pageable host tensors"] = _median_s(lambda: dst.copy_(flat_pageable), device, repeats)
        del flat_pageable
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        file_bytes = torch.frombuffer(mapping, dtype=torch.uint8)[-total:]
        floors["safetensors file"] = _median_s(lambda: dst.copy_(file_bytes), device, repeats)
        del file_bytes, dst

        rows = []
        refit_s: dict[str, float] = {}
        host_s: dict[str, float] = {}
        for label, weights in [*sources.items(), ("safetensors file", path)]:
            refit_s[label], host_s[label] = step_and_host_s(lambda: torchtrt_ext.refit(compiled, weights), device, repeats)
        if "cuda tensors" in sources:
            # The copy kernel alone (no planning, no checks in Python): how much of a CUDA refit is the
            # GPU's copy and how much the host's work before it; and one copy_ per weight, the path
            # the kernel replaced, over the same pairs.
            from torchtrt_ext.core.runtime import _C

            engine = compiled.engines[0]
            table = engine.weight_tensors()
            pairs = {index: sources["cuda tensors"][name] for name, index in engine.weight_index().items()}
            dsts, srcs = [table[i] for i in pairs], list(pairs.values())
            label = "batched copy kernel alone (engine's tensors, no refit)"
            refit_s[label], host_s[label] = step_and_host_s(lambda: _C.batched_copy(dsts, srcs), device, repeats)
            floors[label] = floors["cuda tensors"]

            def one_copy_each() -> None:
                for dst, src in zip(dsts, srcs):
                    dst.copy_(src, non_blocking=True)

            label = "one copy_ per weight (engine's tensors, no refit)"
            refit_s[label], host_s[label] = step_and_host_s(one_copy_each, device, repeats)
            floors[label] = floors["cuda tensors"]
        # The engine computes with the last weights loaded (the file's): check against eager.
        out = compiled(example).float()
        ref = model(example).float()
        rel_err = ((out - ref).norm() / ref.norm()).item()

        start = time.perf_counter()
        again = torchtrt_ext.compile(model, (example,), dynamic_batch=False)
        again(example)
        sync(device)
        recompile_s = time.perf_counter() - start
        del again

    for label in refit_s:
        rows.append(
            {
                "source": label,
                "bytes": total,
                "refit_ms": round(refit_s[label] * 1e3, 2),
                "host_ms": round(host_s[label] * 1e3, 2),
                "floor_ms": round(floors[label] * 1e3, 2),
                "floor_GBps": round(total / floors[label] / 1e9, 1),
                "vs_floor": round(refit_s[label] / floors[label], 3),
                "recompile_s": round(recompile_s, 3),
                "faster_than_recompile": round(recompile_s / refit_s[label], 1),
            }
        )
    rows.append({"source": "(first compile, s)", "refit_ms": round(first_compile_s * 1e3, 0), "rel_err_vs_eager": round(rel_err, 5)})
    os.remove(path)
    os.rmdir(folder)
    return rows
