"""Saving quantized compiles, the cases a review found broken (issue 16): a compile with convolutions
(their quantized weights are 4-D) saves, loads and fills the engine cache; a save right after the
model's weights changed in place writes the new weights' quantization, not a stale one."""

from __future__ import annotations

import pytest
import torch

import torchtrt_ext
from tests.test_quantize_layers import _convnet, _convnet_cache, _images, hand_reference
from tests.test_quantized_engine import PRECISIONS, _cache, _mlp, _mlp_batches, _mlp_input, reference


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_quantized_compile_with_convolutions_saves_loads_and_caches(precision, tmp_path):
    model = _convnet()
    cache = _convnet_cache(model)
    x = _images(9)
    compiled = torchtrt_ext.compile(model, (x,), precision=precision, calibration=cache, engine="builtin")
    torchtrt_ext.save(compiled, tmp_path / "conv.ttx")
    loaded = torchtrt_ext.load(tmp_path / "conv.ttx")
    for seed in (10, 11):
        xb = _images(seed)
        assert torch.equal(loaded(xb), compiled(xb))
    want = hand_reference(model, cache, precision, lambda m: m(x))
    torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # the engine cache: the first compile writes an entry, a second (another process's, in effect) hits it
    first = torchtrt_ext.compile(model, (x,), precision=precision, calibration=cache, engine="builtin", cache_dir=str(tmp_path / "c"))
    second = torchtrt_ext.compile(model, (x,), precision=precision, calibration=cache, engine="builtin", cache_dir=str(tmp_path / "c"))
    assert not first.variants[0].from_cache and second.variants[0].from_cache
    assert torch.equal(second(x), first(x))


@pytest.mark.parametrize("change", ["in place", "load_state_dict"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_save_after_the_weights_changed_writes_their_quantization(precision, change, tmp_path):
    model = _mlp()
    cache = _cache(model, _mlp_batches())
    x = _mlp_input()
    compiled = torchtrt_ext.compile(model, (x,), precision=precision, calibration=cache, engine="builtin")
    before = compiled(x)
    with torch.no_grad():
        if change == "in place":
            model.up.weight.mul_(0.5)
        else:
            model.load_state_dict(_mlp(seed=7).state_dict())
    torchtrt_ext.save(compiled, tmp_path / "q.ttx")  # no call in between
    loaded = torchtrt_ext.load(tmp_path / "q.ttx")
    want = reference(model, cache, precision, lambda m: m(x))
    assert torch.equal(loaded(x), want)
    assert torch.equal(compiled(x), want) and not torch.equal(want, before)
