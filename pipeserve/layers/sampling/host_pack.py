"""One host-to-device copy per step for everything the sampler reads from the requests' params."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class HostPack:
    """Named sections of numbers gathered on the host, then sent to the device as one float64 tensor.

    float64 holds every int below 2**53 exactly (token ids, row indices, int32 keys) and every float32 value,
    so one tensor carries all sections. On CUDA it is pinned and copied non-blocking: the host goes on issuing
    kernels instead of waiting for the step's forward pass to drain.
    """

    def __init__(self) -> None:
        self.values: list[float] = []
        self.spans: dict[str, tuple[int, int]] = {}

    def add(self, name: str, values: Iterable[float]) -> None:
        start = len(self.values)
        self.values.extend(values)
        self.spans[name] = (start, len(self.values))

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every section as a float64 view of one device tensor."""
        pinned = device.type == "cuda"
        flat = torch.tensor(self.values, dtype=torch.float64, pin_memory=pinned)  # (N,)
        if device.type != "cpu":
            flat = flat.to(device, non_blocking=pinned)
        return {name: flat[a:b] for name, (a, b) in self.spans.items()}


def to_host(t: torch.Tensor) -> torch.Tensor:
    """The step's one device-to-host copy: into pinned memory, non-blocking, then one wait for that copy."""
    if t.device.type != "cuda":
        return t.to("cpu")  # a CPU tensor is returned as is
    host = t.to("cpu", non_blocking=True)  # lands in pinned memory
    done = torch.cuda.Event()
    done.record()
    done.synchronize()  # waits for this copy (and the kernels before it), nothing later
    return host
