"""`--calibrate`'s co-running factor: how much slower the model's decoder layer runs on one core while every
core of the machine runs one at the same time, as the ranks of a PP or TP layout do.

A layer timed alone has the whole memory bandwidth and the shared cache to itself. Decode steps read every
weight once per step, so they are bound by memory, and on a machine whose cores share one memory system two
busy ranks each run slower than one alone. The factor is the ratio of the two timings of the same layer at the
same rows (a decode at a short context, a prompt chunk), each the median of repeated calls through the same
streamed layers calibrate_ops times (their weights far beyond the cache, so both timings read memory as a
stage does); the processes start each row count together, and the time alone is the mean of one timing
before them and one after. A plan multiplies a stage's layer and LM-head costs by it wherever more than
one of its rank processes run at once on a calibrated CPU.
"""

from __future__ import annotations

import multiprocessing as mp

from pipeserve.config import ModelConfig
from pipeserve.planner.spawned import run_spawned

CORUN_ROWS = (1, 16, 512)  # decode rows at the short context, and serve's CPU prompt chunk


def _timings(model: ModelConfig, tp: int, rows: tuple[int, ...], seconds: float, together=None) -> list[float]:
    """The median seconds of one layer call at each row count (calls repeated for about `seconds` each); with
    `together` (a barrier of every co-running process), each row count starts in all of them at once."""
    from pipeserve.planner.calibrate_ops import (
        SHORT_CTX,
        StreamedLayers,
        layer_seconds,
        rank_config,
        streamed_layer_count,
    )

    cfg = rank_config(model, tp)
    parts = StreamedLayers(cfg, streamed_layer_count(cfg))
    out = []
    for r in rows:
        if together is not None:
            together.wait()
        prefill = r > 64  # past a decode batch: a prompt chunk from position 0
        out.append(layer_seconds(cfg, r, r if prefill else SHORT_CTX, prefill, seconds, parts))
    return out


def _corunner(model, tp, rows, seconds, start, results) -> None:
    import torch

    torch.set_num_threads(1)
    _timings(model, tp, rows[:1], seconds / 4)  # imports and first calls before the barrier, not timed together
    results.put(_timings(model, tp, rows, seconds, start))


def corun_factors(model: ModelConfig, tp: int, processes: int, seconds: float = 0.4,
                  rows: tuple[int, ...] = CORUN_ROWS) -> list[list[float]]:
    """[[rows, factor], ...]: one layer's seconds with `processes` copies running at once (their median) over
    its seconds alone, measured here before and after them (the mean of the two: on a machine whose speed
    drifts over minutes, one timing alone would read the drift as a factor), one torch thread each."""
    from pipeserve.planner.calibrate_ops import torch_threads

    def alone() -> list[float]:
        with torch_threads(1):
            return _timings(model, tp, rows, seconds)

    before = alone()
    start = mp.get_context("spawn").Barrier(processes)
    together = run_spawned(_corunner, [(model, tp, rows, seconds, start)] * processes, "co-running layer",
                           results_wanted=processes, timeout_s=300)
    after = alone()
    factors = []
    for i, r in enumerate(rows):
        times = sorted(t[i] for t in together)
        median = times[len(times) // 2]
        # never faster than alone: noise, not a gain
        factors.append([r, max(1.0, 2 * median / (before[i] + after[i]))])
    return factors
