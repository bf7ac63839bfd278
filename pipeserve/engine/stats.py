"""Cheap, instantaneous engine statistics for monitoring (the server's /metrics reads them at scrape time)."""

from __future__ import annotations

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

