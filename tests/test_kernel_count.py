"""kernels_per_step on CPU counts the operators a step calls, each once however many it calls inside."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeserve.bench.kernel_count import kernels_per_step


def test_counts_top_level_operators_per_step():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    assert kernels_per_step(lambda: (x + 1).softmax(-1) @ w, steps=3, device="cpu") == 3
    assert kernels_per_step(lambda: F.linear(x, w), steps=2, device="cpu") == 1  # aten::linear calls t + mm
