"""Linear layers, tensor-parallel where asked, whose parameters load their own slice of a checkpoint tensor.

Each parameter carries a `weight_loader(param, loaded, shard_id)`; the model's loader only maps checkpoint
names to (parameter, shard) and calls it, and the layer cuts out the rows or columns its TP rank owns.
Fused projections (QKV, gate/up) are one matmul.

Every matmul weight may also be quantized after loading (`QuantizableWeight`): a checkpoint's 4-bit
blocks arriving as `Int4Codes` are kept per shard so they can be held exactly, and `matmul` picks the
quantized kernel or the dense weight per call by the number of rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeserve.distributed.parallel_state import TPGroup
from pipeserve.layers.quantization import GROUP_SIZE, Int4Codes, QuantizedWeight

NO_TP = TPGroup()

# Rows up to which the quantized kernel beats the dense GEMM (measured on this repo's 2-core AVX2 machine,
# SmolLM2 shapes: int4/int8 win 1.3-4x at 1-4 rows and lose 2-3x at 32; see docs/benchmarks.md, "Token latency").
QUANT_MAX_ROWS = 4


def _empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
    """Copy a whole tensor (cast to the parameter's dtype), with a shape check that names both shapes.

    `loaded` may be a lazy checkpoint tensor (see loader.safetensors_loader.LazyTensor): read it now."""
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, parameter expects {tuple(param.shape)}")
    param.data.copy_(loaded.materialize() if hasattr(loaded, "materialize") else loaded)


class QuantizableWeight(nn.Module):
    """A module whose `weight` (N, K) may also be held quantized; `matmul(x)` is x @ W^T either way."""

    quantized: QuantizedWeight | None = None

    def defer_int4(self, shard_id: int | None, loaded: object, target: torch.Tensor) -> bool:
        """Keep a checkpoint's exact 4-bit codes for this shard instead of writing `target` now (True), or
        note that the shard has none (False: the caller loads it densely). A 4-bit weight is almost always
        kept 4-bit, and then its dense copy is rebuilt from the kernel's own values: writing it twice would
        cost a second dequantization at start-up. `fill_deferred_dense` writes it where it is needed."""
        if not hasattr(self, "int4_parts"):
            self.int4_parts: dict[int, tuple[torch.Tensor, Int4Codes] | None] = {}
        if not isinstance(loaded, Int4Codes):
            self.int4_parts[shard_id or 0] = None
            return False
        if target.shape != loaded.shape:
            raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, parameter expects "
                             f"{tuple(target.shape)}")
        self.int4_parts[shard_id or 0] = (target, loaded)
        return True

    def fill_deferred_dense(self) -> None:
        """Write the dense values of every shard whose codes were kept back (the weight stays dense, or is
        quantized from dense values)."""
        for part in getattr(self, "int4_parts", {}).values():
            if part is not None:
                part[0].copy_(part[1].materialize())

    def exact_int4(self) -> Int4Codes | None:
        """The whole weight's checkpoint codes when every shard arrived 4-bit, else None."""
        parts = getattr(self, "int4_parts", {})
        if not parts or any(p is None for p in parts.values()):
            return None
        return Int4Codes.cat([parts[i][1] for i in sorted(parts)])

    def quantize(self, method: str, codes: Int4Codes | None = None) -> None:
        """Hold the weight as `method` too (int4 from `codes` when given, exactly). The dense weight becomes
        the dequantized copy, so both kernels compute the same model; it serves steps of many rows, where a
        dense GEMM is 2-4x faster than the quantized kernels (docs/benchmarks.md, "Token latency")."""
        source = codes if codes is not None else self.weight.detach()
        self.quantized = QuantizedWeight(method, source, self.weight.device)
        values = self.quantized.take_dequantized().to(self.weight.dtype).to(self.weight.device)
        # A new parameter, not an in-place copy: a tied LM head must not change the embedding it shares.
        self.weight = nn.Parameter(values, requires_grad=False)
        self.__dict__.pop("int4_parts", None)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None and x.shape[0] <= QUANT_MAX_ROWS:
            return self.quantized.mm(x)
        return F.linear(x, self.weight)


class Linear(QuantizableWeight):
    """y = x W^T (+ b), replicated on every TP rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty_param(out_features, in_features, dtype=dtype)
        self.weight.weight_loader = self._load_whole
        self.bias = _empty_param(out_features, dtype=dtype) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = default_weight_loader

    def _load_whole(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        if not self.defer_int4(shard_id, loaded, param.data):
            default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias


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
        rows, target = loaded[start : start + size], param.data[offset : offset + size]
        if param is not self.weight or not self.defer_int4(shard_id, rows, target):
            default_weight_loader(target, rows)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(self.out_sizes, dim=-1)


class RowParallelLinear(QuantizableWeight):
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
        cols = slice(self.in_start, self.in_start + param.shape[1])
        if isinstance(loaded, Int4Codes) and (cols.start % GROUP_SIZE or cols.stop % GROUP_SIZE):
            loaded = loaded.materialize()  # this rank's share splits a 4-bit group: only dense values are exact
        part = loaded[:, cols]
        if not self.defer_int4(shard_id, part, param.data):
            default_weight_loader(param, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.matmul(x))  # (T, out): every rank's partial sum
        return y if self.bias is None else y + self.bias  # the bias once, after the sum
