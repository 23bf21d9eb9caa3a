"""Diagnostic (not committed): host time per call of the streamed Llama at 100%, old cuts vs new cuts."""
import cProfile, pstats, sys, time, torch
import torchtrt_ext
from torchtrt_ext import streaming
from benchmarks.models import LogitsOnly, llama

new_partition = streaming._partition

def old_partition(gm, weight_nodes, sizes, segments):
    share = max(1, sum(sizes) // max(1, segments))
    part, seen, current, used = {}, set(), 0, 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        new = [weight_nodes[a] for a in node.all_input_nodes if a in weight_nodes and weight_nodes[a] not in seen]
        if new and used >= share:
            current, used = current + 1, 0
        for w in dict.fromkeys(new):
            seen.add(w)
            used += sizes[w]
        part[node] = current
    return part

model = LogitsOnly(llama(torch.device("cpu"), torch.float16))
ids = torch.randint(0, 32000, (1, 128), device="cuda")
for name, fn in (("old", old_partition), ("new", new_partition)):
    streaming._partition = fn
    m = torchtrt_ext.compile(model, (ids,), weight_streaming=True, dynamic_batch=False)
    with torchtrt_ext.weight_streaming(m) as ws:
        ws.device_budget = "100%"
    for _ in range(5): m(ids)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(30): m(ids)
    host = (time.perf_counter() - t) / 30
    torch.cuda.synchronize()
    step = (time.perf_counter() - t) / 30
    prog = m.engines[0]._streamed
    outs = [len([a for a in s.args if a[0] == "v"]) for s in prog.segments]
    print(f"=== {name}: segments {len(prog.segments)} host {host*1e3:.2f} ms step {step*1e3:.2f} ms value-inputs per segment {outs}", flush=True)
    p = cProfile.Profile(); p.enable()
    for _ in range(20): m(ids)
    p.disable(); torch.cuda.synchronize()
    pstats.Stats(p).sort_stats("tottime").print_stats(22)
    del m
