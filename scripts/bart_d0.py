"""Issue 14 D0's case, with its figures: BART-base (default config, random weights), fp16, input_ids
4x96, decoder_input_ids = input_ids[:, :32]; relative error of the logits against eager, for plain
torch.compile, the backend (with and without cuda_graphs) and the wrapper, and each engine's device."""

import torch

import torchtrt_ext
from transformers import BartConfig, BartForConditionalGeneration


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


torch.manual_seed(0)
model = BartForConditionalGeneration(BartConfig()).cuda().half().eval()
ids = torch.randint(3, model.config.vocab_size, (4, 96), device="cuda")
kwargs = dict(input_ids=ids, decoder_input_ids=ids[:, :32])
with torch.no_grad():
    ref = model(**kwargs).logits
    rows = [("torch.compile", rel(torch.compile(model)(**kwargs).logits, ref))]
    for graphs in (False, True):
        torch._dynamo.reset()
        out = torch.compile(model, backend="torchtrt_ext", options={"cuda_graphs": graphs})(**kwargs).logits
        rows.append((f"backend cuda_graphs={graphs}", rel(out, ref)))
        torch._dynamo.reset()
        out = torchtrt_ext.compile(model, cuda_graphs=graphs)(**kwargs).logits
        rows.append((f"wrapper cuda_graphs={graphs}", rel(out, ref)))
devices = sorted({str(e.device) for e in torchtrt_ext.engines_of(model)})
for name, err in rows:
    print(f"BART-base fp16 4x96: {name:28s} rel err {err:.3e}")
print("engine devices:", devices, "engines:", len(torchtrt_ext.engines_of(model)))
