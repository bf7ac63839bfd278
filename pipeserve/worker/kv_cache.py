"""KV cache allocation for one stage, split among virtual engines (the sizing: engine/kv_sizing.py)."""

from __future__ import annotations

import numpy as np
import torch

from pipeserve.config import ModelConfig


def allocate_kv_caches(cfg: ModelConfig, num_layers: int, num_blocks: int, block_size: int,
                       device: str = "cpu", num_kv_heads: int | None = None) -> list[torch.Tensor]:
    """One (2, n_kv_heads, num_blocks, block_size, head_dim) tensor per layer of the stage (head-major);
    `num_kv_heads` is this TP rank's share."""
    shape = (2, num_kv_heads or cfg.num_key_value_heads, num_blocks, block_size, cfg.head_dim)
    return [_zeros(shape, cfg.torch_dtype, device) for _ in range(num_layers)]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Zeros that cost nothing until used. On CPU numpy's calloc hands out pages the kernel zeroes on first
    touch, where torch.zeros writes every byte up front: a stage (a replacement above all) starts without
    touching its whole KV pool. 16-bit floats are allocated as int16 and viewed (numpy has no bfloat16)."""
    if device != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    wide = dtype.itemsize == 4
    buf = torch.from_numpy(np.zeros(shape, dtype=np.int32 if wide else np.int16))
    return buf.view(dtype)
