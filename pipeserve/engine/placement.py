"""Which virtual engine a new request joins.

A request stays on one virtual engine (VE) until it finishes, and each VE has its own KV pool, so a
cached prefix helps only on the VE that holds it. The rule: the request goes to the VE holding the longest
cached prefix of its prompt among the VEs that would not get too far ahead of the least loaded one (with
the request, at most `max(least + AFFINITY_SLACK, least * AFFINITY_RATIO)` unfinished requests); ties,
and prompts cached nowhere, go to the least loaded VE. The bound keeps the pipeline busy: every VE keeps a share of the
requests, so no stage waits on an empty VE. A hot prefix (one system prompt for every request) does not pile
requests onto one VE either: once the first requests on each VE have computed it, every VE holds it, the
hits tie, and requests spread by load as without caching.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeserve.engine.request import Request
    from pipeserve.engine.scheduler import Scheduler

AFFINITY_SLACK = 2  # a VE with a cached prefix may hold this many more unfinished requests than the least
AFFINITY_RATIO = 1.25  # ... or this many times as many, whichever is more


def choose_virtual_engine(schedulers: list[Scheduler], req: Request) -> int:
    loads = [s.num_unfinished for s in schedulers]
    least = min(loads)
    by_load = loads.index(least)
    bm = schedulers[0].block_manager
    if len(schedulers) == 1 or not bm.enable_prefix_caching:
        return by_load
    limit = len(req.prompt_token_ids) - 1  # the last prompt token is always computed
    hashes = req.full_block_hashes(limit, bm.block_size)
    bound = max(least + AFFINITY_SLACK, least * AFFINITY_RATIO)
    best, best_hit = by_load, schedulers[by_load].block_manager.longest_cached_prefix(hashes, limit)
    for ve, s in enumerate(schedulers):
        if loads[ve] + 1 > bound or ve == by_load:
            continue
        hit = s.block_manager.longest_cached_prefix(hashes, limit)
        if hit > best_hit or (hit == best_hit and loads[ve] < loads[best]):
            best, best_hit = ve, hit
    return best
