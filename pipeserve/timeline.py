"""Step timelines of the pipeline stages: busy fractions, Chrome traces (Perfetto) and a Gantt chart."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass


@dataclass
class StepRecord:
    """One step as one stage ran it (wall-clock seconds)."""

    virtual_engine: int
    step_id: int
    stage: int
    start: float
    end: float
    kind: str  # prefill, decode or mixed
    num_tokens: int



class BusyClock:
    """Seconds during which at least one step was in flight: the union of the steps' spans, each from
    `step_started` to its `step_ended`, however much they overlap.

    The engine keeps one over every VE's steps (`busy / elapsed`: the share of time the pipeline had work, what
    it can observe without asking the stage processes). A stage with async scheduling keeps one over the
    spans of its steps from issue to their tokens reaching the host, which end on the waiter thread: hence
    the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._since = 0.0
        self._total = 0.0

    def step_started(self) -> None:
        with self._lock:
            if self._in_flight == 0:
                self._since = time.monotonic()
            self._in_flight += 1

    def step_ended(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._total += time.monotonic() - self._since

    def seconds(self) -> float:
        with self._lock:
            running = time.monotonic() - self._since if self._in_flight else 0.0
            return self._total + running

def stage_records(stats: list[dict]) -> list[StepRecord]:
    """The step records in executor stats, one rank per stage (TP ranks of a stage run the same steps)."""
    return [r for rank in stats if rank.get("tp_rank", 0) == 0 for r in rank["records"]]


def busy_fractions(records: list[StepRecord], num_stages: int, t0: float, t1: float) -> list[float]:
    """Fraction of [t0, t1] each stage spent computing."""
    busy = [0.0] * num_stages
    for r in records:
        busy[r.stage] += max(0.0, min(r.end, t1) - max(r.start, t0))
    return [b / (t1 - t0) for b in busy]


def bubble_fraction(busy: list[float]) -> float:
    """Share of stage-time left idle: 0 is a perfectly full pipeline."""
    return 1.0 - sum(busy) / len(busy)


RECOVERY_ROW = -1  # the trace row that shows recoveries from stage failures


@dataclass
class Span:
    """A stretch of wall-clock time worth marking on a timeline (a recovery from a stage failure)."""

    start: float
    end: float
    label: str


def write_chrome_trace(records: list[StepRecord], path: str, spans: list[Span] = ()) -> None:
    """One row per stage, one slice per step, named by virtual engine (opens in Perfetto / chrome://tracing);
    recoveries on a row of their own."""
    t0 = min([r.start for r in records] + [s.start for s in spans], default=0.0)
    stages = sorted({r.stage for r in records})
    events: list[dict] = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": s, "args": {"name": f"stage {s}"}}
                          for s in stages]
    for r in records:
        events.append({"name": f"VE{r.virtual_engine} {r.kind}", "cat": r.kind, "ph": "X", "pid": 0, "tid": r.stage,
                       "ts": (r.start - t0) * 1e6, "dur": (r.end - r.start) * 1e6, "args": asdict(r)})
    if spans:
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": RECOVERY_ROW, "args": {"name": "recovery"}})
    for s in spans:
        events.append({"name": "recovery", "cat": "recovery", "ph": "X", "pid": 0, "tid": RECOVERY_ROW,
                       "ts": (s.start - t0) * 1e6, "dur": (s.end - s.start) * 1e6, "args": {"cause": s.label}})
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)


def write_gantt_png(records: list[StepRecord], path: str, title: str = "pipeline timeline",
                    spans: list[Span] = ()) -> None:
    """A Gantt chart: a row per stage, steps coloured by virtual engine, recoveries shaded red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min([r.start for r in records] + [s.start for s in spans], default=0.0)
    stages = sorted({r.stage for r in records})
    ves = sorted({r.virtual_engine for r in records})
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * len(stages)))
    for r in records:
        ax.barh(r.stage, (r.end - r.start) * 1e3, left=(r.start - t0) * 1e3, height=0.6,
                color=colours(r.virtual_engine % 10), edgecolor="black", linewidth=0.2)
    for s in spans:
        ax.axvspan((s.start - t0) * 1e3, (s.end - t0) * 1e3, color="red", alpha=0.2)
    ax.set_yticks(stages, [f"stage {s}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(v % 10)) for v in ves]
    ax.legend(handles, [f"virtual engine {v}" for v in ves], loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_trace(records: list[StepRecord], path: str, spans: list[Span] = ()) -> str:
    """Write `path` (Chrome JSON) and a PNG beside it; returns the PNG's path."""
    write_chrome_trace(records, path, spans)
    png = os.path.splitext(path)[0] + ".png"
    write_gantt_png(records, png, spans=spans)
    return png
