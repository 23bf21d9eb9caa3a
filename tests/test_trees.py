"""Tree specs read back from engine files and cache entries: transformers' cache objects round-trip,
and a spec naming any class outside transformers is refused before anything is imported or called."""

import sys

import pytest
import torch
import torch.utils._pytree as pytree

from torchtrt_ext.core import trees
from torchtrt_ext.core.errors import EngineFileError

transformers = pytest.importorskip("transformers")


def _cache_spec_text() -> tuple[str, object]:
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    ).eval()
    trees.register_model_types(model)
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 32, (1, 3)))
    return pytree.treespec_dumps(pytree.tree_structure(out)), out


def test_a_models_output_with_its_cache_round_trips():
    text, out = _cache_spec_text()
    spec = trees.loads(text, "the out_spec")
    assert spec == pytree.tree_structure(out)
    leaves = pytree.tree_leaves(out)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert type(rebuilt.past_key_values) is type(out.past_key_values)
    for a, b in zip(pytree.tree_leaves(rebuilt), leaves):
        assert a is b


@pytest.mark.parametrize(
    "path",
    [
        "os:system",  # another module
        "subprocess:Popen",
        "transformers.utils.import_utils:importlib.import_module",  # reached through transformers, not a class of it
        "transformers.cache_utils:torch.Tensor",  # a class, but not defined there
        "transformers.no_such_module:Thing",
        "transformers.cache_utils:DynamicLayer; import os",
    ],
)
def test_a_spec_naming_a_class_outside_transformers_is_refused(path):
    text, _ = _cache_spec_text()
    assert "transformers.cache_utils:DynamicLayer" in text
    bad = text.replace("transformers.cache_utils:DynamicLayer", path)
    imported = set(sys.modules)
    with pytest.raises(EngineFileError, match="only classes defined in transformers are rebuilt"):
        trees.loads(bad, "the out_spec")
    assert {m for m in set(sys.modules) - imported if not m.startswith("transformers")} == set()


def test_a_spec_with_an_unknown_context_tag_is_refused():
    text, _ = _cache_spec_text()
    bad = text.replace('\\"_t\\": \\"obj\\"', '\\"_t\\": \\"call\\"', 1)
    assert bad != text
    with pytest.raises(EngineFileError, match="unknown context tag 'call'"):
        trees.loads(bad, "the out_spec")


def test_text_that_is_no_spec_names_the_field():
    with pytest.raises(EngineFileError, match="the signature's in_spec 'not json' is not a tree spec"):
        trees.loads("not json", "the signature's in_spec")
