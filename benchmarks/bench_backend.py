"""Host time per dynamo graph call: our backend against torch.compile's Inductor, same graphs.

A model that dynamo splits calls dozens of graphs per forward (BART in fp16 breaks at every encoder
layer, and dynamo calls the layer's one graph with each layer's weights): whatever the backend adds per
graph call adds up. Three cases, small enough that the host dominates:
- linear: one Linear + gelu on a 2x8 input (one graph, one weight set);
- stack: an embedding Linear, `layers` layers that break the graph at a data-dependent branch (one
  graph called per layer with that layer's six weights), and a head; stack16: the same with 16
  weights per layer;
- bart: a BartModel from a small BartConfig, random weights, fp16 (its encoder layers break the graph
  at an isfinite check), encoder ids 1x8 and decoder ids 1x4 on the CPU, 4x96 / 4x32 on CUDA.
Rounds interleave the two (A B A B ...); the ratio is taken round by round. `per_graph_us` is the
difference of the medians over the engine calls per forward (whole forwards: noisy on a busy host).
`overhead_us` is measured apart, in isolation: the graph calls of one forward replayed as recorded,
once through what the backend handed dynamo and once straight into the compiled code each ran (as
Inductor's path calls it), min over rounds, per graph call.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn
from torch._dynamo.eval_frame import innermost_fn

import torchtrt_ext
from benchmarks.timing import sync
from torchtrt_ext.frontends.backend import torchtrt_ext_backend


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.fc(x))


class _Breaking(nn.Module):
    def __init__(self, dim: int, extra: int = 0) -> None:
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), nn.LayerNorm(dim)
        self.extra = nn.ModuleList(nn.Linear(dim, dim) for _ in range(extra))  # more weights, as a BART layer has

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.extra:
            x = fc(x)
        y = x + self.fc2(torch.relu(self.fc1(self.norm(x))))
        if torch.isinf(y).any():  # data-dependent: a graph break
            y = y.clamp(-1e4, 1e4)
        return y


class _Stack(nn.Module):
    def __init__(self, dim: int = 16, layers: int = 6, extra: int = 0) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.layers = nn.ModuleList(_Breaking(dim, extra) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _bart(device: torch.device) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import transformers

    config = transformers.BartConfig(
        vocab_size=128, d_model=32, encoder_layers=6, decoder_layers=6, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
    )
    model = transformers.BartModel(config).to(device, torch.float16).eval()
    enc, dec = ((1, 8), (1, 4)) if device.type == "cpu" else ((4, 96), (4, 32))
    return model, {"input_ids": torch.randint(3, 128, enc, device=device), "decoder_input_ids": torch.randint(3, 128, dec, device=device)}


def _cases(device: torch.device, quick: bool):
    yield "linear", lambda: (_Linear().to(device).eval(), {"x": torch.randn(2, 8, device=device)})
    yield "stack", lambda: (_Stack().to(device).eval(), {"x": torch.randn(2, 16, device=device)})
    # 16 weights per layer, as a BART encoder layer has; the compute stays negligible
    yield "stack16", lambda: (_Stack(8, 6, 5).to(device).eval(), {"x": torch.randn(2, 8, device=device)})
    if not quick:
        yield "bart", lambda: _bart(device)


def _time(variants: dict[str, Callable[[], Any]], device: torch.device, calls: int, rounds: int) -> dict[str, list[float]]:
    """Per variant, per round: microseconds per call (calls back to back, then one synchronize)."""
    per_round: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        for _ in range(max(3, calls // 10)):
            fn()
    sync(device)
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            per_round[name].append((time.perf_counter() - start) / calls * 1e6)
    return per_round


def _overhead_us(model: nn.Module, inputs: dict, device: torch.device, rounds: int) -> float:
    """Per graph call: the backend's callable minus the compiled code it runs, the calls of one forward
    replayed in isolation (min over rounds)."""
    recording: list[tuple[Any, tuple]] = []

    def recorded(gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        graph = torchtrt_ext_backend(gm, example_inputs)
        return lambda *args: (recording.append((graph, args)), graph(*args))[1]

    compiled = torch.compile(copy.deepcopy(model), backend=recorded)
    compiled(**inputs)
    recording.clear()
    compiled(**inputs)
    calls = list(recording)
    # the compiled code (without a dynamo.disable wrapper, as dynamo's own wrapper calls Inductor's), all of dynamo's arguments
    direct = [(innermost_fn(graph.engine.compiled_call()[0]), args) for graph, args in calls]

    def ours() -> None:
        for graph, args in calls:
            graph(*args)

    def code() -> None:
        for fn, args in direct:
            fn(*args)

    times: dict[str, list[float]] = {"ours": [], "code": []}
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("code", code)):
            start = time.perf_counter()
            for _ in range(20):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / 20 / len(calls) * 1e6)
    return min(times["ours"]) - min(times["code"])


def run(device: torch.device, quick: bool = False) -> list[dict]:
    rows = []
    for name, make in _cases(device, quick):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, inputs = make()
        ours = torch.compile(model, backend="torchtrt_ext")
        inductor = torch.compile(copy.deepcopy(model))  # the same weights
        with torch.no_grad():
            expected = model(**inputs)
            start = time.perf_counter()
            got = ours(**inputs)
            compile_s = time.perf_counter() - start
            inductor(**inputs)
            expected = expected if isinstance(expected, torch.Tensor) else expected.last_hidden_state
            got = got if isinstance(got, torch.Tensor) else got.last_hidden_state
            error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
            engines = torchtrt_ext.engines_of(model)
            before = sum(e.calls for e in engines)
            ours(**inputs)
            graph_calls = sum(e.calls for e in engines) - before
            calls = 200 if name == "bart" else 2000
            overhead = _overhead_us(model, inputs, device, 10 if quick else 30)
            timed = _time({"inductor": lambda: inductor(**inputs), "ours": lambda: ours(**inputs)}, device, calls, 5 if quick else 15)
        med = {k: statistics.median(v) for k, v in timed.items()}
        ratio = statistics.median(o / i for o, i in zip(timed["ours"], timed["inductor"]))
        rows.append({
            "case": name,
            "engines": len(engines),
            "graph_calls": graph_calls,
            "inductor_us": round(med["inductor"], 1),
            "ours_us": round(med["ours"], 1),
            "ratio": round(ratio, 3),
            "per_graph_us": round((med["ours"] - med["inductor"]) / max(graph_calls, 1), 2),
            "overhead_us": round(overhead, 2),
            "rel_error": f"{error:.2e}",
            "ours_compile_s": round(compile_s, 2),
        })
    return rows
