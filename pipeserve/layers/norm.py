"""RMSNorm computed as HF Llama does: in float32, scaled after casting back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeserve.layers.kernel_select import uses_kernels


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

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), the sum rounded to the model dtype first as HF's residual
        stream is; residual None means x alone. One Triton kernel where the kernels run."""
        if uses_kernels(x):
            from pipeserve.layers.fused import add_rms_norm

            return add_rms_norm(x, residual, self.weight, self.eps)
        residual = x if residual is None else x + residual
        return self(residual), residual
