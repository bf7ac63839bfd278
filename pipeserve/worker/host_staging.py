"""Pinned staging for the host-to-device copies of the steps built afresh (prefill and mixed steps).

A copy from pageable host memory returns only once the stream has reached it, that is once the device has
finished every step queued before: with async scheduling the next step's issue would wait behind the step in
flight. `HostStaging` packs a step's index tensors into pinned buffers that live as long as the stage (grown
as needed) and copies each dtype's in one transfer that does not wait, into device buffers that live as long.
Before it writes its host buffers again it waits for their last copy, which is queued ahead of the previous
step's kernels (the decode buffers, step_inputs.DecodeInputs, do the same). Reusing the device buffers is safe
because every copy is queued on the stream behind the kernels of the steps that read them.

On the CPU the buffers are the device's: the tensors are packed into them and nothing is copied.
"""

from __future__ import annotations

import torch


class HostStaging:
    """Device tensors from host tensors of one step, one copy per dtype through reused pinned buffers."""

    def __init__(self, device: str):
        self.device = device
        self._pinned = torch.device(device).type == "cuda"
        self._host: dict[torch.dtype, torch.Tensor] = {}  # dtype -> (capacity,) pinned buffer
        self._dev: dict[torch.dtype, torch.Tensor] = {}  # dtype -> (capacity,) its device twin
        self._copied = torch.cuda.Event() if self._pinned else None  # after the last copies

    def to_device(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each host tensor's values on the device, same shapes and dtypes: views of the stage's buffers, valid
        until the next call's copies (queued after this step's kernels)."""
        if self._copied is not None and not self._copied.query():
            self._copied.synchronize()  # the last copy still reads the host buffers
        sizes: dict[torch.dtype, int] = {}
        for t in tensors:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        for dtype, size in sizes.items():
            self._reserve(dtype, size)
        offsets = dict.fromkeys(sizes, 0)
        placed = []
        for t in tensors:
            start = offsets[t.dtype]
            offsets[t.dtype] = start + t.numel()
            self._host[t.dtype][start: start + t.numel()].copy_(t.reshape(-1))
            placed.append((t.dtype, start, t.shape))
        if self._pinned:
            for dtype, size in sizes.items():
                self._dev[dtype][:size].copy_(self._host[dtype][:size], non_blocking=True)
            self._copied.record()
        return [self._dev[dtype][start: start + shape.numel()].view(shape) for dtype, start, shape in placed]

    def _reserve(self, dtype: torch.dtype, size: int) -> None:
        have = self._host.get(dtype)
        if have is not None and have.numel() >= size:
            return
        capacity = max(size, 2 * (0 if have is None else have.numel()), 1024)
        self._host[dtype] = torch.empty(capacity, dtype=dtype, pin_memory=self._pinned)
        self._dev[dtype] = torch.empty(capacity, dtype=dtype, device=self.device) if self._pinned \
            else self._host[dtype]
