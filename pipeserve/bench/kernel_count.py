"""Measurements of a step on a device: kernels one call launches (CUDA) or operators (CPU), and CUDA-event timings.

A decode step's cost on a GPU at small batch is mostly its number of launches, so benchmarks report this
next to the step time: `kernels_per_step(lambda: llm_step(), steps=8)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def kernels_per_step(step: Callable[[], object], steps: int = 5, warmup: int = 2,
                     device: str | None = None) -> float:
    """Mean launches per call of `step` over `steps` profiled calls (after `warmup` unprofiled ones).

    On CUDA it counts GPU kernels (memory copies and sets excluded); on CPU, top-level aten operators (an
    operator another operator calls runs inside it, not as a launch of its own)."""
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        count = sum(1 for e in events if e.device_type == DeviceType.CUDA and not _is_copy(e.name))
    else:
        count = sum(1 for e in events if e.name.startswith("aten::") and not _under_aten(e))
    return count / steps


def _is_copy(name: str) -> bool:
    return name.startswith(("Memcpy", "Memset"))


def _under_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def cuda_time_us(fn: Callable[[], object], reps: int = 100, warmup: int = 5) -> float:
    """Mean microseconds per call of `fn` on the current CUDA stream, by CUDA events around `reps` calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1000
