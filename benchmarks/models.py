"""Benchmark models, built from configs with random weights (nothing is downloaded)."""

from __future__ import annotations

import torch

LLAMA_CONFIG = dict(
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=5632,
    vocab_size=32000,
    max_position_embeddings=2048,
)


def resnet50(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).to(device, dtype).eval()


def llama(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A 1.1B-parameter Llama-style decoder (TinyLlama's shape) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_CONFIG, use_cache=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def tiny_llama(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The same architecture at a tiny size (quick runs, the CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256, use_cache=False)
    return LlamaForCausalLM(config).to(device, dtype).eval()


class LogitsOnly(torch.nn.Module):
    """Calls a causal LM without a KV cache and returns the logits tensor."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.train(lm.training)  # the wrapper runs a model in training mode eagerly; keep the LM's mode

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits
