"""Models as users bring them: eager, torch.compile and both torchtrt_ext entry points, same inputs.

Eleven architectures from transformers and timm, built from configs with random weights (nothing is
downloaded): bert, distilbert, gpt2, llama, t5, bart, whisper, clip, vit, convnext, resnet50. Each is
called with keyword inputs as users call it (attention masks with padding, default use_cache), under
torch.no_grad(), in eval mode. Per model, in one process and on the same inputs, four variants:

* eager: the model itself;
* compile: ``torch.compile(model)`` (Inductor, default mode) -- the peer;
* backend: ``torch.compile(model, backend="torchtrt_ext")``;
* wrapper: ``torchtrt_ext.compile(model, example_kwargs=inputs)`` (default options; timm models
  take their image positionally: ``example_inputs=(x,)``). wrapper_path says whether it took the
  torch.export path (transformers' cache objects included) or fell back to dynamo.

What is measured, per model (one row):
* compile_s_*: wall time of the first call, synchronized (for the wrapper plus its compile() call).
  The variants compile in the order compile, backend, wrapper in one process, so the later ones may
  find kernels in Inductor's caches (in memory and on disk) that an earlier one built for the same
  graph: compile_s_compile is the coldest of the three;
* *_ms: median latency (call + synchronize) from benchmarks.timing.latency_ms, the variants
  interleaved; *_spread_pct: half the interquartile range relative to the median, in percent;
* backend_ratio / wrapper_ratio: latency over torch.compile's (below 1: faster than the peer), taken
  round by round (the variants' medians within one round of interleaved calls) and then the median
  over the 15 rounds, so that a change in the host's load between rounds moves it less;
* max_err_* / rel_err_*: max |out - eager| over all output tensors (a KV cache's tensors included)
  in float32, and that relative to max |eager| of the same tensor (the largest over tensors);
* errors: the first line of the exception of any variant that failed (the others still run).
A final row "geomean" gives the geometric means of the ratios over models where both succeeded.

Full mode (a GPU): real sizes in fp16 (llama in bf16), timm for convnext and resnet50. Quick mode
(and any CPU run): tiny configs in fp32, and transformers' ConvNext / ResNet where timm is missing
(the "source" column says which). Restrict the models with ``run(models=[...])`` or
``ZOO_MODELS=bert,gpt2``.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

import torchtrt_ext
from benchmarks.timing import latency_ms, sync

VARIANTS = ("compile", "backend", "wrapper")


def have_timm() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:
        return False
    return True


def _ids(vocab: int, batch: int, length: int, device) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), device=device)


def _mask(batch: int, length: int, device) -> torch.Tensor:
    """Ones, with padding zeros at the end of every second row (the last quarter of it)."""
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    mask[1::2, length - max(1, length // 4):] = 0
    return mask


def model_specs(tiny: bool, timm_ok: bool) -> dict[str, Callable[[], tuple]]:
    """name -> () -> (make the model, make its keyword inputs (device, dtype), source, dtype or None).

    A dtype of None means the run's dtype (fp16 full, fp32 tiny)."""
    import transformers as tf

    T = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    B, L, S, IMG = (2, 16, 8, 32) if tiny else (None, None, None, 224)  # batch, enc len, dec len, image

    def text(vocab, b, n, mask=True):
        return lambda d, dt: {"input_ids": _ids(vocab, b, n, d), **({"attention_mask": _mask(b, n, d)} if mask else {})}

    def pixels(b, size=IMG):
        return lambda d, dt: {"pixel_values": torch.randn(b, 3, size, size, device=d, dtype=dt)}

    def seq2seq(vocab, b, n, m):
        return lambda d, dt: {**text(vocab, b, n)(d, dt), "decoder_input_ids": _ids(vocab, b, m, d)}

    def bert():
        cfg = tf.BertConfig(vocab_size=99, **T) if tiny else tf.BertConfig()
        return (lambda: tf.BertModel(cfg)), text(cfg.vocab_size, B or 8, L or 128), "hf", None

    def distilbert():
        cfg = tf.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=64) if tiny else tf.DistilBertConfig()
        return (lambda: tf.DistilBertModel(cfg)), text(cfg.vocab_size, B or 8, L or 128), "hf", None

    def gpt2():
        cfg = tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2) if tiny else tf.GPT2Config()
        return (lambda: tf.GPT2LMHeadModel(cfg)), text(cfg.vocab_size, B or 1, L or 128, mask=False), "hf", None

    def llama():
        if tiny:
            cfg = tf.LlamaConfig(vocab_size=99, num_key_value_heads=1, **T)
        else:
            cfg = tf.LlamaConfig(hidden_size=2048, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4,
                                 intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)
        return (lambda: tf.LlamaForCausalLM(cfg)), text(cfg.vocab_size, B or 1, L or 512, mask=False), "hf", torch.bfloat16

    def t5():
        cfg = tf.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2) if tiny else tf.T5Config()
        return (lambda: tf.T5ForConditionalGeneration(cfg)), seq2seq(cfg.vocab_size, B or 4, L or 96, S or 32), "hf", None

    def bart():
        if tiny:
            size = dict(vocab_size=99, d_model=32, layers=2, heads=2, ffn=64, max_position_embeddings=64)
        else:
            size = dict(vocab_size=50265, d_model=768, layers=6, heads=12, ffn=3072, max_position_embeddings=1024)
        layers, heads, ffn = size.pop("layers"), size.pop("heads"), size.pop("ffn")
        cfg = tf.BartConfig(**size, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                            decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn)
        return (lambda: tf.BartForConditionalGeneration(cfg)), seq2seq(cfg.vocab_size, B or 4, L or 96, S or 32), "hf", None

    def whisper():
        dim, layers, heads, ffn, mels, frames = (32, 2, 2, 64, 16, 32) if tiny else (512, 6, 8, 2048, 80, 3000)
        cfg = tf.WhisperConfig(d_model=dim, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                               decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                               num_mel_bins=mels, max_source_positions=frames // 2,
                               **(dict(vocab_size=99, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0) if tiny else {}))
        b, m = B or 4, S or 32

        def inputs(d, dt):
            return {"input_features": torch.randn(b, mels, frames, device=d, dtype=dt),
                    "decoder_input_ids": _ids(cfg.vocab_size, b, m, d)}

        return (lambda: tf.WhisperForConditionalGeneration(cfg)), inputs, "hf", None

    def clip():
        if tiny:
            cfg = tf.CLIPConfig(text_config=dict(vocab_size=99, **T), projection_dim=16,
                                vision_config=dict(**T, image_size=IMG, patch_size=8))
        else:
            cfg = tf.CLIPConfig()
        b, n = B or 8, L or 77
        return (lambda: tf.CLIPModel(cfg)), (lambda d, dt: {**text(cfg.text_config.vocab_size, b, n)(d, dt), **pixels(b)(d, dt)}), "hf", None

    def vit():
        cfg = tf.ViTConfig(**T, image_size=IMG, patch_size=8) if tiny else tf.ViTConfig()
        return (lambda: tf.ViTModel(cfg)), pixels(B or 8), "hf", None

    def vision(timm_name, timm_tiny, hf_model, hf_config, hf_tiny):
        def spec():
            if timm_ok:
                import timm

                kwargs = timm_tiny if tiny else {}
                b, size = B or 16, IMG  # timm models take the image positionally: their parameter 'x'
                return (lambda: timm.create_model(timm_name, pretrained=False, **kwargs)), (
                    lambda d, dt: {"x": torch.randn(b, 3, size, size, device=d, dtype=dt)}), "timm", None
            cfg = hf_config(**hf_tiny) if tiny else hf_config()
            return (lambda: hf_model(cfg)), pixels(B or 16), "hf (no timm)", None

        return spec

    stages = dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    return {
        "bert": bert, "distilbert": distilbert, "gpt2": gpt2, "llama": llama, "t5": t5, "bart": bart,
        "whisper": whisper, "clip": clip, "vit": vit,
        "convnext": vision("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
                           tf.ConvNextModel, tf.ConvNextConfig, stages),
        "resnet50": vision("resnet50", dict(layers=(1, 1, 1, 1)), tf.ResNetModel, tf.ResNetConfig,
                           dict(stages, embedding_size=8)),
    }


def tensors(output: Any) -> list[torch.Tensor]:
    """The output's tensors in order: ModelOutput via to_tuple(), tuples, lists, dicts, transformers
    cache objects (their key/value tensors, through their attributes); other objects through pytree
    if registered there, else ignored."""
    if isinstance(output, torch.Tensor):
        return [output]
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    elif type(output).__module__.startswith("transformers.cache_utils"):
        output = list(vars(output).values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in tensors(item)]
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _errors(out: Any, ref: Any) -> tuple[float, float]:
    """(max abs error, max relative error) over the output tensors, in float32."""
    got, want = tensors(out), tensors(ref)
    if len(got) != len(want) or not want:
        raise ValueError(f"output has {len(got)} tensors, eager {len(want)}")
    abs_err = rel_err = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise ValueError(f"output shape {tuple(g.shape)}, eager {tuple(w.shape)}")
        g, w = g.float(), w.float()
        same = (g == w) | (g.isnan() & w.isnan())  # equal infinities and NaN in both count as equal
        diff = torch.where(same, torch.zeros_like(g), (g - w).abs())
        err = diff.max().item() if diff.numel() else 0.0
        finite = w[w.isfinite()]
        scale = finite.abs().max().item() if finite.numel() else 0.0
        abs_err = max(abs_err, err) if not math.isnan(err) else math.nan
        rel_err = max(rel_err, err / scale if scale else (0.0 if err == 0 else math.inf)) if not math.isnan(err) else math.nan
    return abs_err, rel_err


def first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text if len(text) <= 150 else text[:147] + "..."


def _ms(value: float) -> float:
    """Three significant digits."""
    return float(f"{value:.3g}")


def _e(value: float) -> float:
    return float(f"{value:.1e}")


def _shape(inputs: dict) -> str:
    return " + ".join("x".join(map(str, v.shape)) for k, v in inputs.items() if torch.is_tensor(v) and k != "attention_mask")


def _selected(models: list[str] | None, known: list[str]) -> list[str]:
    if models is None and os.environ.get("ZOO_MODELS"):
        models = [m.strip() for m in os.environ["ZOO_MODELS"].split(",") if m.strip()]
    if models is None:
        return known
    unknown = [m for m in models if m not in known]
    if unknown:
        raise ValueError(f"unknown zoo models {unknown}; known: {', '.join(known)}")
    return list(models)


def build_case(spec: Callable[[], tuple], device: torch.device, tiny: bool) -> tuple[torch.nn.Module, Callable, str, torch.dtype]:
    """A zoo model built from its spec (seeded, on the device, in its run dtype, eval mode): the model,
    its inputs' maker (device, dtype), its source and its dtype."""
    make_model, make_inputs, source, own_dtype = spec()
    dtype = torch.float32 if tiny else (own_dtype or torch.float16)
    torch.manual_seed(0)
    with torch.device(device):
        model = make_model()
    return model.to(device, dtype).eval(), make_inputs, source, dtype


def as_call(inputs: dict) -> tuple[tuple, dict]:
    """A zoo model's inputs as (args, kwargs): timm models take the image positionally."""
    return ((inputs["x"],), {}) if "x" in inputs else ((), inputs)


def _bench_model(name: str, spec: Callable[[], tuple], device: torch.device, tiny: bool, timing: dict) -> tuple[dict, dict]:
    """One model's row, and its unrounded latency ratios to torch.compile."""
    model, make_inputs, source, dtype = build_case(spec, device, tiny)
    inputs = make_inputs(device, dtype)
    args, kwargs = as_call(inputs)
    head = {"model": name, "source": source, "shape": _shape(inputs), "dtype": str(dtype).replace("torch.", "")}
    found: dict[str, Any] = {}
    errors: dict[str, str] = {}
    ref = model(*args, **kwargs)
    sync(device)
    builds = {
        "compile": lambda: torch.compile(model),
        "backend": lambda: torch.compile(model, backend="torchtrt_ext"),
        "wrapper": lambda: torchtrt_ext.compile(model, args or None, kwargs or None),
    }
    fns: dict[str, Callable] = {"eager": model}
    for variant, build in builds.items():
        try:
            start = time.perf_counter()
            fn = build()
            fn(*args, **kwargs)
            sync(device)
            found[f"compile_s_{variant}"] = round(time.perf_counter() - start, 1)
        except Exception as exc:  # recorded in the row; the other variants and models go on
            errors[variant] = first_line(exc)
            continue
        fns[variant] = fn
        if variant == "wrapper":
            found["wrapper_path"] = "dynamo" if fn.uses_dynamo else "export"
        try:
            abs_err, rel_err = _errors(fn(*args, **kwargs), ref)
            found[f"max_err_{variant}"], found[f"rel_err_{variant}"] = _e(abs_err), _e(rel_err)
        except Exception as exc:
            errors[variant] = first_line(exc)
    del ref
    times: dict[str, dict] = {}
    try:
        times = latency_ms({v: (lambda fn=fn: fn(*args, **kwargs)) for v, fn in fns.items()}, device, **timing)
    except Exception as exc:
        errors["timing"] = first_line(exc)
    ratios = {v: _paired_ratio(times[v], times["compile"]) for v in ("backend", "wrapper") if v in times and "compile" in times}
    row = dict(head)
    for variant in ("eager",) + VARIANTS:
        if variant in times:
            row[f"{variant}_ms"] = _ms(times[variant]["latency"])
    row.update({f"{v}_ratio": round(r, 2) for v, r in ratios.items()})
    for variant in ("eager",) + VARIANTS:
        if variant in times:
            row[f"{variant}_spread_pct"] = round(100 * times[variant]["latency_spread"], 1)
    for prefix in ("compile_s", "max_err", "rel_err"):
        row.update({f"{prefix}_{v}": found[f"{prefix}_{v}"] for v in VARIANTS if f"{prefix}_{v}" in found})
    if "wrapper_path" in found:
        row["wrapper_path"] = found["wrapper_path"]
    if errors:
        row["errors"] = "; ".join(f"{v}: {e}" for v, e in errors.items())
    return row, ratios


def _paired_ratio(ours: dict, peer: dict) -> float:
    """Latency over the peer's, round by round (each pair measured minutes apart at most, in the same
    host state), then the median over rounds: the host's load moves between rounds, and this ratio
    moves less with it than a ratio of two medians over the whole run."""
    return statistics.median(a / b for a, b in zip(ours["round_latency"], peer["round_latency"]))


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def run(device: torch.device, quick: bool = False, models: list[str] | None = None) -> list[dict]:
    tiny = quick or device.type != "cuda"
    specs = model_specs(tiny, have_timm())
    timing = dict(warmup=1, rounds=3, calls=3) if quick else dict(warmup=3, rounds=15, calls=5)
    rows: list[dict] = []
    both: list[dict] = []  # unrounded ratios of the models where backend and wrapper both ran
    for name in _selected(models, list(specs)):
        torch._dynamo.reset()
        start = time.perf_counter()
        try:
            with torch.no_grad():
                row, ratios = _bench_model(name, specs[name], device, tiny, timing)
        except Exception as exc:  # the model itself (build, eager call) failed
            row, ratios = {"model": name, "errors": f"eager: {first_line(exc)}"}, {}
        rows.append(row)
        if len(ratios) == 2:
            both.append(ratios)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        done = ", ".join(f"{v} {row[f'{v}_ms']} ms" for v in ("eager",) + VARIANTS if f"{v}_ms" in row)
        failed = f" [errors: {row['errors']}]" if "errors" in row else ""
        print(f"zoo: {name} {row.get('shape', '')} {row.get('dtype', '')}: {done}{failed} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    torch._dynamo.reset()
    if both:
        rows.append({"model": "geomean", "shape": f"{len(both)} models",
                     **{f"{v}_ratio": round(_geomean([r[v] for r in both]), 2) for v in ("backend", "wrapper")}})
    return rows
