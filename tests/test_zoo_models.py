"""Models as users bring them (issue 14): architectures from transformers, built from tiny configs with
random weights, in eval mode, called with keyword arguments and attention masks. Each goes through
both entry points and must equal eager; through the wrapper, a refit to other weights, a
load_state_dict and a save/load round trip must equal eager too.

Decoders and seq2seq models are called with use_cache=False, which takes the export path (the one
save supports); their default use_cache=True output (a cache object) takes the dynamo path, checked
by the first part of the test."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import torchtrt_ext

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _ids(batch: int, length: int = 7) -> torch.Tensor:
    return torch.randint(1, 99, (batch, length))


def _mask(batch: int, length: int = 7) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0  # padding in the first sequence
    return mask


def _pixels(batch: int, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


# name -> (make a model, make its keyword inputs for a batch, whether it holds a cache output)
ZOO = {
    "bert": (lambda: transformers.BertModel(transformers.BertConfig(**TINY)),
             lambda b: {"input_ids": _ids(b), "attention_mask": _mask(b)}, False),
    "distilbert": (lambda: transformers.DistilBertModel(transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=64)),
                   lambda b: {"input_ids": _ids(b), "attention_mask": _mask(b)}, False),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2)),
             lambda b: {"input_ids": _ids(b), "attention_mask": _mask(b)}, True),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_key_value_heads=1)),
              lambda b: {"input_ids": _ids(b), "attention_mask": _mask(b)}, True),
    "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)),
           lambda b: {"input_ids": _ids(b), "attention_mask": _mask(b), "decoder_input_ids": _ids(b, 5)}, True),
    "bart": (lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
                 vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
             lambda b: {"input_ids": _ids(b), "attention_mask": _mask(b), "decoder_input_ids": _ids(b, 5)}, True),
    "whisper": (lambda: transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
                    vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                    max_source_positions=16, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0)),
                lambda b: {"input_features": torch.randn(b, 16, 32), "decoder_input_ids": _ids(b, 5)}, True),
    "clip": (lambda: transformers.CLIPModel(transformers.CLIPConfig(
                 text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                 vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8),
                 projection_dim=16)),
             lambda b: {"input_ids": _ids(b), "attention_mask": _mask(b), "pixel_values": _pixels(b)}, False),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)),
            lambda b: {"pixel_values": _pixels(b)}, False),
    "convnext": (lambda: transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])),
                 lambda b: {"pixel_values": _pixels(b)}, False),
    "resnet": (lambda: transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])),
               lambda b: {"pixel_values": _pixels(b)}, False),
}


def _tensors(output) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _assert_equal_outputs(got, expected):
    got, expected = _tensors(got), _tensors(expected)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def _build(name: str, seed: int):
    torch.manual_seed(seed)
    return ZOO[name][0]().eval()


@pytest.mark.zoo
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_through_both_entry_points_refit_state_dict_and_files(name, tmp_path):
    make_inputs = ZOO[name][1]
    model = _build(name, 0)
    torch.manual_seed(1)
    inputs = make_inputs(2)  # default settings: decoders return their cache objects
    expected = model(**inputs)
    _assert_equal_outputs(torch.compile(model, backend="torchtrt_ext")(**inputs), expected)
    torch._dynamo.reset()
    _assert_equal_outputs(torchtrt_ext.compile(model)(**inputs), expected)
    torch._dynamo.reset()

    compiled = torchtrt_ext.compile(model, example_kwargs=inputs)
    assert not compiled.uses_dynamo  # the export path, cache objects included (D1)
    _assert_equal_outputs(compiled(**inputs), model(**inputs))
    assert len(compiled.variants) == 1  # the call compiled for is not compiled again (T5 did, D10)
    other = _build(name, 5)
    torchtrt_ext.refit(compiled, other.state_dict())
    _assert_equal_outputs(compiled(**inputs), other(**inputs))
    third = _build(name, 6)
    compiled.load_state_dict(third.state_dict())
    _assert_equal_outputs(compiled(**inputs), third(**inputs))
    torchtrt_ext.save(compiled, tmp_path / "model.ttx")
    loaded = torchtrt_ext.load(tmp_path / "model.ttx")
    _assert_equal_outputs(loaded(**inputs), third(**inputs))
    assert len(compiled.variants) == len(loaded.variants) == 1
