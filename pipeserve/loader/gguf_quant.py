"""llama.cpp's 4-bit blocks (Q4_0, Q4_1) read as torch-convention int4 codes, without rounding anything.

A block holds 32 consecutive weights of a row: an fp16 scale d (Q4_1 also an fp16 minimum m), then 16
bytes whose low nibbles are weights 0..15 and high nibbles weights 16..31. Q4_0 means w = d * (q - 8) and
Q4_1 w = d * q + m; torch's int4 kernels compute (q - 8) * scale + zero, so scale = d and zero = 0 or
m + 8d (formed in float32, where the sum of two fp16 numbers is exact whenever their exponents are within
13 of each other, which block statistics always are in practice; the tests check random blocks).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from pipeserve.layers.quantization import GROUP_SIZE, Int4Codes

INT4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


def int4_codes(data: np.ndarray, kind: GGMLQuantizationType, shape: tuple[int, int]) -> Int4Codes:
    """The (rows, cols) weight stored as Q4_0/Q4_1 blocks in `data` (rows, bytes per row) as Int4Codes."""
    rows, cols = shape
    header = 4 if kind == GGMLQuantizationType.Q4_1 else 2
    blocks = np.asarray(data).reshape(rows, cols // GROUP_SIZE, header + 16)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., header:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
    if kind == GGMLQuantizationType.Q4_1:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zeros = m + np.float32(8) * d
    else:
        zeros = np.zeros_like(d)
    return Int4Codes(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zeros))
