"""Linear layers, tensor-parallel where asked, whose parameters load their own slice of a checkpoint tensor.

Each parameter carries a `weight_loader(param, loaded, shard_id)`; the model's loader only maps checkpoint
names to (parameter, shard) and calls it, and the layer cuts out the rows or columns its TP rank owns.
Fused projections (QKV, gate/up) are one matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeserve.distributed.parallel_state import TPGroup

NO_TP = TPGroup()


def _empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
    """Copy a whole tensor (cast to the parameter's dtype), with a shape check that names both shapes.

    `loaded` may be a lazy checkpoint tensor (see loader.safetensors_loader.LazyTensor): read it now."""
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, parameter expects {tuple(param.shape)}")
    param.data.copy_(loaded.materialize() if hasattr(loaded, "materialize") else loaded)


class Linear(nn.Module):
    """y = x W^T (+ b), replicated on every TP rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty_param(out_features, in_features, dtype=dtype)
        self.weight.weight_loader = default_weight_loader
        self.bias = _empty_param(out_features, dtype=dtype) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(Linear):
    """Several projections of one input, stacked; each TP rank holds a slice of every projection's rows.

    `row_ranges[i]` is the (start, size) of the rows of checkpoint shard i (q, k, v or gate, up) that this
    rank keeps; output i of `split` is `size` features wide. Replicated KV heads simply repeat a range.
    """

    def __init__(self, in_features: int, row_ranges: list[tuple[int, int]], bias: bool, dtype: torch.dtype):
        self.row_ranges = list(row_ranges)
        self.out_sizes = [size for _, size in row_ranges]
        super().__init__(in_features, sum(self.out_sizes), bias, dtype)
        self.weight.weight_loader = self._load_shard
        if self.bias is not None:
            self.bias.weight_loader = self._load_shard

    @staticmethod
    def even(in_features: int, out_sizes: list[int], bias: bool, dtype: torch.dtype,
             tp: TPGroup = NO_TP) -> ColumnParallelLinear:
        """Every projection split into equal row slices across the TP group."""
        return ColumnParallelLinear(in_features, [tp.shard(n) for n in out_sizes], bias, dtype)

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
        shard_id = shard_id or 0
        start, size = self.row_ranges[shard_id]
        offset = sum(self.out_sizes[:shard_id])
        default_weight_loader(param.data[offset : offset + size], loaded[start : start + size])

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(self.out_sizes, dim=-1)


class RowParallelLinear(nn.Module):
    """Input features split across TP ranks; partial products are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, tp: TPGroup = NO_TP,
                 in_range: tuple[int, int] | None = None):
        super().__init__()
        self.tp = tp
        # (start, size) of the input features this rank owns: an equal share unless given (uneven head splits).
        self.in_start, in_local = in_range or tp.shard(in_features)
        self.weight = _empty_param(out_features, in_local, dtype=dtype)
        self.weight.weight_loader = self._load_weight
        self.bias = _empty_param(out_features, dtype=dtype) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = default_weight_loader

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        default_weight_loader(param, loaded[:, self.in_start : self.in_start + param.shape[1]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))  # (T, out): every rank's partial sum
        return y if self.bias is None else y + self.bias  # the bias once, after the sum
