"""Micro-benchmarks that need several processes at once (a link, an all-reduce, cores running together): start
them fresh (spawn, so no parent state leaks into a timing), collect what they put on a queue, and turn a dead or
hung one into one clear error."""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Callable


def run_spawned(target: Callable, args: list[tuple], what: str, results_wanted: int = 1,
                timeout_s: float = 180.0) -> list:
    """Run `target(*a, results_queue)` in one process per entry of `args`; the first `results_wanted` items the
    processes put on the queue, or ValueError naming `what` if they do not all arrive in `timeout_s`."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, results)) for a in args]
    for p in procs:
        p.start()
    try:
        return [results.get(timeout=timeout_s) for _ in range(results_wanted)]
    except queue.Empty:
        codes = [p.exitcode for p in procs]
        raise ValueError(f"calibrate: the {what} benchmark failed (exit codes {codes})") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
