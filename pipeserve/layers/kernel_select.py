"""Where layers run as Triton kernels: on CUDA, when triton is installed (it ships with CUDA torch wheels).

The CPU keeps torch operators (the fastest there) and never imports triton."""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def uses_kernels(x: torch.Tensor) -> bool:
    """Whether the layers run as Triton kernels on `x` (checked per layer call, so kept cheap)."""
    return x.is_cuda and _has_triton()


def device_uses_kernels(device: torch.device | str) -> bool:
    """`uses_kernels` for tensors on `device`."""
    return torch.device(device).type == "cuda" and _has_triton()
