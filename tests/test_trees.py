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


class OwnCache:
    """A model's own cache class outside transformers, as transformers' helper registers it (any
    class named *Cache in the model's module): its node is rebuilt by transformers' unflatten too."""


def test_a_node_of_a_cache_class_outside_transformers_is_checked_too(tmp_path):
    import json

    from transformers.exporters import exporter_dynamo

    exporter_dynamo.register_pytree_node(OwnCache)
    cache = OwnCache()
    cache.x = torch.zeros(1)
    doc = json.loads(pytree.treespec_dumps(pytree.tree_structure([cache])))
    marker = tmp_path / "ran"
    doc[1]["children_spec"][0]["context"] = json.dumps({"_t": "seq", "p": "os:system", "v": [f"touch {marker}"]})
    with pytest.raises(EngineFileError, match="names 'os:system' as a class to rebuild"):
        trees.loads(json.dumps(doc), "the out_spec")
    assert not marker.exists()


def test_a_dtype_tag_must_name_a_dtype():
    text, _ = _cache_spec_text()
    assert '\\"_t\\": \\"device\\"' in text
    bad = text.replace('{\\"_t\\": \\"device\\", \\"s\\": \\"cpu\\"}', '{\\"_t\\": \\"dtype\\", \\"n\\": \\"load\\"}', 1)
    assert bad != text
    with pytest.raises(EngineFileError, match="names 'load' as a torch dtype, which it is not"):
        trees.loads(bad, "the out_spec")
