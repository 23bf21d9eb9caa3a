"""Where a decode step's time goes (issue 15): the 1.1B Llama-style model, fp16, static cache, the
backend with cuda_graphs; times forward alone on a decode-shaped call and cProfiles generate().

    python scripts/profile_decode.py [route]     # route: backend (default) or wrapper
"""

import cProfile
import pstats
import sys
import time

import torch

import torchtrt_ext
from benchmarks.bench_llm import _lm, _prompts
from benchmarks.models import LLAMA_CONFIG

route = sys.argv[1] if len(sys.argv) > 1 else "backend"
device = torch.device("cuda")
model = _lm(LLAMA_CONFIG, torch.float16, device)
ids, mask = _prompts(1, 512, model.config.vocab_size, device)
if route == "backend":
    model.forward = torch.compile(model.forward, backend="torchtrt_ext", options={"cuda_graphs": True})
    gen, extra = model.generate, {"disable_compile": True}
else:
    compiled = torchtrt_ext.compile(model, cuda_graphs=True)
    gen, extra = compiled.generate, {}


def run(n):
    return gen(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
               cache_implementation="static", **extra)


with torch.no_grad():
    run(4)
    for n in (1, 33):
        torch.cuda.synchronize(); t = time.perf_counter(); run(n); torch.cuda.synchronize()
        print(f"generate {n} new: {(time.perf_counter() - t) * 1e3:.2f} ms")
    prof = cProfile.Profile()
    torch.cuda.synchronize(); prof.enable(); run(33); torch.cuda.synchronize(); prof.disable()
    st = pstats.Stats(prof); st.sort_stats("tottime").print_stats(25)
    # The GPU's side of the same steps: kernels per step, their time, and the host's launch calls.
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        run(17)
        torch.cuda.synchronize()
    events = p.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"{len(kernels)} GPU events over 17 new tokens (prefill included); GPU busy "
          f"{sum(e.device_time for e in kernels) / 1e3:.2f} ms")
