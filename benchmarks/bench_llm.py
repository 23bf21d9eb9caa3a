"""LLM inference through generate() (issue 15): prefill, decode per token and compiles, on compiled
engines with a static KV cache, against eager generate() and torch.compile in the same run, beside the
floors measured in the same run.

    python -m benchmarks llm --out DIR [--quick]          # LLM_PARTS=tokens,resident,streamed,lora
                                                          # LLM_VARIANTS=backend,wrapper (resident routes)

Parts (one table, a "part" column; each part builds its own model, random weights, nothing downloaded):
* tokens: greedy tokens of both entry points against eager generate(), 64 new tokens, batch 1 and
  batch 4 with prompts of four lengths (left-padded). fp32, so that a mismatch means a defect, not an
  argmax between two logits a rounding apart. compiles_after_first_step: graphs compiled (backend,
  dynamo's count) or variants added (wrapper) after the first decode step, over a whole second call.
* resident: the 1.1B Llama-style model (hidden 2048, 22 layers) in fp16, batch 1, a 512-token prompt,
  64 new tokens. decode_ms_per_token = (time for 64 new tokens - time for 1) / 63; prefill_ms = the
  time for 1 new token. Variants: eager; torch.compile as transformers runs it for a static cache
  (its auto-compile of __call__, mode reduce-overhead), or, where that fails, the failure's first line
  and torch.compile of forward in its default mode; ours: the backend (forward compiled with
  cuda_graphs=True) and the wrapper (cuda_graphs=True). hbm_floor_ms = weight bytes / the read
  bandwidth measured here (a sum over 4 GiB).
* streamed: a 7.2B Llama-style model (Mistral-7B's shape) in bf16, kept in host memory, the wrapper
  with weight_streaming=True at a 25% device budget, batch 1, a 128-token prompt, 16 new tokens;
  copy_floor_ms = bytes streamed per step / pinned host-to-device bandwidth measured here; peers:
  accelerate's cpu_offload generate() (4 new tokens: about a second each) and the resident engine's
  tokens (the model moved to the GPU afterwards).

* lora: LoRA adapters A and B (peft, q_proj and v_proj, merged) swapped by refit (refit_double_buffer)
  while another thread generates on its own stream, fp32: every sequence must equal eager's for A or
  for B; the swap's time with nothing generating, against the changed bytes' device copy time.

The backend route passes disable_compile=True to generate(): transformers' own compile of __call__
would wrap the already compiled forward a second time (the wrapper's generate() does this itself).
Quick mode (and the CPU): tiny configs, fewer tokens, no floors or peers that need a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import threading
import time
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters

import torchtrt_ext

from .bench_zoo import first_line
from .models import LLAMA_CONFIG
from .parts import run_parts
from .timing import sync

MISTRAL_SHAPE = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=32000, max_position_embeddings=4096)
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=256, max_position_embeddings=256)


def _lm(shape: dict, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A Llama-style causal LM with random weights, built on the meta device and filled in place
    (a 7B model's default initialisation takes minutes on the host)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in its dtype: a 7B model in float32 first would take 29 GB
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    with torch.device(device):  # its inv_freq buffer, left empty by to_empty
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model.generation_config.pad_token_id = 0
    return model.eval()


def _prompts(batch: int, length: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row i is length - 3*i tokens long (batch > 1), with its attention mask."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, : 3 * row] = 0
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def _generate(fn: Callable[..., torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, new: int, **extra: Any) -> torch.Tensor:
    return fn(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
              cache_implementation="static", **extra)


def _timed(call: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of call() (synchronized)."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


class _Routes:
    """The ways generate() runs: eager, torch.compile peers, and both entry points of ours. Each
    returns a generate function; forward is restored (the instance attribute removed) by reset()."""

    def __init__(self, model: torch.nn.Module, cuda_graphs: bool):
        self.model, self.cuda_graphs = model, cuda_graphs

    def reset(self) -> None:
        self.model.__dict__.pop("forward", None)
        self.model.__dict__.pop("_compiled_call", None)
        torch._dynamo.reset()
        counters.clear()

    def eager(self) -> Callable:
        self.reset()
        return lambda *a, **k: self.model.generate(*a, disable_compile=True, **k)

    def transformers_compile(self) -> Callable:
        self.reset()
        return self.model.generate  # on the GPU, a static cache makes generate() compile __call__ itself

    def compile_default(self) -> Callable:
        self.reset()
        self.model.forward = torch.compile(self.model.forward)
        return lambda *a, **k: self.model.generate(*a, disable_compile=True, **k)

    def backend(self) -> Callable:
        self.reset()
        options = {"cuda_graphs": True} if self.cuda_graphs else None
        self.model.forward = torch.compile(self.model.forward, backend="torchtrt_ext", options=options)
        return lambda *a, **k: self.model.generate(*a, disable_compile=True, **k)

    def wrapper(self, **options: Any) -> Callable:
        self.reset()
        compiled = torchtrt_ext.compile(self.model, cuda_graphs=self.cuda_graphs, **options)
        self.compiled = compiled
        return compiled.generate

    def compiles(self, route: str) -> int:
        if route == "wrapper":
            return len(self.compiled.variants)
        return counters["stats"]["unique_graphs"]


def _tokens_part(device: torch.device, quick: bool) -> list[dict]:
    model = _lm(TINY_SHAPE if quick else LLAMA_CONFIG, torch.float32, device)
    routes = _Routes(model, cuda_graphs=device.type == "cuda")
    new = 8 if quick else 64
    rows = []
    with torch.no_grad():
        for batch in (1, 4):
            ids, mask = _prompts(batch, 16 if quick else 32, model.config.vocab_size, device)
            expected = _generate(routes.eager(), ids, mask, new).tolist()
            for route in ("backend", "wrapper"):
                generate = getattr(routes, route)()
                _generate(generate, ids, mask, 2)  # prefill and the first decode step
                after_first_step = routes.compiles(route)
                got = _generate(generate, ids, mask, new).tolist()
                mismatch = next((i for i in range(len(got[0])) if any(g[i] != e[i] for g, e in zip(got, expected))), None)
                rows.append({"part": "tokens", "variant": f"ours: {route}", "batch": batch, "new_tokens": new,
                             "tokens_equal": got == expected, "first_mismatch": mismatch,
                             "compiles_after_first_step": routes.compiles(route) - after_first_step})
                print(rows[-1], flush=True)
    routes.reset()
    return rows


def _read_bandwidth(device: torch.device) -> float:
    """Bytes per second that a sum over 4 GiB reads (the HBM floor's bandwidth)."""
    data = torch.ones(2**31, dtype=torch.float16, device=device)
    data.sum()
    seconds = _timed(lambda: data.sum(), device, 7)
    return data.numel() * data.element_size() / seconds


def _resident_part(device: torch.device, quick: bool) -> list[dict]:
    model = _lm(TINY_SHAPE if quick else LLAMA_CONFIG, torch.float32 if quick else torch.float16, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_ms = weight_bytes / _read_bandwidth(device) * 1e3 if device.type == "cuda" else None
    routes = _Routes(model, cuda_graphs=device.type == "cuda")
    new, repeats = (8, 2) if quick else (64, 5)
    ids, mask = _prompts(1, 32 if quick else 512, model.config.vocab_size, device)
    variants = {"eager": "eager", "ours: backend": "backend", "ours: wrapper": "wrapper"}
    if device.type == "cuda":
        variants = {"eager": "eager", "torch.compile (transformers' auto-compile)": "transformers_compile",
                    "torch.compile (forward, default mode)": "compile_default", **variants}
    only = [v.strip() for v in os.environ.get("LLM_VARIANTS", "").split(",") if v.strip()]  # routes, eager kept
    if only:
        variants = {label: route for label, route in variants.items() if route == "eager" or route in only}
    rows, reference = [], None
    with torch.no_grad():
        for label, route in variants.items():
            row: dict[str, Any] = {"part": "resident", "variant": label, "weight_GB": round(weight_bytes / 1e9, 2)}
            try:
                generate = getattr(routes, route)()
                start = time.perf_counter()
                _generate(generate, ids, mask, 2)
                row["first_call_s"] = round(time.perf_counter() - start, 1)
                before = routes.compiles(route) if route in ("backend", "wrapper") else None
                tokens = _generate(generate, ids, mask, new).tolist()
                one = _timed(lambda: _generate(generate, ids, mask, 1), device, repeats)
                full = _timed(lambda: _generate(generate, ids, mask, new), device, repeats)
            except Exception as exc:  # a peer that fails is reported, and the others still run
                row["error"] = first_line(exc)
                rows.append(row)
                print(row, flush=True)
                continue
            decode_ms = (full - one) / (new - 1) * 1e3
            reference = reference or tokens
            row.update({"prefill_ms": round(one * 1e3, 2), "decode_ms_per_token": round(decode_ms, 3),
                        "tokens_per_s": round(1e3 / decode_ms, 1), "hbm_floor_ms": floor_ms and round(floor_ms, 3),
                        "vs_hbm_floor": floor_ms and round(decode_ms / floor_ms, 2),
                        "tokens_equal_eager": tokens == reference})
            if before is not None:
                row["compiles_after_first_step"] = routes.compiles(route) - before
            rows.append(row)
            print(row, flush=True)
    routes.reset()
    peers = [r["decode_ms_per_token"] for r in rows if r["variant"].startswith("torch.compile") and "decode_ms_per_token" in r]
    for row in rows:
        if peers and "decode_ms_per_token" in row:
            row["vs_best_torch_compile"] = round(row["decode_ms_per_token"] / min(peers), 2)
    return rows


def _pinned_bandwidth(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    seconds = _timed(lambda: dst.copy_(src, non_blocking=True), device, 5)
    return nbytes / seconds


def _streamed_part(device: torch.device, quick: bool) -> list[dict]:
    if device.type != "cuda":
        return []
    model = _lm(TINY_SHAPE if quick else MISTRAL_SHAPE, torch.bfloat16, torch.device("cpu"))  # kept on the host
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    new = 4 if quick else 16
    ids, mask = _prompts(1, 16 if quick else 128, model.config.vocab_size, device)
    rows = []
    with torch.no_grad():
        compiled = torchtrt_ext.compile(model, weight_streaming=True, weight_streaming_budget="25%")
        _generate(compiled.generate, ids, mask, 2)
        streamed = torchtrt_ext.weight_streaming(compiled)
        moved = weight_bytes - streamed.resident_bytes
        floor_ms = moved / _pinned_bandwidth(device, min(moved, 4 << 30)) * 1e3
        tokens = _generate(compiled.generate, ids, mask, new).tolist()
        one = _timed(lambda: _generate(compiled.generate, ids, mask, 1), device, 3)
        full = _timed(lambda: _generate(compiled.generate, ids, mask, new), device, 3)
        decode_ms = (full - one) / (new - 1) * 1e3
        row = {"part": "streamed", "variant": "ours: wrapper, weight_streaming 25%", "weight_GB": round(weight_bytes / 1e9, 2),
               "streamed_GB_per_step": round(moved / 1e9, 2), "prefill_ms": round(one * 1e3, 1),
               "decode_ms_per_token": round(decode_ms, 2), "copy_floor_ms": round(floor_ms, 2),
               "vs_copy_floor": round(decode_ms / floor_ms, 3)}
        del compiled, streamed
        torch.cuda.empty_cache()

        from accelerate import cpu_offload

        offloaded = cpu_offload(copy.deepcopy(model), execution_device=device)
        acc_new = 2 if quick else 4
        acc_one = _timed(lambda: _generate(offloaded.generate, ids, mask, 1, disable_compile=True), device, 1)
        acc_full = _timed(lambda: _generate(offloaded.generate, ids, mask, acc_new, disable_compile=True), device, 1)
        acc_ms = (acc_full - acc_one) / (acc_new - 1) * 1e3
        row.update({"accelerate_decode_ms_per_token": round(acc_ms, 1), "ours_faster_x": round(acc_ms / decode_ms, 1)})
        del offloaded

        resident = torchtrt_ext.compile(model.to(device))
        row["tokens_equal_resident"] = _generate(resident.generate, ids, mask, new).tolist() == tokens
        rows.append(row)
        print(row, flush=True)
    return rows


def _lora_part(device: torch.device, quick: bool) -> list[dict]:
    """Adapters A and B (peft LoRA on q_proj and v_proj, merged) swapped by refit while another thread
    generates on its own stream: every sequence must equal eager's for A or for B. fp32, so that equal
    tokens are a fair test. The swap's time is taken with nothing generating (a swap during a generate
    waits for it to end: a sequence sees one adapter) against its copy floor, the changed bytes at the
    device-to-device copy bandwidth measured here."""
    import peft

    base = _lm(TINY_SHAPE if quick else LLAMA_CONFIG, torch.float32, device)
    new, rounds = (6, 4) if quick else (32, 8)
    ids, mask = _prompts(1, 16 if quick else 128, base.config.vocab_size, device)
    changed, expected = {}, {}
    with torch.no_grad():
        for name, seed in (("A", 1), ("B", 2)):
            torch.manual_seed(seed)
            adapted = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
            for pname, p in adapted.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0.0, 0.05)  # peft starts B at zero: the adapter would change nothing
            merged = adapted.merge_and_unload().eval()
            changed[name] = {k: v.detach().clone() for k, v in merged.state_dict().items() if "q_proj" in k or "v_proj" in k}
            expected[name] = _generate(merged.generate, ids, mask, new, disable_compile=True).tolist()
            del adapted, merged
        compiled = torchtrt_ext.compile(base, cuda_graphs=device.type == "cuda", refit_double_buffer=True)
        _generate(compiled.generate, ids, mask, new)  # the static cache's length: as generated below
        for name in ("A", "B", "A", "B"):  # graphs captured over both buffers
            torchtrt_ext.refit(compiled, changed[name], strict=False)
            _generate(compiled.generate, ids, mask, new)
        quiet = []
        for name in ("A", "B") * 3:
            sync(device)
            report = torchtrt_ext.refit(compiled, changed[name], strict=False)
            sync(device)
            quiet.append(report.seconds)
        nbytes = sum(v.numel() * v.element_size() for v in changed["A"].values())
        src = torch.empty(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        floor_ms = _timed(lambda: dst.copy_(src), device, 5) * 1e3  # the same bytes, one device copy
        del src, dst
        sequences, waits = [], []
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None

        def generating() -> None:
            with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
                for _ in range(rounds):
                    sequences.append(_generate(compiled.generate, ids, mask, new).tolist())

        thread = threading.Thread(target=generating)
        thread.start()
        turn = 0
        while thread.is_alive():
            time.sleep(0.01)
            start = time.perf_counter()
            torchtrt_ext.refit(compiled, changed["AB"[turn % 2]], strict=False)
            waits.append(time.perf_counter() - start)
            turn += 1
        thread.join()
    tally = {name: sum(seq == expected[name] for seq in sequences) for name in ("A", "B")}
    swap_ms = statistics.median_high(quiet) * 1e3  # the upper middle of the six swaps
    row = {"part": "lora", "variant": "ours: wrapper, refit_double_buffer", "new_tokens": new,
           "sequences": len(sequences), "equal_A": tally["A"], "equal_B": tally["B"],
           "every_sequence_A_or_B": tally["A"] + tally["B"] == len(sequences), "adapters_differ": expected["A"] != expected["B"],
           "swaps_while_generating": turn, "swap_MB": round(nbytes / 1e6, 1),
           "swap_ms": round(swap_ms, 3), "copy_floor_ms": round(floor_ms, 3), "vs_copy_floor": round(swap_ms / floor_ms, 2),
           "longest_wait_ms": round(max(waits) * 1e3, 1) if waits else None}
    print(row, flush=True)
    return [row]


PARTS = {"tokens": _tokens_part, "resident": _resident_part, "streamed": _streamed_part, "lora": _lora_part}


def run(device: torch.device, quick: bool = False) -> list[dict]:
    return run_parts("LLM_PARTS", PARTS, device, quick)
