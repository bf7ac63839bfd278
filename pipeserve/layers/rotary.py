"""Rotary position embedding with HF's frequency rules (default, linear, llama3)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float32, computed as transformers does for each rope type."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported (default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q and k from a precomputed cos/sin table indexed by position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # (P, hd/2): the same products HF's matmul forms
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, hd)
        half = head_dim // 2
        self.register_buffer("cos", emb.cos(), persistent=False)
        # sin with rotate_half's sign folded in: rotate_half(x) * sin == x.roll(half) * signed_sin, exactly.
        self.register_buffer("signed_sin", torch.cat((-emb[:, :half].sin(), emb[:, half:].sin()), -1), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) rows of this step's positions, (T, 1, hd) in `dtype`: built once per step."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.signed_sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (T, heads, hd) rotated as HF does, x * cos + rotate_half(x) * sin, in four operations."""
        cos, signed_sin = tables
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin

    def rotate_(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (T, heads, hd) rotated in place by one Triton kernel reading the tables at `positions` (T,)
        (CUDA); the same products as `rotate`, each rounded to x's dtype."""
        from pipeserve.layers.fused import rotary_  # triton is imported only where the kernels run

        return rotary_(x, positions, self.cos, self.signed_sin)
