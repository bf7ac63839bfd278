"""Cheap, instantaneous engine statistics for monitoring (the server's /metrics reads them at scrape time)."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class VirtualEngineStats:
    """One virtual engine's load at this instant, and its counters since start."""

    running: int
    waiting: int
    used_blocks: int  # referenced by requests (zero when idle)
    total_blocks: int
    cached_blocks: int = 0  # free, but holding a cached prefix until evicted
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of those, tokens found cached
    num_preemptions: int = 0  # running requests sent back to the queue because the KV pool ran dry
    max_steps_in_flight: int = 0  # the most steps it has had in the pipeline at once
    num_recomputed: int = 0  # requests sent back to recompute by stage failures
    num_recomputed_tokens: int = 0  # tokens whose KV they had, computed again
    num_planned_ahead: int = 0  # decodes planned before their input token reached the host (async scheduling)


class BusyClock:
    """Seconds during which at least one step was in flight, as the engine sees it.

    With several virtual engines, steps overlap; this counts wall time covered by any of them, so
    `busy / elapsed` is the share of time the pipeline had work. It is what the engine can observe without
    asking the stage processes (per-stage busy time lives in their step records).
    """

    def __init__(self) -> None:
        self._in_flight = 0
        self._since = 0.0
        self._total = 0.0

    def step_started(self) -> None:
        if self._in_flight == 0:
            self._since = time.monotonic()
        self._in_flight += 1

    def step_ended(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._total += time.monotonic() - self._since

    def seconds(self) -> float:
        running = time.monotonic() - self._since if self._in_flight else 0.0
        return self._total + running
