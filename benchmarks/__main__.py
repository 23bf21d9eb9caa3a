"""Benchmark harness: python -m benchmarks NAME [NAME ...] --out DIR [--quick] [--device cuda]

Each benchmark compares against a real peer measured in the same run and returns rows; the harness
writes DIR/NAME.json (rows plus environment) and DIR/NAME.md (a table), and prints the table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time

import torch

# name -> (module, function)
BENCHMARKS = {
    "engine": ("benchmarks.bench_engine", "run"),
    "engine_llama": ("benchmarks.bench_engine", "run_llama"),
    "engine_resnet50": ("benchmarks.bench_engine", "run_resnet50"),
    "streams": ("benchmarks.bench_streams", "run"),
    "refit": ("benchmarks.bench_refit", "run"),
    "streaming": ("benchmarks.bench_streaming", "run"),
    "files": ("benchmarks.bench_files", "run"),
    "engine_cache": ("benchmarks.bench_files", "run_cache"),
    "zoo": ("benchmarks.bench_zoo", "run"),
    "llm": ("benchmarks.bench_llm", "run"),
    "quant": ("benchmarks.bench_quant", "run"),
    "backend": ("benchmarks.bench_backend", "run"),
}


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("names", nargs="+", choices=sorted(BENCHMARKS))
    parser.add_argument("--out", default="results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smallest cases only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    failed = 0
    for name in args.names:
        start = time.perf_counter()
        try:
            module, function = BENCHMARKS[name]
            rows = getattr(importlib.import_module(module), function)(device, quick=args.quick)
        except Exception as exc:  # report and go on with the next benchmark
            failed += 1
            print(f"benchmark {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            import traceback

            traceback.print_exc()
            continue
        record = {"benchmark": name, "environment": environment(device), "seconds": round(time.perf_counter() - start, 1), "rows": rows}
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(record, f, indent=2)
        text = f"## {name} ({record['environment'].get('gpu', device)}, torch {torch.__version__})\n\n{table(rows)}\n"
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write(text)
        print(text, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
