"""Counter-based randomness for sampling: a draw is a pure function of (key, token id), no generator state.

A row's key comes from (seed, output index) on the host, with exact 64-bit arithmetic; the device turns
(key, token id) into Exponential(1) noise with integer ops vectorised over the vocabulary. Nothing depends
on the other rows of the batch, on the order of calls, or on a generator's position, so the same key gives
the same noise alone or in any batch, and the computation could be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

_M64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
_UNSEEDED_SALT = 0x5EED_0F_E61E  # separates the engine's unseeded stream from a request seeded with the same value


def _i32(v: int) -> torch.Tensor:
    """A 0-dim int32 operand: on CPU, ops on int32 tensors run several times slower with a Python int (which
    they convert, copying the whole result); a CPU 0-dim tensor also serves as a scalar for CUDA tensors."""
    return torch.tensor(v, dtype=torch.int32)


# murmur3's 32-bit finaliser constants, as the signed int32 values torch multiplies with (products wrap mod 2**32)
_FMIX_C1 = _i32(0x85EBCA6B - (1 << 32))
_FMIX_C2 = _i32(0xC2B2AE35 - (1 << 32))
_GOLDEN32 = _i32(0x9E3779B9 - (1 << 32))
_SHIFTS = {s: (_i32(s), _i32((1 << (32 - s)) - 1)) for s in (8, 13, 16)}  # shift, mask of the bits it keeps


def splitmix64(x: int) -> int:
    """SplitMix64's output function on a Python int (exact mod 2**64)."""
    z = (x + _GOLDEN64) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def draw_key(seed: int, index: int) -> int:
    """The 32-bit key (as a signed int32 value) of draw `index` of the stream `seed`."""
    k = splitmix64(splitmix64(seed & _M64) ^ (index & _M64))
    k = (k ^ (k >> 32)) & 0xFFFFFFFF
    return k - (1 << 32) if k >= 1 << 31 else k


def unseeded_stream(engine_seed: int) -> int:
    """The stream an engine seed gives its unseeded requests."""
    return splitmix64((engine_seed & _M64) ^ _UNSEEDED_SALT)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 values (torch's shift is arithmetic on signed ints)."""
    shift, mask = _SHIFTS[s]
    return (x >> shift).bitwise_and_(mask)


def _fmix32_(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser, in place: a bijection of 32-bit ints that spreads every input bit over the output."""
    x ^= _shr(x, 16)
    x *= _FMIX_C1
    x ^= _shr(x, 13)
    x *= _FMIX_C2
    x ^= _shr(x, 16)
    return x


def token_hashes(vocab: int, device: torch.device | str) -> torch.Tensor:
    """(vocab,) int32: a fixed pseudo-random word per token id; keys are xor-ed into it before the final mix,
    so two keys' noise vectors share no structure (not shifted copies of one sequence, as key + id would)."""
    ids = torch.arange(vocab, dtype=torch.int32, device=device)  # (V,)
    return _fmix32_(ids * _GOLDEN32 + 1)  # (V,)


def exponential_noise(keys: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    """(R, V) float32 Exponential(1) noise for row keys (R,) int32 and the vocabulary's `token_hashes` (V,)."""
    x = keys.unsqueeze(1) ^ hashes.unsqueeze(0)  # (R, V) int32
    _fmix32_(x)
    uniform = _shr(x, 8).float().add_(0.5).mul_(1.0 / (1 << 24))  # (R, V) in (0, 1): the top 24 bits, exact
    return uniform.log_().neg_()
