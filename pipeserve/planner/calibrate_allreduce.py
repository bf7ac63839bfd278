"""`--calibrate`'s all-reduce: what one gloo all-reduce adds to a TP rank's time, and to its CPU-seconds, while
the ranks are busy between all-reduces, as they are in a step (a layer's GEMMs, then an all-reduce).

Idle ping-pong latency understates the time: a rank that reaches the all-reduce first waits for its peer, and
where the machine has fewer cores than busy processes, the peer may be descheduled, so the wait lasts until the
scheduler runs it again. The CPU-seconds matter where the layout's processes share the cores: gloo copies
every message through a loopback socket and its threads keep a core busy for much of the wait, so the CPUs a
layout's ranks need grow with every all-reduce, not only their wall time.

Both are measured with 2 busy ranks (one TP pair) and with 4 (two TP pairs, as TP=2 x PP=2 runs), at a decode
step's message and at a prompt chunk's, each as what a loop of (busy work, all-reduce) takes beyond the same loop
without the all-reduce, both loops run by every process at once. The two loops alternate, and the cost is the
median round's: a step meets the typical wake-up of its peer, not the luckiest one (on a 2-core VM, rounds of
the same 18 KiB all-reduce ranged 1.4-2.4 ms).
"""

from __future__ import annotations

import time

import torch

from pipeserve.control.process import free_port
from pipeserve.planner.spawned import run_spawned

WORLDS = (2, 4)  # busy rank processes: one TP pair, two pairs
ROWS = (8, 512)  # a decode step's rows and serve's CPU prompt chunk: the message sizes measured
ROUNDS = 5  # alternations of the loop without and with the all-reduce (odd: one median round)


def _rank(rank: int, world: int, port: int, sizes: tuple[int, ...], busy_ms: float, seconds: float,
          results) -> None:
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

        def loop(msg: torch.Tensor, count: int, reduce: bool) -> tuple[float, float]:
            """(wall seconds, this process's CPU-seconds, every thread of it) of `count` rounds."""
            dist.barrier()
            begin, cpu = time.perf_counter(), time.process_time()
            for _ in range(count):
                for _ in range(int(reps)):
                    torch.mm(a[:size], a)
                if reduce:
                    dist.all_reduce(msg, group=mine)
            dist.barrier()
            return time.perf_counter() - begin, time.process_time() - cpu

        added = []
        for elems in sizes:
            msg = torch.zeros(elems)
            loop(msg, 3, True)  # warm-up
            count = max(5, int(seconds / 2 / ROUNDS / max(busy_ms / 1e3, 1e-4)))
            rounds = []
            for _ in range(ROUNDS):  # each round: the all-reduce's added (wall, CPU) seconds per iteration
                p, r = loop(msg, count, False), loop(msg, count, True)
                rounds.append(((r[0] - p[0]) / count, (r[1] - p[1]) / count))
            walls, cpus = sorted(w for w, _ in rounds), sorted(c for _, c in rounds)
            added.append((max(0.0, walls[ROUNDS // 2]), max(0.0, cpus[ROUNDS // 2])))
        results.put(added)
    finally:
        dist.destroy_process_group()


def busy_allreduce_us(world: int, sizes: tuple[int, ...], busy_ms: float = 1.0,
                      seconds: float = 2.0) -> list[tuple[float, float]]:
    """[(microseconds of wall time, microseconds of CPU time), ...]: what one all-reduce of each size in `sizes`
    (float32 elements) adds per (busy work, all-reduce) round with `world` busy ranks, the median rank's of each."""
    port = free_port()
    ranks = run_spawned(_rank, [(r, world, port, sizes, busy_ms, seconds) for r in range(world)],
                        "busy all-reduce", results_wanted=world)
    out = []
    for i in range(len(sizes)):
        walls, cpus = sorted(r[i][0] for r in ranks), sorted(r[i][1] for r in ranks)
        out.append((walls[world // 2] * 1e6, cpus[world // 2] * 1e6))
    return out


def measure_allreduce(hidden: int, rows: tuple[int, ...] = ROWS, seconds: float = 2.0) -> dict[str, dict]:
    """{"allreduce_busy_us": {busy ranks: [[bytes, us], ...]}, "allreduce_cpu_us": likewise}: what one all-reduce
    of `rows` x `hidden` float32 adds to a rank's wall time and CPU time, at each row count."""
    sizes = tuple(r * hidden for r in sorted(rows))
    busy: dict[str, list] = {}
    cpu: dict[str, list] = {}
    for w in WORLDS:
        added = busy_allreduce_us(w, sizes, seconds=seconds)
        busy[str(w)] = [[4 * n, wall_us] for n, (wall_us, _) in zip(sizes, added, strict=True)]
        cpu[str(w)] = [[4 * n, cpu_us] for n, (_, cpu_us) in zip(sizes, added, strict=True)]
    return {"allreduce_busy_us": busy, "allreduce_cpu_us": cpu}
