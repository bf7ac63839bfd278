"""`--calibrate`'s all-reduce: what one gloo all-reduce of a decode step's size adds to a TP rank's time while
the ranks are busy between all-reduces, as they are in a step (a layer's GEMMs, then an all-reduce).

Idle ping-pong latency understates it: a rank that reaches the all-reduce first waits for its peer, and where
the machine has fewer cores than busy processes, the peer may be descheduled, so the wait lasts until the
scheduler runs it again. So it is measured with 2 busy ranks (one TP pair) and with 4 (two TP pairs, as
TP=2 x PP=2 runs), each time as the wall time a loop of (busy work, all-reduce) takes beyond the same loop
without the all-reduce, both loops run by every process at once (alternated, the least of each).
"""

from __future__ import annotations

import time

import torch

from pipeserve.control.process import free_port
from pipeserve.planner.spawned import run_spawned

WORLDS = (2, 4)  # busy rank processes: one TP pair, two pairs
ROUNDS = 3  # alternations of the loop without and with the all-reduce


def _rank(rank: int, world: int, port: int, elems: int, busy_ms: float, seconds: float, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        pairs = [dist.new_group([2 * i, 2 * i + 1]) for i in range(world // 2)]  # every rank creates every group
        mine = pairs[rank // 2]
        a = torch.randn(256, 256)
        size = 64
        start = time.perf_counter()  # size the busy work: about busy_ms of GEMMs
        for _ in range(20):
            torch.mm(a[:size], a)
        per = (time.perf_counter() - start) / 20
        reps = torch.tensor([max(1, int(busy_ms / 1e3 / max(per, 1e-7)))])
        dist.broadcast(reps, 0)  # every rank does the same work
        msg = torch.zeros(elems)

        def loop(count: int, reduce: bool) -> float:
            dist.barrier()
            begin = time.perf_counter()
            for _ in range(count):
                for _ in range(int(reps)):
                    torch.mm(a[:size], a)
                if reduce:
                    dist.all_reduce(msg, group=mine)
            dist.barrier()
            return time.perf_counter() - begin

        loop(3, True)  # warm-up
        count = max(5, int(seconds / 2 / ROUNDS / max(busy_ms / 1e3, 1e-4)))
        plain = reduced = float("inf")
        for _ in range(ROUNDS):  # alternated, the least of each: what other load on the machine disturbs least
            plain, reduced = min(plain, loop(count, False)), min(reduced, loop(count, True))
        if rank == 0:
            results.put(max(0.0, (reduced - plain) / count))
    finally:
        dist.destroy_process_group()


def busy_allreduce_us(world: int, elems: int, busy_ms: float = 1.0, seconds: float = 2.0) -> float:
    """Microseconds one all-reduce of `elems` float32 adds per (busy work, all-reduce) round, `world` ranks."""
    port = free_port()
    (added,) = run_spawned(_rank, [(r, world, port, elems, busy_ms, seconds) for r in range(world)],
                           "busy all-reduce")
    return added * 1e6


def measure_allreduce(hidden: int, rows: int = 8, seconds: float = 2.0) -> dict[str, float]:
    """{busy ranks: us per all-reduce} for a decode step's message (`rows` x `hidden` float32)."""
    return {str(w): busy_allreduce_us(w, rows * hidden, seconds=seconds) for w in WORLDS}
