"""Triton kernels that each replace several elementwise operators of a decoder layer (used on CUDA).

Each reproduces the rounding of the operators it replaces (HF Llama's): a sum in the model dtype is
rounded before the norm reads it, the norm's statistics are taken in float32 and the weight multiplies
after the cast back, rotary products are rounded one by one, SiLU is rounded before the product. One row
of tokens per program; the row fits one block (hidden sizes up to 64k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, n, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the residual stream is kept in the model dtype
        tl.store(res_out_ptr + row * n + cols, x, mask=mask)
    xf = x.to(tl.float32)
    y = xf * tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (w * y.to(x.dtype).to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) for x, residual (T, H); residual None means x alone."""
    t, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    if t:
        _add_rms_norm_kernel[(t,)](x, residual if residual is not None else x, weight, out, res_out, x.stride(0),
                                   residual.stride(0) if residual is not None else 0, n, eps,
                                   HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
                                   num_warps=_warps(n))
    return out, res_out


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_p, heads,
                   HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)[:, None]
    i = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < heads) & (i < HALF)
    first = x_ptr + t * stride_t + h * stride_h + i
    x1 = tl.load(first, mask=mask, other=0.0)  # (heads, hd/2)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    # the tables as HF uses them: cos, and sin with rotate_half's sign folded in, cast to the model dtype
    cos = tl.load(cos_ptr + pos * stride_p + i, mask=i < HALF, other=0.0).to(dtype).to(tl.float32)
    sin_lo = tl.load(sin_ptr + pos * stride_p + i, mask=i < HALF, other=0.0).to(dtype).to(tl.float32)
    sin_hi = tl.load(sin_ptr + pos * stride_p + HALF + i, mask=i < HALF, other=0.0).to(dtype).to(tl.float32)
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    y1 = (a1 * cos).to(dtype).to(tl.float32) + (a2 * sin_lo).to(dtype).to(tl.float32)
    y2 = (a2 * cos).to(dtype).to(tl.float32) + (a1 * sin_hi).to(dtype).to(tl.float32)
    tl.store(first, y1.to(dtype), mask=mask)
    tl.store(first + HALF, y2.to(dtype), mask=mask)


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, hd) in place by the rows `positions` (T,) of cos and signed_sin (P, hd) float32."""
    t, heads, hd = x.shape
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or signed_sin.stride() != cos.stride():
        raise ValueError("x and the rotary tables must be contiguous along head_dim, the tables alike")
    if t:
        half = hd // 2
        _rotary_kernel[(t,)](x, positions, cos, signed_sin, x.stride(0), x.stride(1), cos.stride(0), heads,
                             HALF=half, HEADS_PAD=triton.next_power_of_2(heads),
                             HALF_PAD=triton.next_power_of_2(half))
    return x


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, n, BLOCK: tl.constexpr):
    row, col = tl.program_id(0), tl.program_id(1)
    cols = col * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up (T, 2I) holding [gate | up]; returns (T, I)."""
    t, two_n = gate_up.shape
    if gate_up.stride(-1) != 1:
        raise ValueError("gate_up must be contiguous along its features")
    n = two_n // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = min(1024, triton.next_power_of_2(n))
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), n, BLOCK=block)
    return out


def _warps(n: int) -> int:
    return 4 if n <= 2048 else 8 if n <= 8192 else 16
