"""Linear layers whose parameters know how to load their own slice of a checkpoint tensor.

Each parameter carries a `weight_loader(param, loaded, shard_id)`; the model's loader only maps checkpoint
names to (parameter, shard) and calls it. Fused projections (QKV, gate/up) are one matmul here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

WeightLoader = Callable[[nn.Parameter, torch.Tensor, "int | None"], None]


def _empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
    """Copy a whole tensor, with a shape check that names both shapes."""
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, parameter expects {tuple(param.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T (+ b)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty_param(out_features, in_features, dtype=dtype)
        self.weight.weight_loader = default_weight_loader
        self.bias = _empty_param(out_features, dtype=dtype) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked into one weight; shard i fills rows of output i."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, dtype: torch.dtype):
        super().__init__(in_features, sum(out_sizes), bias, dtype)
        self.out_sizes = list(out_sizes)
        self.weight.weight_loader = self._load_shard
        if self.bias is not None:
            self.bias.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
        assert shard_id is not None, "a merged projection is loaded one shard at a time"
        start = sum(self.out_sizes[:shard_id])
        default_weight_loader(param.data[start : start + self.out_sizes[shard_id]], loaded)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(self.out_sizes, dim=-1)
