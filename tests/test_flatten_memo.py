"""The wrapper's flattening of a call with a transformers cache object (core/flatten_memo.py): always what
pytree.tree_flatten gives (the same leaf objects, an equal spec), with the cache's flattening reused while
nothing it reads changed, and made anew when anything did."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

transformers = pytest.importorskip("transformers")

import torchtrt_ext  # noqa: E402
from torchtrt_ext.core import trees  # noqa: E402
from torchtrt_ext.core.flatten_memo import Flattener  # noqa: E402


class _Layer(transformers.cache_utils.StaticLayer):
    """A subclass a layer may be changed to (a class in the spec's context)."""


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    trees.register_model_types(model)
    return model


def _static_call(model, cache):
    ids = torch.randint(0, 256, (1, 1))
    return (), {"input_ids": ids, "past_key_values": cache, "cache_position": torch.tensor([5]), "use_cache": True}


def _assert_same(flattener, tree):
    flat, spec = flattener.flatten(tree)
    want_flat, want_spec = pytree.tree_flatten(tree)
    assert spec == want_spec
    assert len(flat) == len(want_flat) and all(a is b for a, b in zip(flat, want_flat))
    assert pytree.tree_unflatten(flat, spec) is not None


def _caches(model):
    static = transformers.StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 4)), past_key_values=static, use_cache=True)
        dynamic = model(input_ids=torch.randint(0, 256, (1, 4)), use_cache=True).past_key_values
    return {"static": static, "dynamic": dynamic,
            "encoder_decoder": transformers.EncoderDecoderCache(dynamic, transformers.DynamicCache())}


@pytest.mark.parametrize("kind", ["static", "dynamic", "encoder_decoder"])
def test_flattening_equals_pytrees_and_is_reused_until_the_cache_changes(kind):
    model = _llama()
    cache = _caches(model)[kind]
    tree = _static_call(model, cache)
    f = Flattener()
    _assert_same(f, tree)
    assert f.misses == 1
    for _ in range(3):  # the same object, unchanged: reused
        _assert_same(f, tree)
    assert f.misses == 1
    layers = cache.self_attention_cache.layers if kind == "encoder_decoder" else cache.layers
    layer = layers[1]
    # a tensor attribute replaced by another tensor
    layer.keys = layer.keys.clone()
    _assert_same(f, tree)
    assert f.misses == 2
    _assert_same(f, tree)
    assert f.misses == 2
    # a scalar attribute changed (in the spec's context), a new attribute, a layer removed
    layer.extra_setting = 3
    _assert_same(f, tree)
    layer.extra_setting = 4
    _assert_same(f, tree)
    assert f.misses == 4
    layers.append(layers[0])
    _assert_same(f, tree)
    del layers[-1]
    _assert_same(f, tree)
    assert f.misses == 6
    # another cache object
    _assert_same(f, _static_call(model, _caches(model)[kind]))
    assert f.misses == 7


def test_calls_without_a_cache_are_plain_pytree_flattening():
    f = Flattener()
    tree = ((torch.randn(2), [torch.randn(3)]), {"x": {"y": torch.randn(1)}, "n": 3})
    _assert_same(f, tree)
    assert f.misses == 0


def test_a_forgotten_cache_is_not_kept_alive():
    import gc
    import weakref

    model = _llama()
    cache = _caches(model)["static"]
    f = Flattener()
    f.flatten(_static_call(model, cache))
    keys = weakref.ref(cache.layers[0].keys)
    del cache
    gc.collect()
    assert keys() is None


def test_a_wrapper_decode_loop_reuses_the_caches_flattening():
    model = _llama()
    compiled = torchtrt_ext.compile(model)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        want = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, cache_implementation="static")
        got = compiled.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(got, want)
    misses = compiled.flattener.misses
    assert 1 <= misses <= 2, misses  # the prefill's new cache (and its first decode step, if prefill set it up)


def test_a_changed_class_and_several_caches_at_once():
    model = _llama()
    caches = [_caches(model)["static"] for _ in range(3)]
    f = Flattener()
    trees_ = [_static_call(model, c) for c in caches]
    for t in trees_:
        _assert_same(f, t)
    for t in trees_ * 2:  # threads decoding with their own caches take turns: each remembered
        _assert_same(f, t)
    assert f.misses == 3

    caches[0].layers[0].__class__ = _Layer  # in the spec's context: flattened anew
    _assert_same(f, trees_[0])
    assert f.misses == 4
