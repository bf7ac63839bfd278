"""`pipeserve plan --calibrate`: micro-benchmarks of this machine as a `--gpu cpu` stage process sees it (one
process with its torch threads): GEMM rate by row count, memory copy bandwidth, and the loopback link between
two processes over torch.distributed gloo, as stages hand off. Never the runs the plan predicts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from pipeserve.config import dtype_name
from pipeserve.control.process import free_port
from pipeserve.planner.spawned import run_spawned

DECODE_ROWS = (1, 4, 16, 64)  # a decode step's rows per stage: one per sequence of a virtual engine's batch
PREFILL_ROWS = 512  # a prefill chunk's rows


@dataclass(frozen=True)
class CalibrationSizes:
    """What the micro-benchmarks move; the defaults take about 20 s on a small machine, a test passes tiny ones."""

    hidden: int = 2048  # GEMM shape: rows x hidden @ hidden x hidden (the plan passes its model's)
    rows: tuple[int, ...] = (*DECODE_ROWS, PREFILL_ROWS)
    copy_mib: int = 256  # the copied tensor, far beyond any cache
    link_mib: int = 8  # one large message of the link benchmark
    seconds: float = 1.5  # per measurement, after a warm-up
    threads: int = 1  # torch threads, as a stage process has with --threads-per-worker 1


def _timed(fn, seconds: float) -> tuple[int, float]:
    """(calls, elapsed seconds) of `fn` repeated for about `seconds`, after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls, elapsed


def gemm_tflops(rows: int, hidden: int, dtype: torch.dtype, seconds: float) -> float:
    """TFLOP/s of rows x hidden @ hidden x hidden: the compute rate of a step's linear layers."""
    x = torch.randn(rows, hidden).to(dtype)  # [rows, hidden]
    w = torch.randn(hidden, hidden).to(dtype)  # [hidden, hidden]
    out = torch.empty(rows, hidden, dtype=dtype)  # [rows, hidden]
    calls, elapsed = _timed(lambda: torch.matmul(x, w, out=out), seconds)
    return 2.0 * rows * hidden * hidden * calls / elapsed / 1e12


def copy_gbps(mib: int, seconds: float) -> float:
    """GB/s of a large tensor copy, counting the bytes read and the bytes written."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)  # [mib MiB / 4 bytes]
    dst = torch.empty_like(src)
    calls, elapsed = _timed(lambda: dst.copy_(src), seconds)
    return 2.0 * src.numel() * 4 * calls / elapsed / 1e9


def _link_rank(rank: int, port: int, sizes: CalibrationSizes, results) -> None:
    """One of two processes: ping-pong a one-element tensor (latency) then a large one (bandwidth)."""
    import torch.distributed as dist

    torch.set_num_threads(sizes.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        peer = 1 - rank

        def ping_pong(t: torch.Tensor) -> None:
            if rank == 0:
                dist.send(t, peer)
                dist.recv(t, peer)
            else:
                dist.recv(t, peer)
                dist.send(t, peer)

        small = torch.zeros(1)
        big = torch.zeros(sizes.link_mib * 2**20 // 4)  # [link_mib MiB / 4 bytes]
        measured = []
        for t in (small, big):
            # Both ranks must run the same number of round trips: rank 0 decides and tells rank 1.
            ping_pong(t)  # warm-up
            start = time.perf_counter()
            ping_pong(t)
            per_trip = time.perf_counter() - start
            count = torch.tensor([max(1, int(sizes.seconds / 2 / max(per_trip, 1e-6)))])
            dist.broadcast(count, 0)
            start = time.perf_counter()
            for _ in range(int(count)):
                ping_pong(t)
            measured.append((time.perf_counter() - start) / (2 * int(count)))  # one message, one way
        if rank == 0:
            latency, big_s = measured
            results.put((latency * 1e6, big.numel() * 4 / max(big_s - latency, 1e-9) / 1e9))
    finally:
        dist.destroy_process_group()


def link_speed(sizes: CalibrationSizes) -> tuple[float, float]:
    """(latency per message in us, GB/s of a large message) between two processes over gloo on 127.0.0.1."""
    port = free_port()
    (result,) = run_spawned(_link_rank, [(r, port, sizes) for r in (0, 1)], "loopback link", timeout_s=120)
    return result


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def usable_cores() -> int:
    """CPUs this process may run on: the processes of a layout share them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def measure(dtype: torch.dtype, sizes: CalibrationSizes, model=None, tps: tuple[int, ...] = ()) -> dict:
    """Every micro-benchmark, as the calibration file's fields; with a `model`, also its decoder layer's costs
    at each TP size in `tps` (calibrate_ops.py)."""
    layers = {}
    if model is not None:
        from pipeserve.planner.calibrate_ops import measure_layer_costs, rank_shape_key

        layers = {rank_shape_key(model, tp): measure_layer_costs(model, tp, sizes.seconds / 4) for tp in tps}
        if usable_cores() > 1:
            from pipeserve.planner.calibrate_corun import corun_factors

            for tp in tps:
                layers[rank_shape_key(model, tp)]["corun"] = corun_factors(model, tp, usable_cores(),
                                                                           sizes.seconds / 4)
    from pipeserve.planner.calibrate_ops import torch_threads

    with torch_threads(sizes.threads):
        curve = [[r, gemm_tflops(r, sizes.hidden, dtype, sizes.seconds)] for r in sorted(set(sizes.rows))]
        bandwidth = copy_gbps(sizes.copy_mib, sizes.seconds)
    latency_us, link = link_speed(sizes)
    from pipeserve.planner.calibrate_allreduce import measure_allreduce

    allreduce = measure_allreduce(sizes.hidden, seconds=sizes.seconds / 1.5)
    return {
        "device": "cpu", "cpu_model": cpu_model(), "torch": torch.__version__, "threads": sizes.threads,
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dtype": dtype_name(dtype), "gemm_hidden": sizes.hidden,
        "gemm_tflops": curve, "copy_gbps": bandwidth, "link_gbps": link, "link_latency_us": latency_us,
        **allreduce, "cores": usable_cores(), "layers": layers,
    }
