"""The engine's side of a recovery, over a fake executor (no model, no processes): interrupted steps are
recomputed, nothing is lost or repeated, and a request that keeps crashing a stage is failed on its own."""

from __future__ import annotations

import asyncio

import pytest
from helpers import FAKE_MODEL

from pipeserve.config import EngineConfig, SchedulerConfig
from pipeserve.engine.async_engine import AsyncEngine
from pipeserve.executor.base import Executor, StepInterrupted
from pipeserve.executor.recovery_log import RecoveryLog, RecoverySpan
from pipeserve.sampling_params import SamplingParams
from pipeserve.types import SchedulerOutput, StepOutput
from pipeserve.worker.request_states import RequestStates


class FlakyExecutor(Executor):
    """A "model" whose next token is the context length mod 100. A step fails (and the executor recovers
    at once) when it holds a poisoned request, or when `fail_next` is set."""

    def __init__(self, poison: set[int] = frozenset()):
        self.poison, self.fail_next, self.failures = poison, False, 0
        self.recoveries = RecoveryLog()
        self.stage = RequestStates()  # plans are read whole, as a stage resolves them

    async def execute(self, sched: SchedulerOutput, generation: int | None = None) -> StepOutput:
        await asyncio.sleep(0)
        if generation not in (None, self.generation):
            raise StepInterrupted("planned before a failure", lost=False)
        entries = self.stage.resolve(sched, self.generation).requests
        if self.fail_next or any(r.token_ids and r.token_ids[0] in self.poison for r in entries):
            self.fail_next = False
            self.failures += 1
            self.generation += 1  # recovered instantly, stage 1 replaced: the next generation is ready
            self.recoveries.record(RecoverySpan(0.0, 0.0, "stage 1 died", [1], self.generation))
            raise StepInterrupted("stage 1 died")
        return StepOutput(sched.step_id, sched.virtual_engine,
                          {r.req_id: r.context_len % 100 for r in entries if r.samples})

    def collect_stats(self):
        return []

    def shutdown(self) -> None:
        pass


def make_engine(executor: Executor) -> AsyncEngine:
    config = EngineConfig(FAKE_MODEL, scheduler=SchedulerConfig(max_num_batched_tokens=64, max_model_len=256),
                          num_virtual_engines=2, num_blocks_per_ve=64)
    return AsyncEngine(config, executor, tokenizer=None)


async def run(engine: AsyncEngine, prompts: list[list[int]], on_token=None) -> list:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    async with engine.running():
        streams = [engine.add_request(p, params) for p in prompts]

        async def collect(stream):
            seen = []
            try:
                async for out in stream:
                    ids = out.outputs[0].token_ids
                    assert ids[: len(seen)] == seen, "a streamed token was retracted"
                    seen = list(ids)
                    if on_token:
                        on_token()
                return seen
            except Exception as exc:  # noqa: BLE001 - returned for the test to look at
                return exc

        return await asyncio.gather(*(collect(s) for s in streams))


PROMPTS = [[1, 2, 3], [10, 11], [20, 21, 22, 23], [30]]
EXPECTED = [[(len(p) + i) % 100 for i in range(6)] for p in PROMPTS]


def test_failures_mid_run_lose_and_repeat_nothing():
    executor = FlakyExecutor()
    tokens = 0

    def fail_now_and_then():
        nonlocal tokens
        tokens += 1
        if tokens in (3, 9):
            executor.fail_next = True

    engine = make_engine(executor)
    assert asyncio.run(run(engine, PROMPTS, fail_now_and_then)) == EXPECTED
    assert executor.failures == 2 and engine.num_recomputed() > 0


def test_request_that_crashes_a_stage_twice_is_failed_alone():
    executor = FlakyExecutor(poison={20})
    results = asyncio.run(run(make_engine(executor), PROMPTS))
    assert isinstance(results[2], RuntimeError)
    assert "was in 2 steps in a row that a stage failure lost" in str(results[2])
    assert [r for i, r in enumerate(results) if i != 2] == [e for i, e in enumerate(EXPECTED) if i != 2]
    assert executor.failures == 2  # the second failure isolated it: one suspect per step


def test_a_failed_choice_ends_its_whole_request_and_frees_everything():
    executor = FlakyExecutor(poison={20})
    engine = make_engine(executor)

    async def scenario():
        async with engine.running():
            bad = engine.add_request([20, 21], SamplingParams(n=2, max_tokens=6, ignore_eos=True))
            good = engine.add_request([1, 2, 3], SamplingParams(max_tokens=6, ignore_eos=True))
            with pytest.raises(RuntimeError, match="stage failure lost"):
                async for _ in bad:
                    pass
            return [out async for out in good][-1]

    out = asyncio.run(scenario())
    assert out.outputs[0].token_ids == EXPECTED[0]
    assert not any(engine.bookkeeping().values())


def test_final_failure_fails_every_request_with_its_cause():
    class DeadExecutor(FlakyExecutor):
        async def execute(self, sched, generation=None):
            self.failure = RuntimeError("pipeline stage 1 died; giving up after 3 restarts")
            raise self.failure

    results = asyncio.run(run(make_engine(DeadExecutor()), PROMPTS))
    assert all(isinstance(r, RuntimeError) and "giving up" in str(r) for r in results)


def test_requests_arriving_during_recovery_wait_and_complete():
    class SlowRecovery(FlakyExecutor):
        recovering_for = 0

        @property
        def recovering(self) -> bool:
            return self.recovering_for > 0

        async def wait_ready(self) -> int:
            while self.recovering_for > 0:
                self.recovering_for -= 1
                await asyncio.sleep(0.01)
            return self.generation

    executor = SlowRecovery()
    executor.recovering_for = 5
    executor.generation = 1  # the engine starts while a recovery is running
    assert asyncio.run(run(make_engine(executor), PROMPTS)) == EXPECTED


def test_abort_during_recovery_frees_the_request_blocks():
    class StuckRecovery(FlakyExecutor):
        recovering = False

        async def execute(self, sched, generation=None):
            if self.fail_next:
                self.recovering = True  # the step is lost and the recovery takes a while
            return await super().execute(sched, generation)

        async def wait_ready(self) -> int:
            while self.recovering:
                await asyncio.sleep(0.01)
            return self.generation

    executor = StuckRecovery()
    engine = make_engine(executor)

    async def scenario() -> tuple[int, list[int]]:
        async with engine.running():
            stream = engine.add_request([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
            executor.fail_next = True  # a step is lost once the request holds KV blocks
            while not executor.recovering:
                await asyncio.sleep(0.01)
            held = sum(s.used_blocks for s in engine.stats())
            engine.abort(stream.request_id)  # the client leaves while the pipeline recovers
            used = [s.used_blocks for s in engine.stats()]
            executor.recovering = False
            return held, used

    held, used = asyncio.run(scenario())
    assert held > 0 and used == [0, 0]
    assert not engine.has_unfinished()
