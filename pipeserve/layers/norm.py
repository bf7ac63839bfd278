"""RMSNorm computed as HF Llama does: in float32, scaled after casting back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * (x / rms(x)); the statistics are taken in float32 whatever the model dtype.

    `F.rms_norm` is one fused operator where HF's formula is seven (pow, sum, div, add, rsqrt, mul, mul):
    at one decode row the operators' fixed cost is the whole cost, and its result is bit-identical to the
    formula (tests/test_layers.py). In a float32 model the weight joins the fused call; in a narrower
    dtype the weight multiplies after the cast back, where HF applies it.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.shape = (hidden_size,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype)
