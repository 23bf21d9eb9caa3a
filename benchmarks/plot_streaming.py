"""Step time against device budget, with the floor, from the streaming benchmark's JSON: an SVG with
no plotting library (the CPU machines have none).

    python -m benchmarks.plot_streaming RESULTS.json OUT.svg
"""

from __future__ import annotations

import json
import math
import sys

W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 400, 70, 230, 40, 50
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def _series(rows: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in rows:
        budget = str(r.get("budget", ""))
        if not budget.endswith("%") or "floor_ms" not in r:
            continue
        name = r["shape"] + (", CUDA graphs" if r.get("cuda_graphs") else "")
        shape = out.setdefault(name, {"ours": [], "floor": []})
        x = float(budget.rstrip("%"))
        shape["ours"].append((x, r["step_ms"]))
        shape["floor"].append((x, r["floor_ms"]))
    return out


def render(rows: list[dict], title: str) -> str:
    series = _series(rows)
    values = [y for s in series.values() for pts in s.values() for _, y in pts]
    accelerate = {r["shape"]: r["step_ms"] for r in rows if "accelerate" in str(r.get("budget", ""))}
    values += list(accelerate.values())
    lo, hi = math.log10(min(values) * 0.8), math.log10(max(values) * 1.25)

    def px(x: float) -> float:
        return LEFT + x / 100 * (W - LEFT - RIGHT)

    def py(y: float) -> float:
        return TOP + (hi - math.log10(y)) / (hi - lo) * (H - TOP - BOTTOM)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2 - 60}" y="20" font-size="14">{title}</text>',
             f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="black"/>',
             f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="black"/>',
             f'<text x="{(W - RIGHT) / 2}" y="{H - 12}">device budget (% of weights resident)</text>',
             f'<text x="14" y="{TOP - 10}">step ms (log)</text>']
    for x in (0, 25, 50, 75, 100):
        parts.append(f'<text x="{px(x) - 10}" y="{H - BOTTOM + 16}">{x}%</text>')
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            y = m * 10**e
            if lo <= math.log10(y) <= hi:
                parts.append(f'<line x1="{LEFT - 4}" y1="{py(y):.1f}" x2="{W - RIGHT}" y2="{py(y):.1f}" stroke="#ddd"/>')
                parts.append(f'<text x="{LEFT - 40}" y="{py(y) + 4:.1f}">{y:g}</text>')
    legend_y = TOP + 10
    for i, (shape, s) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        for kind, dash in (("ours", ""), ("floor", ' stroke-dasharray="5,4"')):
            pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(s[kind]))
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
            parts.append(f'<line x1="{W - RIGHT + 10}" y1="{legend_y}" x2="{W - RIGHT + 35}" y2="{legend_y}" stroke="{colour}" stroke-width="2"{dash}/>')
            parts.append(f'<text x="{W - RIGHT + 40}" y="{legend_y + 4}">{shape} {kind}</text>')
            legend_y += 18
        for x, y in s["ours"]:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
        if shape in accelerate:
            y = accelerate[shape]
            parts.append(f'<rect x="{px(0) - 4}" y="{py(y) - 4:.1f}" width="8" height="8" fill="{colour}"/>')
            parts.append(f'<text x="{px(0) + 8}" y="{py(y) + 4:.1f}">accelerate cpu_offload {shape}: {y:g} ms</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    source, target = argv
    with open(source) as f:
        record = json.load(f)
    env = record.get("environment", {})
    with open(target, "w") as f:
        f.write(render(record["rows"], f"weight streaming, {env.get('gpu', '')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
