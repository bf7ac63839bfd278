"""Prometheus metrics of one server: engine load read at scrape time, request latencies observed as they happen.

Each app gets its own CollectorRegistry, so several servers (or tests) in one process never share series.

Per-stage busy time: for PP=1 the in-process executor sums its steps' compute time (exact, free; with async
scheduling each step counts from its issue until its tokens reach the host, worker.py). For PP>1
each stage process reports its cumulative compute time about once a second over its pipe, so a scrape
reads the latest figures without asking the stages (at most a second stale).
`pipeserve_pipeline_busy_seconds_total` (time with at least one step in flight, as the engine sees it) is
exported for every layout. Per-stage timelines come from `--trace-file` at shutdown.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeserve.engine.async_engine import AsyncEngine
from pipeserve.entrypoints.openai.dashboard.window import LiveRequestStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_RECOVERY_BUCKETS = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class EngineCollector(Collector):
    """Reads the engine's instantaneous state when Prometheus scrapes (nothing is stored between scrapes)."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily("pipeserve_num_requests_running", "Requests being computed, per virtual "
                                    "engine", labels=["virtual_engine"])
        waiting = GaugeMetricFamily("pipeserve_num_requests_waiting", "Requests queued, per virtual engine",
                                    labels=["virtual_engine"])
        used = GaugeMetricFamily("pipeserve_kv_blocks_used", "KV cache blocks referenced by requests, per virtual "
                                 "engine (zero when idle)", labels=["virtual_engine"])
        cached = GaugeMetricFamily("pipeserve_kv_blocks_cached", "Free KV cache blocks that keep a cached prefix "
                                   "until evicted, per virtual engine", labels=["virtual_engine"])
        queries = CounterMetricFamily("pipeserve_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache, per virtual engine", labels=["virtual_engine"])
        hits = CounterMetricFamily("pipeserve_prefix_cache_hits", "Prompt tokens found in the prefix cache, per "
                                   "virtual engine", labels=["virtual_engine"])
        total = GaugeMetricFamily("pipeserve_kv_blocks_total", "KV cache blocks, per virtual engine",
                                  labels=["virtual_engine"])
        for ve, s in enumerate(self.engine.stats()):
            for family, value in ((running, s.running), (waiting, s.waiting), (used, s.used_blocks),
                                  (total, s.total_blocks), (cached, s.cached_blocks),
                                  (queries, s.prefix_cache_queries), (hits, s.prefix_cache_hits)):
                family.add_metric([str(ve)], value)
        yield from (running, waiting, used, total, cached, queries, hits)
        yield CounterMetricFamily("pipeserve_pipeline_busy_seconds", "Seconds with at least one step in flight",
                                  value=self.engine.busy_clock.seconds())
        busy = self.engine.executor.busy_seconds()
        if busy is not None:
            stage = CounterMetricFamily("pipeserve_stage_busy_seconds", "Compute seconds per pipeline stage",
                                        labels=["stage"])
            for rank, seconds in enumerate(busy):
                stage.add_metric([str(rank)], seconds)
            yield stage
        yield from self._recovery_metrics()

    def _recovery_metrics(self) -> Iterator[Metric]:
        yield CounterMetricFamily("pipeserve_requests_recomputed", "Requests recomputed from prompt and outputs "
                                  "after a stage failure", value=self.engine.num_recomputed())
        log = self.engine.executor.recoveries
        if log is None:
            return  # this layout (one process) has no stage to restart
        restarts = CounterMetricFamily("pipeserve_stage_restarts", "Pipeline stages replaced after a failure",
                                       labels=["stage"])
        for stage in range(self.engine.config.parallel.pipeline_parallel_size):
            restarts.add_metric([str(stage)], log.restarts_by_stage.get(stage, 0))
        yield restarts
        yield _histogram("pipeserve_recovery_seconds", "From a stage failure's detection to the pipeline running "
                         "again", log.durations(), _RECOVERY_BUCKETS)


def _histogram(name: str, doc: str, values: list[float], buckets: tuple[float, ...]) -> HistogramMetricFamily:
    """A histogram built at scrape time from every observation so far (recoveries are few)."""
    counts = [(str(b), sum(v <= b for v in values)) for b in buckets] + [("+Inf", len(values))]
    return HistogramMetricFamily(name, doc, buckets=counts, sum_value=sum(values))


class ServerMetrics:
    """Every series the server exports, in a registry of its own."""

    def __init__(self, engine: AsyncEngine):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        r = self.registry
        self.prompt_tokens = Counter("pipeserve_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("pipeserve_generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("pipeserve_request_success", "Finished requests by finish reason (abort: the "
                                "client went away)", ["finished_reason"], registry=r)
        self.ttft = Histogram("pipeserve_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pipeserve_inter_token_latency_seconds", "Gap between successive tokens of a "
                             "request", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pipeserve_e2e_request_latency_seconds", "Arrival to finish (or abort)",
                             buckets=_E2E_BUCKETS, registry=r)
        self.live = LiveRequestStats()  # the dashboard's last minute

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one engine request's TTFT, inter-token gaps, token counts and end."""

    def __init__(self, metrics: ServerMetrics, arrival: float, num_prompt_tokens: int):
        self.metrics, self.arrival, self.last = metrics, arrival, arrival
        self.num_tokens = 0
        self.first = arrival  # when the first output token came
        metrics.prompt_tokens.inc(num_prompt_tokens)

    def tokens(self, total: int) -> None:
        """The request now has `total` output tokens."""
        new = total - self.num_tokens
        if new <= 0:
            return
        now = time.monotonic()
        if self.num_tokens == 0:
            self.metrics.ttft.observe(now - self.arrival)
            self.metrics.live.first_token(now - self.arrival)
            self.first = now
        else:
            self.metrics.itl.observe(now - self.last)
        self.metrics.generation_tokens.inc(new)
        self.metrics.live.tokens(new)
        self.num_tokens, self.last = total, now

    def finished(self, reason: str) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.arrival)
        self.metrics.live.finished(self.last - self.first, self.num_tokens)
        self.metrics.requests.labels(finished_reason=reason).inc()
