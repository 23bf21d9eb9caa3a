"""generate() over compiled engines on the CPU, tiny configs: both routes with a static KV cache and
a left-padded batch (compiles counted: prefill and decode once each, none per token), and LoRA
adapters swapped by refit without a recompile."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import torchtrt_ext

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.zoo

GREEDY = dict(max_new_tokens=10, do_sample=False, cache_implementation="static")


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _prompts():
    """Three prompts of lengths 9, 5 and 7, left-padded, with their attention mask."""
    torch.manual_seed(1)
    ids = torch.randint(1, 128, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_backend_route_static_cache_left_padded_batch_compiles_prefill_and_decode_once():
    model = _llama()
    ids, mask = _prompts()
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **GREEDY)
        torch._dynamo.reset()
        counters.clear()
        model.forward = torch.compile(model.forward, backend="torchtrt_ext")
        first = model.generate(ids, attention_mask=mask, **GREEDY)
        graphs = counters["stats"]["unique_graphs"]
        second = model.generate(ids, attention_mask=mask, **GREEDY)
    assert first.tolist() == expected.tolist() and second.tolist() == expected.tolist()
    assert graphs == 2  # prefill and decode
    assert counters["stats"]["unique_graphs"] == graphs  # no compile in the second generate
    assert len(torchtrt_ext.engines_of(model)) >= 2


def test_wrapper_route_static_cache_left_padded_batch_compiles_prefill_and_decode_once():
    model = _llama()
    ids, mask = _prompts()
    expected = model.generate(ids, attention_mask=mask, **GREEDY)
    compiled = torchtrt_ext.compile(model)
    with torch.no_grad():
        first = compiled.generate(ids, attention_mask=mask, **GREEDY)
        variants = len(compiled.variants)
        calls = sum(e.calls for e in compiled.engines)
        second = compiled.generate(ids, attention_mask=mask, **GREEDY)
    assert first.tolist() == expected.tolist() and second.tolist() == expected.tolist()
    assert variants == 2 and len(compiled.variants) == 2  # prefill and decode, none per token
    assert calls >= GREEDY["max_new_tokens"]  # the prefill and every decode step ran on the engines
    assert not compiled.uses_dynamo


def _merged(base, seed: int):
    """The base model with a LoRA adapter (random, nonzero) merged into its weights, as peft does."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    adapted = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # peft starts B at zero: the adapter would change nothing
    return adapted.merge_and_unload().eval()


def test_lora_adapters_swapped_by_refit_generate_as_eager_with_no_recompile():
    base = _llama()
    ids, mask = _prompts()
    adapters = {seed: _merged(base, seed) for seed in (11, 12)}
    expected = {seed: m.generate(ids, attention_mask=mask, **GREEDY).tolist() for seed, m in adapters.items()}
    assert expected[11] != expected[12]  # the adapters change the tokens
    compiled = torchtrt_ext.compile(base)
    with torch.no_grad():
        compiled.generate(ids, attention_mask=mask, **GREEDY)
        variants = list(compiled.variants)
        for seed in (11, 12, 11):
            report = torchtrt_ext.refit(compiled, adapters[seed].state_dict())
            assert any("q_proj" in name for name in report.updated)
            assert compiled.generate(ids, attention_mask=mask, **GREEDY).tolist() == expected[seed]
    assert compiled.variants == variants  # refit, not a recompile


def _forced_compile_config():
    """transformers' auto-compile of the model's __call__, which it does for a static cache on the GPU,
    here on the CPU too."""
    config = transformers.CompileConfig()
    config._compile_all_devices = True
    return config


def test_wrapper_generate_under_transformers_own_compile_runs_the_engines():
    """generate() with a compile config compiles the model's __call__ (on the GPU it does so unasked):
    the wrapper's forward is never traced by that outer compile, so its engines still run each step."""
    model = _llama()
    ids, mask = _prompts()
    expected = model.generate(ids, attention_mask=mask, **GREEDY)
    compiled = torchtrt_ext.compile(model)
    torch._dynamo.reset()
    with torch.no_grad():
        got = compiled.generate(ids, attention_mask=mask, compile_config=_forced_compile_config(), **GREEDY)
    assert got.tolist() == expected.tolist()
    assert sum(e.calls for e in compiled.engines) >= GREEDY["max_new_tokens"]


def test_wrapper_generate_turns_transformers_auto_compile_off_and_other_generates_are_untouched(monkeypatch):
    """Around the engines transformers' auto-compile only adds dynamo's frame: the wrapper's generate()
    turns it off (disable_compile), unless the caller asks for a compile. A generate() that is not
    transformers' own gets its arguments as given."""
    model = _llama()
    ids, mask = _prompts()
    seen = []
    criteria = type(model)._valid_auto_compile_criteria

    def recording(self, model_kwargs, generation_config):
        seen.append(generation_config.disable_compile)
        return criteria(self, model_kwargs, generation_config)

    monkeypatch.setattr(type(model), "_valid_auto_compile_criteria", recording)
    compiled = torchtrt_ext.compile(model)
    with torch.no_grad():
        compiled.generate(ids, attention_mask=mask, **GREEDY)
        compiled.generate(ids, attention_mask=mask, disable_compile=False, **GREEDY)
    assert seen == [True, False]

    class OwnGenerate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

        def generate(self, x, steps):
            for _ in range(steps):
                x = self(x)
            return x

    own = OwnGenerate().eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(torchtrt_ext.compile(own).generate(x, steps=3), own.generate(x, steps=3))


def test_backend_route_under_transformers_own_compile_runs_the_engines():
    """The backend route (model.forward compiled with this backend) under transformers' auto-compile of
    __call__ (unasked on the GPU): the forward keeps its own backend, so the engines run each step."""
    model = _llama()
    ids, mask = _prompts()
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **GREEDY)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="torchtrt_ext")
        got = model.generate(ids, attention_mask=mask, compile_config=_forced_compile_config(), **GREEDY)
    assert got.tolist() == expected.tolist()
    assert sum(e.calls for e in torchtrt_ext.engines_of(model)) >= GREEDY["max_new_tokens"]


def test_each_decode_step_returns_the_cache_object_it_was_given_as_eager_does():
    """The model returns the static cache it was passed, written in place; through the wrapper too
    (not an object rebuilt from the cache's tensors at each step), so that the next step gets the
    same tensors at the same addresses (what a CUDA graph captured on them replays on)."""
    model = _llama()
    ids, mask = _prompts()
    compiled = torchtrt_ext.compile(model)
    forward, returned = compiled.forward, []

    def watching(*args, **kwargs):
        out = forward(*args, **kwargs)
        given = [v for v in kwargs.values() if isinstance(v, transformers.Cache)]
        back = [v for v in out.values() if isinstance(v, transformers.Cache)]
        returned.append(len(given) == len(back) == 1 and given[0] is back[0])
        return out

    compiled.forward = watching
    with torch.no_grad():
        got = compiled.generate(ids, attention_mask=mask, **GREEDY)
    assert got.tolist() == model.generate(ids, attention_mask=mask, **GREEDY).tolist()
    assert len(returned) == GREEDY["max_new_tokens"] and all(returned[1:])  # every decode step
