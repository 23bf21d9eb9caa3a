"""Options: typed, validated, and every bad one is an error that names it."""

import importlib.util

import pytest
import torch

import torchtrt_ext
from torchtrt_ext import EngineUnavailableError, OptionError, Settings


def test_defaults():
    s = Settings()
    assert s.engine == "auto" and s.cuda_graphs is False and s.max_variants == 8


def test_unknown_option_is_named_with_suggestion_and_valid_list():
    with pytest.raises(OptionError) as e:
        Settings.from_options({"cuda_graph": True})
    msg = str(e.value)
    assert msg.startswith("unknown option 'cuda_graph'. Did you mean 'cuda_graphs'?")
    for name in torchtrt_ext.option_names():
        assert name in msg


@pytest.mark.parametrize(
    "options, message",
    [
        ({"cuda_graphs": "yes"}, "option 'cuda_graphs' must be a bool, got str 'yes'"),
        ({"cuda_graphs": 1}, "option 'cuda_graphs' must be a bool, got int 1"),
        ({"max_variants": True}, "option 'max_variants' must be an int, got bool True"),
        ({"max_variants": 2.0}, "option 'max_variants' must be an int, got float 2.0"),
        ({"max_variants": 0}, "option 'max_variants' must be at least 1, got 0"),
        ({"engine": "trt"}, "option 'engine' must be one of 'auto', 'builtin', 'tensorrt', got 'trt'"),
        ({"frontend": None}, "option 'frontend' must be a str, got NoneType None"),
    ],
)
def test_bad_values_name_the_option(options, message):
    with pytest.raises(OptionError) as e:
        Settings.from_options(options)
    assert str(e.value) == message


def test_options_must_be_a_mapping():
    with pytest.raises(OptionError, match="options must be a dict of option name to value, got list"):
        Settings.from_options([("engine", "builtin")])


def test_same_option_twice_is_an_error():
    with pytest.raises(OptionError, match="option 'engine' was given twice"):
        Settings.from_options({"engine": "builtin"}, engine="auto")


def test_wrapper_only_options_refused_by_backend():
    with pytest.raises(OptionError, match="option 'frontend' applies to torchtrt_ext.compile"):
        Settings.from_options({"frontend": "export"}, for_backend=True)


def test_replace_validates():
    s = Settings(engine="builtin")
    assert s.replace(cuda_graphs=True).cuda_graphs is True
    with pytest.raises(OptionError, match="unknown option 'nope'"):
        s.replace(nope=1)
    with pytest.raises(OptionError, match="must be a bool"):
        s.replace(cuda_graphs="no")


def test_describe_options_lists_every_option():
    text = torchtrt_ext.describe_options()
    for name in torchtrt_ext.option_names():
        assert f"{name} (" in text


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None, reason="torch_tensorrt is installed")
def test_tensorrt_engine_without_torch_tensorrt_is_a_clear_error():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(EngineUnavailableError) as e:
        torchtrt_ext.compile(model, (torch.randn(2, 4),), engine="tensorrt")
    msg = str(e.value)
    assert msg.startswith("engine='tensorrt' cannot be used: torch_tensorrt does not import (ModuleNotFoundError")
    assert "use engine='builtin'" in msg


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None, reason="torch_tensorrt is installed")
def test_auto_picks_builtin_and_says_so(caplog):
    import torchtrt_ext.engines as engines

    assert engines.resolve_kind(Settings()) == "builtin"
    assert engines.auto_choice().startswith("torchtrt_ext: engine='auto' picked 'builtin' (torch_tensorrt does not import")
