"""Reproduces a CUDA engine given a CPU input: must raise InputError (seen segfaulting on the H200)."""

import torch

from torchtrt_ext import InputError
from torchtrt_ext._runtime import Runner

runner = Runner("cuda:0", 2)
print("cuda input:", runner.run(lambda inputs, slot: slot, (torch.randn(2, device="cuda"),)), flush=True)
try:
    runner.run(lambda inputs, slot: slot, (torch.randn(2),))
except InputError as exc:
    print("raised InputError:", exc, flush=True)
