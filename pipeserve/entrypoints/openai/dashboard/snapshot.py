"""The engine's state as the dashboard's JSON: the layout once, then a live snapshot a few times a second.

Everything here is read without asking a stage: the schedulers' counters, the executor's recovery log, the
records of the live step feed (executor/step_feed.py) and the server's request window (window.py).
"""

from __future__ import annotations

import time
from typing import Any

from pipeserve.distributed.partition import stages_from_sizes
from pipeserve.engine.async_engine import AsyncEngine
from pipeserve.entrypoints.openai.dashboard.window import LiveRequestStats, Rate
from pipeserve.timeline import StepRecord, busy_fractions

GANTT_WINDOW_S = 3.0  # the Gantt shows this much of the recent past
GANTT_MAX_STEPS = 300  # per stage, the most recent
BUSY_WINDOW_S = 2.0  # busy % over this span ...
FEED_LAG_S = 0.25  # ... ending this long ago: stage processes send their records in batches (FEED_EVERY_S)


def layout(engine: AsyncEngine, model_name: str) -> dict[str, Any]:
    """What runs where: the model, its stages (layers, machine), TP, dtype, quantization and KV capacity."""
    cfg = engine.config
    m, par = cfg.model, cfg.parallel
    stages = []
    for st in stages_from_sizes(list(par.stage_layers) or [m.num_hidden_layers]):
        extras = (["embedding"] if st.is_first else []) + (["final norm", "LM head"] if st.is_last else [])
        stages.append({"stage": st.rank, "layers": [st.start_layer, st.end_layer], "extras": extras})
    return {
        "model": model_name, "path": str(m.path), "num_layers": m.num_hidden_layers,
        "dtype": m.dtype, "quantization": m.quantization,
        "pp": par.pipeline_parallel_size, "tp": par.tensor_parallel_size, "device": par.device,
        "nnodes": par.nnodes, "stages": stages, "max_model_len": cfg.scheduler.max_model_len,
        "kv": {"virtual_engines": cfg.num_virtual_engines, "blocks_per_ve": cfg.num_blocks_per_ve,
               "block_size": cfg.cache.block_size, "tokens_per_ve": cfg.tokens_per_ve,
               "tokens_total": cfg.tokens_per_ve * cfg.num_virtual_engines},
    }


class LiveSnapshot:
    """Builds the live snapshot; keeps only what a rate needs between calls."""

    def __init__(self, engine: AsyncEngine, requests: LiveRequestStats):
        self.engine, self.requests = engine, requests
        self._token_rate = Rate()

    def build(self, now: float | None = None) -> dict[str, Any]:
        engine, executor = self.engine, self.engine.executor
        now = time.time() if now is None else now
        feed = executor.step_feed
        per_stage = feed.recent() if feed is not None else [[] for _ in range(self._num_stages())]
        t1 = now - FEED_LAG_S
        t0 = max(t1 - BUSY_WINDOW_S, feed.since or 0.0) if feed is not None else t1 - BUSY_WINDOW_S
        t0 = min(t0, t1 - 0.1)  # a page opened a moment ago: a short window rather than none
        busy = busy_fractions([r for rs in per_stage for r in rs], len(per_stage), t0, t1)
        stages = [{"stage": s, "busy": round(busy[s], 4), "machine": executor.where(s),
                   "steps": _gantt(records, now)} for s, records in enumerate(per_stage)]
        ves, queries, hits = [], 0, 0
        for ve, st in enumerate(engine.stats()):
            ves.append({"ve": ve, "running": st.running, "waiting": st.waiting, "kv_used": st.used_blocks,
                        "kv_free": st.total_blocks - st.used_blocks, "kv_cached": st.cached_blocks,
                        "kv_total": st.total_blocks})
            queries, hits = queries + st.prefix_cache_queries, hits + st.prefix_cache_hits
        ttft, tpot = self.requests.ttft.percentiles(), self.requests.tpot.percentiles()
        return {
            "t": now, "state": _state(engine), "gantt_window_s": GANTT_WINDOW_S, "stages": stages, "ves": ves,
            "prefix_cache_hit_rate": hits / queries if queries else None,
            "output_tokens_per_s": round(self._token_rate.update(self.requests.output_tokens), 2),
            "ttft_ms": _ms(ttft), "tpot_ms": _ms(tpot), "latency_samples": len(self.requests.ttft),
            "events": _events(executor), "restarts": _restarts(engine),
            "clock_offsets_ms": {str(s): round(o * 1e3, 3) for s, o in
                                 (feed.clock_offsets().items() if feed is not None else [])},
        }

    def _num_stages(self) -> int:
        return self.engine.config.parallel.pipeline_parallel_size


def _gantt(records: list[StepRecord], now: float) -> list[list]:
    """[seconds before now the step started, its duration in ms, virtual engine, kind, tokens], oldest first."""
    since = now - GANTT_WINDOW_S
    recent = [r for r in records[-GANTT_MAX_STEPS:] if r.end >= since]
    return [[round(now - r.start, 4), round((r.end - r.start) * 1e3, 3), r.virtual_engine, r.kind, r.num_tokens]
            for r in recent]


def _ms(values: list[float | None]) -> dict[str, float | None]:
    p50, p99 = values
    return {"p50": None if p50 is None else round(p50 * 1e3, 2), "p99": None if p99 is None else round(p99 * 1e3, 2)}


def _state(engine: AsyncEngine) -> str:
    try:
        engine.check_health()
    except Exception:  # noqa: BLE001 - any cause: the page says failed, /health says why
        return "failed"
    return "recovering" if engine.recovering else "running"


def _events(executor) -> list[dict[str, Any]]:
    """Every recovery (newest last): when, how long, what was replaced, why."""
    log = executor.recoveries
    if log is None:
        return []
    return [{"kind": "recovery", "start": s.start, "end": s.end, "seconds": round(s.end - s.start, 2),
             "stages": list(s.replaced_stages), "generation": s.generation, "cause": s.cause} for s in log.spans]


def _restarts(engine: AsyncEngine) -> dict[str, int]:
    log = engine.executor.recoveries
    stages = engine.config.parallel.pipeline_parallel_size
    return {str(s): (log.restarts_by_stage.get(s, 0) if log is not None else 0) for s in range(stages)}
