"""The engine cache key covers the code the compiled graph came from: a module-level helper that
forward calls is part of it, so changing the helper is a miss, never a stale engine."""

from __future__ import annotations

import types

import torch

import torchtrt_ext
from torchtrt_ext.operations import engine_cache

_MODEL = '''
import torch

SCALE = {scale}

def helper(x):
    return torch.relu(x) * SCALE + {shift}

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return helper(self.fc(x))
'''


def _model_module(scale: float, shift: float) -> types.ModuleType:
    module = types.ModuleType("user_model")
    exec(compile(_MODEL.format(scale=scale, shift=shift), "user_model.py", "exec"), module.__dict__)
    return module


def test_the_key_follows_a_module_level_helper():
    same, changed = _model_module(2.0, 0.5), _model_module(2.0, 0.75)
    again = _model_module(2.0, 0.5)
    assert engine_cache.code_digest([same.Model]) == engine_cache.code_digest([again.Model])
    assert engine_cache.code_digest([same.Model]) != engine_cache.code_digest([changed.Model])


def test_a_changed_helper_misses_the_cache_and_computes_the_new_function(tmp_path):
    cache = str(tmp_path / "engines")
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    first = _model_module(2.0, 0.5).Model().eval()
    state = first.state_dict()
    compiled = torchtrt_ext.compile(first, (x,), cache_dir=cache)
    assert not compiled.variants[0].from_cache
    changed = _model_module(2.0, 0.75).Model().eval()
    changed.load_state_dict(state)
    again = torchtrt_ext.compile(changed, (x,), cache_dir=cache)
    assert not again.variants[0].from_cache  # the helper changed: a miss
    with torch.no_grad():
        torch.testing.assert_close(again(x), changed(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(again(x), first(x))
    unchanged = _model_module(2.0, 0.5).Model().eval()
    unchanged.load_state_dict(state)
    assert torchtrt_ext.compile(unchanged, (x,), cache_dir=cache).variants[0].from_cache  # same code: a hit


def test_cache_dir_takes_a_path_and_expands_the_home_folder(tmp_path, monkeypatch):
    import pathlib

    monkeypatch.setenv("HOME", str(tmp_path))
    settings = torchtrt_ext.Settings(cache_dir="~/.cache/torchtrt_ext")
    assert settings.cache_dir == str(tmp_path / ".cache" / "torchtrt_ext")
    assert torchtrt_ext.Settings(cache_dir=pathlib.Path(tmp_path) / "c").cache_dir == str(tmp_path / "c")
