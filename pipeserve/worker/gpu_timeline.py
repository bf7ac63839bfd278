"""When each step's work ran on the GPU: a CUDA event before and after it, on the stage's stream.

The host records the events without waiting; they are read after a run (benchmarks), which waits once for
the last one. The gap between one step's end event and the next step's start event is time the GPU had
nothing of this stage's to do: the host was still preparing the step (or the engine planning it).
"""

from __future__ import annotations

from collections import deque

import torch

MAX_SPANS = 200_000


class GpuTimeline:
    """Start and end events of the latest MAX_SPANS steps of one stage."""

    def __init__(self) -> None:
        self._events: deque[tuple[int, int, str, torch.cuda.Event, torch.cuda.Event]] = deque(maxlen=MAX_SPANS)

    @staticmethod
    def mark() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, step_id: int, virtual_engine: int, kind: str, start: torch.cuda.Event) -> None:
        """The step's work has been issued: close its span."""
        self._events.append((step_id, virtual_engine, kind, start, self.mark()))

    def spans(self) -> list[tuple[int, int, str, float, float]]:
        """(step id, virtual engine, kind, start ms, end ms), times from the first kept step's start."""
        if not self._events:
            return []
        self._events[-1][4].synchronize()
        origin = self._events[0][3]
        return [(step, ve, kind, origin.elapsed_time(a), origin.elapsed_time(b))
                for step, ve, kind, a, b in self._events]


def idle_fraction(spans: list[tuple[int, int, str, float, float]], kind: str = "decode") -> float | None:
    """Over every pair of consecutive steps both of `kind`: the gap between them over gap plus the second
    step's GPU span, i.e. the share of the time the GPU waited for the next step. None without such a pair."""
    pairs = [(a, b) for a, b in zip(spans[:-1], spans[1:], strict=True) if a[2] == kind and b[2] == kind]
    if not pairs:
        return None
    gaps = sum(max(0.0, b[3] - a[4]) for a, b in pairs)
    busy = sum(b[4] - b[3] for _, b in pairs)
    return gaps / (gaps + busy) if gaps + busy > 0 else None
