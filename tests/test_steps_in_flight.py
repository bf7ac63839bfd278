"""How many steps the virtual engines keep in flight, over a fake two-stage pipeline (no model, no processes).

A lone long prompt has its chunks in every stage at once, up to `max_steps_in_flight_per_ve`; a decode is
never planned before its previous token is back."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from helpers import FAKE_MODEL

from pipeserve.config import EngineConfig, ParallelConfig, SchedulerConfig
from pipeserve.engine.async_engine import AsyncEngine
from pipeserve.executor.base import Executor
from pipeserve.sampling_params import SamplingParams
from pipeserve.types import SchedulerOutput, StepOutput
from pipeserve.worker.request_states import RequestStates

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


class SlowPipeline(Executor):
    """Each step takes a little while. Notes, as each step is issued: its VE, whether that VE already had a
    step in flight, how many steps with prompt chunks were in flight, and the step's decodes and prompt
    tokens. Next token: the context length mod 100."""

    def __init__(self) -> None:
        self.generation = 0
        self.in_flight: dict[tuple[int, int], bool] = {}  # (VE, step id) -> computes prompt chunks
        self.issued: list[tuple[int, bool, int, int, int]] = []
        self.requests_in_flight: dict[tuple[int, int], set[str]] = {}
        self.early_decodes: list[str] = []  # decodes issued while a step of the same request was in flight
        self.stage = RequestStates()  # plans are read whole, as a stage resolves them

    async def execute(self, sched: SchedulerOutput, generation: int | None = None) -> StepOutput:
        ve, entries = sched.virtual_engine, self.stage.resolve(sched).requests
        decodes = sum(r.is_decode for r in entries)
        prompt_tokens = sum(r.num_tokens for r in entries if not r.is_decode)
        second = any(v == ve for v, _ in self.in_flight)
        self.issued.append((ve, second, sum(self.in_flight.values()), decodes, prompt_tokens))
        busy = set().union(*self.requests_in_flight.values())
        self.early_decodes += [r.req_id for r in entries if r.is_decode and r.req_id in busy]
        self.in_flight[(ve, sched.step_id)] = prompt_tokens > 0
        self.requests_in_flight[(ve, sched.step_id)] = {r.req_id for r in entries}
        await asyncio.sleep(0.002)
        del self.in_flight[(ve, sched.step_id)], self.requests_in_flight[(ve, sched.step_id)]
        return StepOutput(sched.step_id, ve, {r.req_id: r.context_len % 100 for r in entries if r.samples})

    def collect_stats(self):
        return []

    def shutdown(self) -> None:
        pass


def run(prompts: list[list[int]]) -> tuple[SlowPipeline, list[list[int]]]:
    executor = SlowPipeline()
    config = EngineConfig(FAKE_MODEL, scheduler=SchedulerConfig(max_num_batched_tokens=8, max_model_len=256,
                                                           max_steps_in_flight_per_ve=2),
                          parallel=ParallelConfig(pipeline_parallel_size=2), num_virtual_engines=2,
                          num_blocks_per_ve=64)
    engine = AsyncEngine(config, executor, tokenizer=None)

    async def go() -> list[list[int]]:
        async with engine.running():
            streams = [engine.add_request(p, PARAMS) for p in prompts]

            async def last(stream) -> list[int]:
                outs = [out async for out in stream]
                return outs[-1].outputs[0].token_ids

            return await asyncio.gather(*(last(s) for s in streams))

    return executor, asyncio.run(go())


def expected(prompt: list[int]) -> list[int]:
    return [(len(prompt) + i) % 100 for i in range(PARAMS.max_tokens)]


def test_a_lone_long_prompt_has_a_chunk_in_every_stage():
    prompt = list(range(1, 41))  # five chunks of 8
    executor, outs = run([prompt])
    assert outs == [expected(prompt)]
    assert any(second for _, second, _, _, _ in executor.issued)


def test_decodes_wait_for_their_token_while_chunks_go_ahead():
    prompts = [list(range(1, 41)), list(range(2, 42)), [5, 6, 7], list(range(3, 30)), list(range(9, 30)), [8, 9]]
    executor, outs = run(prompts)
    assert outs == [expected(p) for p in prompts]
    assert any(second for _, second, _, _, _ in executor.issued)  # chunks went ahead
    assert executor.early_decodes == []  # no decode before its previous token was back


def test_one_step_per_virtual_engine_when_asked():
    executor = SlowPipeline()
    config = EngineConfig(FAKE_MODEL, scheduler=replace(SchedulerConfig(max_model_len=256, max_num_batched_tokens=8),
                                                   max_steps_in_flight_per_ve=1),
                          parallel=ParallelConfig(pipeline_parallel_size=2), num_virtual_engines=2,
                          num_blocks_per_ve=64)
    engine = AsyncEngine(config, executor, tokenizer=None)

    async def go() -> None:
        async with engine.running():
            async for _ in engine.add_request(list(range(1, 41)), PARAMS):
                pass

    asyncio.run(go())
    assert not any(second for _, second, _, _, _ in executor.issued)
