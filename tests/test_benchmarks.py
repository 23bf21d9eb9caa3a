"""The benchmark tools that run on any machine: the streaming plot from a results file."""

import json
import xml.etree.ElementTree as ElementTree

from benchmarks import plot_streaming


def test_streaming_plot_draws_every_budget_the_floor_and_the_peer(tmp_path):
    rows = []
    for shape, base in (("1x128", 5.0), ("8x512", 19.0)):
        for percent in (0, 25, 50, 75, 100):
            floor = max(base, 40.0 * (100 - percent) / 100)
            rows.append({"shape": shape, "budget": f"{percent}%", "step_ms": floor * 1.05, "floor_ms": floor})
        rows.append({"shape": shape, "budget": "0% (accelerate cpu_offload)", "step_ms": 390.0})
    rows.append({"shape": "(pinned H2D GB/s)", "step_ms": 54.6})
    source = tmp_path / "streaming.json"
    source.write_text(json.dumps({"environment": {"gpu": "test GPU"}, "rows": rows}))
    target = tmp_path / "streaming.svg"
    assert plot_streaming.main([str(source), str(target)]) == 0

    svg = ElementTree.parse(target).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    lines = svg.findall(f"{ns}polyline")
    assert len(lines) == 4  # ours and the floor, per shape
    assert all(len(line.get("points").split()) == 5 for line in lines)  # five budgets each
    assert len(svg.findall(f"{ns}circle")) == 10
    texts = [t.text for t in svg.iter(f"{ns}text")]
    assert "accelerate cpu_offload 1x128: 390 ms" in texts
    assert "weight streaming, test GPU" in texts
    # Lower step time sits lower on the page (larger y): the 100% point of each series is below its 0% point.
    for line in lines:
        points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
        assert points[0][0] < points[-1][0] and points[0][1] < points[-1][1]
