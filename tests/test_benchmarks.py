"""The benchmark tools that run on any machine: the streaming plot from a results file, and the zoo benchmark in quick mode."""

import json
import math
import xml.etree.ElementTree as ElementTree

import pytest
import torch

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


@pytest.mark.zoo
def test_zoo_benchmark_quick_on_the_cpu_times_every_variant_and_matches_eager():

    pytest.importorskip("transformers")
    from benchmarks import bench_zoo

    rows = bench_zoo.run(torch.device("cpu"), quick=True, models=["bert"])
    by_model = {row["model"]: row for row in rows}
    assert set(by_model) == {"bert", "geomean"}
    bert = by_model["bert"]
    assert "errors" not in bert, bert["errors"]
    assert bert["dtype"] == "float32"
    for variant in ("eager", "compile", "backend", "wrapper"):
        assert bert[f"{variant}_ms"] > 0
    for variant in ("compile", "backend", "wrapper"):
        assert bert[f"compile_s_{variant}"] >= 0
        assert bert[f"max_err_{variant}"] < 1e-4 and bert[f"rel_err_{variant}"] < 1e-4
    for key in ("backend_ratio", "wrapper_ratio"):
        assert math.isfinite(bert[key]) and bert[key] > 0
        assert math.isfinite(by_model["geomean"][key]) and by_model["geomean"][key] > 0
