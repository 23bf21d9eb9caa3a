"""Issue 14, D0 on the GPU with cuda_graphs=True: BART-base fp16 through both entry points (the half
with cuda_graphs=False is in test_dynamo_frames.py; two files, so that the CUDA suite runs them at once)."""

import pytest
import torch

from tests.test_dynamo_frames import check_bart_base_fp16_on_cuda


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bart_base_fp16_on_cuda_with_cuda_graphs():
    check_bart_base_fp16_on_cuda(cuda_graphs=True)
