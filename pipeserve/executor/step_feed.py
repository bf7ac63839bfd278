"""The live step feed: every stage's step records as they happen, for the dashboard, only while someone watches.

Nothing is recorded for the feed while nobody watches: the first subscriber turns it on (WatchSteps(on=True) to
each stage's first TP rank, whose steps its TP peers share), the last one turns it off. A stage process then
sends its records in StepRecords batches a few times a second (worker/rank_process.py); the engine keeps the
last KEEP_PER_STAGE of each stage, on its own clock: each stage's clock offset is measured by pings when it joins
(clock_sync.py), which matters for stages on other machines. A stage that replaces a failed one is measured and,
if someone watches, told to send again when it joins (`joined`); survivors keep their setting.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from pipeserve.control.messages import Ping, Pong, StepRecords, WatchSteps
from pipeserve.distributed.rank_layout import RankLayout
from pipeserve.executor.clock_sync import ClockSync
from pipeserve.timeline import StepRecord

KEEP_PER_STAGE = 2000  # the records the engine holds per stage for watchers (the page draws the last few hundred)
CLOCK_PINGS = 3  # pings per joining stage; the shortest round trip gives its clock offset


class StepFeed:
    """Step records per stage, kept while at least one watcher is subscribed."""

    def __init__(self, num_stages: int):
        self.num_stages = num_stages
        self._lock = threading.Lock()
        self._watchers = 0
        self.since: float | None = None  # when the feed was last turned on (engine wall clock)
        self._records: list[deque[StepRecord]] = [deque(maxlen=KEEP_PER_STAGE) for _ in range(num_stages)]

    @property
    def watching(self) -> bool:
        return self._watchers > 0

    def subscribe(self) -> None:
        with self._lock:
            self._watchers += 1
            first = self._watchers == 1
            if first:
                self.since = time.time()
        if first:
            self._switch(True)

    def unsubscribe(self) -> None:
        with self._lock:
            if not self._watchers:
                return
            self._watchers -= 1
            last = self._watchers == 0
            if last:
                for d in self._records:
                    d.clear()
        if last:
            self._switch(False)

    def add(self, records: Iterable[StepRecord], offset: float = 0.0) -> None:
        """Keep records (taken on a clock `offset` seconds ahead of the engine's) on the engine's clock."""
        with self._lock:
            if not self._watchers:
                return  # a batch that was on its way when the last watcher left
            for r in records:
                if offset:
                    r = replace(r, start=r.start - offset, end=r.end - offset)
                self._records[r.stage].append(r)

    def recent(self) -> list[list[StepRecord]]:
        """Every stage's kept records, oldest first."""
        self.poll()
        with self._lock:
            return [list(d) for d in self._records]

    def clock_offsets(self) -> dict[int, float]:
        """Seconds each stage's clock is ahead of the engine's, where measured."""
        return {}

    # ---- what an executor provides ----------------------------------------------------------------------

    def _switch(self, on: bool) -> None:
        """Tell the stages to start or stop keeping records for the feed."""

    def poll(self) -> None:
        """Collect records the stages hold (an in-process stage); stage processes send theirs instead."""


class LocalStepFeed(StepFeed):
    """The feed of the in-process executor: its one StageWorker keeps records while watched."""

    def __init__(self, worker: Callable[[], Any]):
        super().__init__(1)
        self._worker = worker  # a getter: the executor drops its worker at shutdown

    def _switch(self, on: bool) -> None:
        worker = self._worker()
        if worker is not None:
            worker.watch_steps(on)

    def poll(self) -> None:
        worker = self._worker()
        if self.watching and worker is not None and worker.feed is not None:
            self.add(worker.drain_feed())


class RankStepFeed(StepFeed):
    """The feed of stage processes: switched by WatchSteps, filled by their StepRecords, clocks by ping."""

    def __init__(self, layout: RankLayout, send: Callable[[int, object], None]):
        super().__init__(layout.pp_size)
        self._send = send
        self.leads = [layout.stage_ranks(s)[0] for s in range(layout.pp_size)]
        self.clock = ClockSync()
        self._nonces = itertools.count(1)

    def _switch(self, on: bool) -> None:
        for r in self.leads:
            self._send(r, WatchSteps(on))

    def joined(self, ranks: Iterable[int], generation: int) -> None:
        """These ranks (new processes) have joined: measure their clocks and, if watched, turn their feed on."""
        for r in ranks:
            if r not in self.leads:
                continue
            self.clock.forget(r)
            for _ in range(CLOCK_PINGS):
                nonce = -next(self._nonces)  # negative: never mistaken for a formation's liveness ping
                self.clock.sent(r, nonce)
                self._send(r, Ping(nonce, generation))
            if self.watching:
                self._send(r, WatchSteps(True))

    @staticmethod
    def is_clock_pong(msg: Pong) -> bool:
        return msg.nonce < 0

    def pong(self, rank: int, msg: Pong) -> None:
        self.clock.answered(rank, msg.nonce, msg.wall)

    def received(self, rank: int, msg: StepRecords) -> None:
        self.add(msg.records, self.clock.offset(rank))

    def clock_offsets(self) -> dict[int, float]:
        offsets = self.clock.offsets()
        return {s: offsets[r] for s, r in enumerate(self.leads) if r in offsets}
