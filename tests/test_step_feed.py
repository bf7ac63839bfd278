"""The live step feed: switched on by the first watcher and off by the last (WatchSteps to each stage's first
TP rank), re-armed for a stage that replaces a failed one, records placed on the engine's clock by an offset
measured with pings; in process (PP=1) and across stage processes (PP=2, slow), a killed stage included."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeserve import LLM, SamplingParams
from pipeserve.control.messages import Ping, Pong, StepRecords, WatchSteps
from pipeserve.distributed.rank_layout import RankLayout
from pipeserve.executor.clock_sync import ClockSync
from pipeserve.executor.step_feed import CLOCK_PINGS, RankStepFeed
from pipeserve.timeline import StepRecord

PROMPTS = [{"prompt_token_ids": list(range(3 + i, 12 + i))} for i in range(4)]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_clock_offset_is_the_stage_clock_minus_the_round_trips_midpoint():
    clock = ClockSync()
    clock.sent(1, -1, at=100.0)
    assert clock.answered(1, -1, stage_wall=130.5, at=100.2) == pytest.approx(30.4)  # 130.5 - 100.1
    clock.sent(1, -2, at=101.0)  # a longer round trip: less certain, not taken
    assert clock.answered(1, -2, stage_wall=131.9, at=102.0) == pytest.approx(30.4)
    clock.sent(1, -3, at=103.0)  # a shorter one is
    assert clock.answered(1, -3, stage_wall=133.05, at=103.02) == pytest.approx(30.04)
    assert clock.answered(1, -99, stage_wall=0.0) is None  # no ping of ours
    assert clock.offsets() == {1: pytest.approx(30.04)}
    clock.forget(1)  # a replaced process: measured again
    assert clock.offset(1) == 0.0 and clock.offsets() == {}


class Sent:
    """What the feed sends, to which rank (standing in for the executor's connections)."""

    def __init__(self) -> None:
        self.messages: list[tuple[int, object]] = []

    def __call__(self, rank: int, msg: object) -> None:
        self.messages.append((rank, msg))

    def take(self) -> list[tuple[int, object]]:
        out, self.messages = self.messages, []
        return out


def test_first_watcher_turns_the_stages_on_and_the_last_turns_them_off():
    sent = Sent()
    feed = RankStepFeed(RankLayout(2, 2), sent)  # ranks 0,1 are stage 0; 2,3 stage 1: one per stage is told
    assert not feed.watching and sent.take() == []
    feed.subscribe()
    assert sent.take() == [(0, WatchSteps(True)), (2, WatchSteps(True))]
    feed.subscribe()
    feed.unsubscribe()
    assert sent.take() == [] and feed.watching  # a second page changes nothing for the stages
    feed.unsubscribe()
    assert sent.take() == [(0, WatchSteps(False)), (2, WatchSteps(False))] and not feed.watching
    feed.unsubscribe()  # one too many is harmless
    assert sent.take() == [] and not feed.watching


def test_a_joining_stage_is_timed_and_rearmed_while_watched():
    sent = Sent()
    feed = RankStepFeed(RankLayout(2, 2), sent)
    feed.joined([2, 3], generation=4)  # nobody watches: pings only, to the stage's first rank
    msgs = sent.take()
    assert [r for r, _ in msgs] == [2] * CLOCK_PINGS and all(isinstance(m, Ping) and m.nonce < 0 for _, m in msgs)
    feed.subscribe()
    sent.take()
    feed.joined([2, 3], generation=5)  # a replacement while a page is open is told to send again
    msgs = sent.take()
    assert msgs[-1] == (2, WatchSteps(True)) and len(msgs) == CLOCK_PINGS + 1
    # its pongs give its offset (negative nonces: never a formation's liveness ping), and its records move by it
    ping = msgs[0][1]
    now = time.time()
    pong = Pong(2, ping.nonce, 5, wall=now + 10.0)
    assert feed.is_clock_pong(pong) and not feed.is_clock_pong(Pong(2, 7, 5))
    feed.pong(2, pong)
    assert feed.clock_offsets()[1] == pytest.approx(10.0, abs=1.0)
    offset = feed.clock_offsets()[1]
    feed.received(2, StepRecords(2, (StepRecord(0, 1, 1, now + 10.0, now + 10.5, "decode", 4),)))
    (record,) = feed.recent()[1]
    assert record.start == pytest.approx(now + 10.0 - offset) and record.end - record.start == pytest.approx(0.5)
    feed.unsubscribe()
    assert feed.recent() == [[], []]  # nothing kept for nobody
    feed.received(2, StepRecords(2, (StepRecord(0, 2, 1, now, now + 0.1, "decode", 4),)))
    assert feed.recent() == [[], []]  # a batch that was on its way when the last page closed


def test_in_process_stage_keeps_records_only_while_watched(tiny_model):
    llm = LLM(tiny_model, dtype="float32", max_model_len=64, num_kv_blocks=32, threads_per_worker=1)
    try:
        executor = llm.engine.executor
        feed, worker = executor.step_feed, executor.worker
        llm.generate(PROMPTS, PARAMS)
        assert worker.feed is None and feed.recent() == [[]]
        feed.subscribe()
        t0 = time.time()
        llm.generate(PROMPTS, PARAMS)
        (records,) = feed.recent()
        assert records and all(r.stage == 0 and t0 <= r.start <= r.end <= time.time() for r in records)
        assert {r.kind for r in records} >= {"decode"} and sum(r.num_tokens for r in records) >= 4 * 12
        feed.unsubscribe()
        assert worker.feed is None
        llm.generate(PROMPTS, PARAMS)
        assert feed.recent() == [[]]
    finally:
        llm.engine.shutdown()


def _eventually(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def _wait_records(feed, stages: set[int], since: float, timeout_s: float = 10.0) -> list[list[StepRecord]]:
    deadline = time.monotonic() + timeout_s
    while True:
        recent = feed.recent()
        if all(any(r.start >= since for r in recent[s]) for s in stages) or time.monotonic() > deadline:
            return recent
        time.sleep(0.1)


@pytest.mark.slow
def test_stage_processes_send_records_while_watched_and_after_a_recovery(tiny_model):
    llm = LLM(tiny_model, dtype="float32", pipeline_parallel_size=2, max_model_len=64, num_kv_blocks=32,
              threads_per_worker=1)
    try:
        executor = llm.engine.executor
        feed = executor.step_feed
        assert _eventually(lambda: set(feed.clock_offsets()) == {0, 1})  # measured when they joined (pongs)
        assert all(abs(o) < 1.0 for o in feed.clock_offsets().values())  # one machine, one clock
        llm.generate(PROMPTS, PARAMS)
        time.sleep(0.5)
        assert feed.recent() == [[], []]  # nobody watched: nothing was sent
        feed.subscribe()
        t0 = time.time()
        llm.generate(PROMPTS, PARAMS)
        recent = _wait_records(feed, {0, 1}, t0)
        for stage in (0, 1):
            assert [r.stage for r in recent[stage]] == [stage] * len(recent[stage]) and recent[stage]
        # a killed stage is replaced; the replacement is timed and sends again (the page stays open)
        old_pid = executor.launcher.pid(1)
        os.kill(old_pid, signal.SIGKILL)
        llm.generate(PROMPTS, PARAMS)  # recovers, then runs
        assert executor.recoveries.spans and executor.launcher.pid(1) != old_pid
        t1 = time.time()
        llm.generate(PROMPTS, PARAMS)
        recent = _wait_records(feed, {0, 1}, t1)
        assert all(any(r.start >= t1 for r in recent[s]) for s in (0, 1))
        assert _eventually(lambda: set(feed.clock_offsets()) == {0, 1})
        feed.unsubscribe()
        llm.generate(PROMPTS, PARAMS)
        time.sleep(0.5)
        assert feed.recent() == [[], []]
    finally:
        llm.engine.shutdown()
