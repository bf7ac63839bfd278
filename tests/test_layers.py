"""Single layers against transformers' own modules, bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from pipeserve.layers.norm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_rms_norm_is_bit_identical_to_hf(dtype: torch.dtype, rows: int) -> None:
    torch.manual_seed(rows)
    ours, hf = RMSNorm(576, 1e-5, dtype), LlamaRMSNorm(576, eps=1e-5).to(dtype)
    weight = torch.randn(576).to(dtype)
    ours.weight.data.copy_(weight)
    hf.weight.data.copy_(weight)
    x = (torch.randn(rows, 576) * 3).to(dtype)
    assert torch.equal(ours(x), hf(x))
