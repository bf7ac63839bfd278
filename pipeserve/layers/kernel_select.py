"""Where layers run as Triton kernels: on CUDA, when triton is installed (it ships with CUDA torch wheels).

The CPU keeps torch operators (the fastest there) and never imports triton."""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def uses_kernels(device: torch.device | str) -> bool:
    """Whether attention and the fused layer kernels on `device` run as Triton kernels."""
    return torch.device(device).type == "cuda" and _has_triton()
