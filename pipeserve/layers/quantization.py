"""Weight-only quantized matmuls on torch's own kernels: groupwise int4 and per-channel int8.

A quantized weight keeps its integers and scales on the device and multiplies with
`_weight_int4pack_mm[_for_cpu]` or `_weight_int8pack_mm`. Those kernels read 1/8 (int4) or 1/4 (int8) of
float32's bytes, which is what one decode row is bound by, but they lose to a dense GEMM once many rows
share the step; so a layer may keep its dense weight too and choose per call (see `QuantizedWeight.mm`).

int4 follows torch's convention: w = (q - 8) * scale + zero, q in 0..15, one (scale, zero) per group of
32 input features. llama.cpp's Q4_1 block (w = d * q + m) maps onto it exactly with scale = d and
zero = m + 8d, and Q4_0 (w = d * (q - 8)) with zero = 0 (see loader/gguf_quant.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP_SIZE = 32
# The activation dtype of every quantized matmul. CUDA's int4 kernel takes only bfloat16, and on CPU the
# float32 variants are scalar fallbacks 10-20x slower; activations are cast for the one matmul.
KERNEL_DTYPE = torch.bfloat16


@dataclass
class Int4Codes:
    """A (N, K) weight as 4-bit codes (uint8 holding 0..15) with one float32 scale and zero per group of 32.

    Supports the slicing that tensor-parallel loaders do (rows anywhere, columns on group boundaries), and
    `materialize()` gives the dense float32 values, so a loader that wants dense weights needs no change."""

    codes: torch.Tensor  # (N, K) uint8
    scales: torch.Tensor  # (N, K // 32) float32
    zeros: torch.Tensor  # (N, K // 32) float32

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def __getitem__(self, index) -> Int4Codes:
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        start, stop, step = cols.indices(self.codes.shape[1])
        if step != 1 or start % GROUP_SIZE or (stop % GROUP_SIZE and stop != self.codes.shape[1]):
            raise ValueError(f"columns {start}:{stop} of a 4-bit weight do not fall on its {GROUP_SIZE}-wide groups")
        groups = slice(start // GROUP_SIZE, -(-stop // GROUP_SIZE))
        return Int4Codes(self.codes[rows, start:stop], self.scales[rows, groups], self.zeros[rows, groups])

    def materialize(self) -> torch.Tensor:
        n, k = self.codes.shape
        q = self.codes.float().view(n, k // GROUP_SIZE, GROUP_SIZE) - 8
        return (q * self.scales[..., None] + self.zeros[..., None]).view(n, k)

    @staticmethod
    def cat(parts: list[Int4Codes]) -> Int4Codes:
        """Stack along rows (the shards of a fused projection)."""
        return Int4Codes(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scales", "zeros")))

    @staticmethod
    def quantize(w: torch.Tensor) -> Int4Codes:
        """Asymmetric min/max quantization of a dense (N, K) weight, per group of 32 input features."""
        n, k = w.shape
        g = w.float().view(n, k // GROUP_SIZE, GROUP_SIZE)
        lo, hi = g.amin(-1), g.amax(-1)
        scales = ((hi - lo) / 15).clamp_min(1e-10)
        codes = ((g - lo[..., None]) / scales[..., None]).round_().clamp_(0, 15)
        return Int4Codes(codes.to(torch.uint8).view(n, k), scales, lo + 8 * scales)


class QuantizedWeight:
    """A (N, K) weight held as int4 or int8 on `device`; `mm(x)` computes x @ W^T in x's dtype."""

    def __init__(self, method: str, w: torch.Tensor | Int4Codes, device: torch.device | str):
        self.method, self.device, self.dtype = method, torch.device(device), KERNEL_DTYPE
        self.out_features, self.in_features = w.shape
        if method == "int4":
            codes = w if isinstance(w, Int4Codes) else Int4Codes.quantize(w)
            self._pack_int4(codes)
            # The values the kernel multiplies by: codes with scales and zeros rounded to the kernel dtype.
            self.dequantized = Int4Codes(codes.codes, *(t.to(self.dtype).float() for t in (codes.scales,
                                                                                             codes.zeros)))
        elif method == "int8":
            dense = (w.materialize() if isinstance(w, Int4Codes) else w).float().cpu()
            scales = dense.abs().amax(1).clamp_min(1e-10) / 127  # symmetric, one scale per output channel
            ints = (dense / scales[:, None]).round_().clamp_(-127, 127)
            self.int8 = ints.to(torch.int8).to(self.device)
            self.scales = scales.to(self.dtype).to(self.device)
            self.dequantized = ints * self.scales.float().cpu()[:, None]
        else:
            raise ValueError(f"quantization method {method!r} is not int4 or int8")

    def take_dequantized(self) -> torch.Tensor:
        """The dense float32 values this weight multiplies by (once: the reference is dropped after)."""
        ref, self.dequantized = self.dequantized, None
        return ref.materialize() if isinstance(ref, Int4Codes) else ref

    def _pack_int4(self, c: Int4Codes) -> None:
        # The kernels want N divisible by 16 (CPU) or 8 (CUDA): pad with zero rows, cut their outputs off.
        pad = -c.codes.shape[0] % 16
        codes, scales, zeros = (F.pad(t, (0, 0, 0, pad)) for t in (c.codes, c.scales, c.zeros))
        # (K / 32, N, 2): scale and zero of each group, in the kernel's activation dtype.
        self.scales_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(self.dtype).contiguous().to(self.device)
        if self.device.type == "cuda":
            pairs = codes.to(self.device)
            packed_bytes = (pairs[:, ::2] << 4 | pairs[:, 1::2]).to(torch.uint8)  # two codes per byte, first high
            inner_k_tiles = 8 if self.in_features % 256 == 0 else 4 if self.in_features % 128 == 0 else 2
            self.int4 = torch.ops.aten._convert_weight_to_int4pack(packed_bytes, inner_k_tiles)
        else:
            self.int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)

    @property
    def nbytes(self) -> int:
        held = [self.int4, self.scales_zeros] if self.method == "int4" else [self.int8, self.scales]
        return sum(t.numel() * t.element_size() for t in held)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, K) -> (T, N), computed in the kernel dtype and returned in x's dtype."""
        xk = x if x.dtype == self.dtype else x.to(self.dtype)
        if self.method == "int8":
            if self.device.type == "cuda":  # no CUDA int8 weight-only kernel in torch: dequantize in the GEMM
                y = F.linear(xk, self.int8.to(self.dtype)) * self.scales
            else:
                y = torch.ops.aten._weight_int8pack_mm(xk, self.int8, self.scales)
        elif self.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(xk, self.int4, GROUP_SIZE, self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, self.int4, GROUP_SIZE, self.scales_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, : self.out_features]
        return y if y.dtype == x.dtype else y.to(x.dtype)
