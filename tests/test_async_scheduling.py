"""Async scheduling on the CPU (forced on with `async_scheduling=True`; CUDA turns it on by default): decodes are
planned before the previous token reaches the host, the stage filling in the token from the ids it keeps on
the device. Outputs equal the synchronous engine's token for token (greedy and seeded), a request that stops
one step late never shows its extra token, and nothing is leaked."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import pytest
import torch
from decode_driver import HostTransfers, make_runners, placeholder_step, run_scenario
from helpers import fake_step, leftover_bookkeeping, tiny_with_tokenizer

from pipeserve import LLM, SamplingParams
from pipeserve.config import SchedulerConfig
from pipeserve.engine.arg_utils import EngineArgs
from pipeserve.engine.block_manager import BlockManager
from pipeserve.engine.request import Request
from pipeserve.engine.scheduler import Scheduler
from pipeserve.engine.startup import build_async_engine
from pipeserve.entrypoints.engine_flags import add_engine_flags, engine_kwargs
from pipeserve.executor.uniproc import UniProcExecutor
from pipeserve.types import PLACEHOLDER
from pipeserve.worker.sampled_ids import PendingStep

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [20, 21], list(range(30, 60)), [7, 7, 7]]
ENGINE = dict(device="cpu", dtype="float32", num_kv_blocks=96, block_size=4, max_model_len=128, seed=0,
              max_num_batched_tokens=32)


def generate(model: str, params, prompts=PROMPTS, on_output=None, **kwargs):
    """(outputs, per-VE stats, what the engine still holds) of one run."""
    with LLM(model, **{**ENGINE, **kwargs}) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, on_output=on_output)
        return outs, llm.engine.stats(), leftover_bookkeeping(llm.engine)


def summary(outs) -> list:
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.text) for c in o.outputs] for o in outs]


def params_mix(stop_token: int) -> list[SamplingParams]:
    """Different lengths, a stop token reached mid-batch, min_tokens, logprobs, n > 1, seeded sampling."""
    return [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_token]),
            SamplingParams(temperature=0, max_tokens=9, logprobs=2, ignore_eos=True),
            SamplingParams(temperature=0.9, top_k=30, seed=11, max_tokens=12, n=2, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=15, min_tokens=6, stop_token_ids=[stop_token])]


def test_the_scheduler_plans_one_decode_ahead_and_drops_it_after_a_stop():
    """Without a model: while a decode is in flight the request's next decode is planned with a placeholder id
    (one, not more); a stop token in the first step ends the request, the second step's token is dropped, and
    its blocks are free at once."""
    cfg = SchedulerConfig(max_num_batched_tokens=16, max_model_len=64)
    s = Scheduler(cfg, BlockManager(16, 4), eos_token_ids=(99,), plan_ahead=True)
    req = Request("r", [1, 2, 3], SamplingParams(temperature=0, max_tokens=10), 10)
    s.add_request(req)
    s.update(fake_step(s.schedule(), 5))  # the prefill; its token is back
    first = s.schedule()
    assert first.decodes.token_ids == [5] and s.num_planned_ahead == 0
    second = s.schedule()
    assert second.decodes.token_ids == [PLACEHOLDER] and second.decodes.start_pos == [4]
    assert second.decodes.num_output_tokens == [2] and s.num_planned_ahead == 1
    assert s.schedule().is_empty  # never two ahead
    s.update(fake_step(first, 99))  # EOS: finished one step late
    assert req.status.finished and req.output_token_ids == [5, 99]
    assert s.block_manager.num_used_blocks == 0
    assert s.update(fake_step(second, 42)) == [] and req.output_token_ids == [5, 99]
    assert s.schedule().finished_req_ids == ["r"] and s.num_steps_in_flight == 1


def test_outputs_equal_sync_and_steps_are_planned_ahead(tiny_model):
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reference, _, _ = generate(tiny_model, plain, async_scheduling=False)
    stop_token = reference[1].outputs[0].token_ids[4]  # request 1 stops mid-batch, one step late on async
    params = params_mix(stop_token)
    sync, sync_stats, _ = generate(tiny_model, params, async_scheduling=False)
    ours, stats, leftover = generate(tiny_model, params, async_scheduling=True)
    assert summary(ours) == summary(sync)
    assert sync[1].outputs[0].finish_reason == "stop" and len(sync[1].outputs[0].token_ids) <= 5
    for a, b in zip(sync[2].outputs[0].logprobs, ours[2].outputs[0].logprobs, strict=True):
        assert a.keys() == b.keys()
        for t in a:
            assert b[t].logprob == pytest.approx(a[t].logprob, abs=1e-5)
    assert sum(s.num_planned_ahead for s in stats) > 0 and sum(s.num_planned_ahead for s in sync_stats) == 0
    assert max(s.max_steps_in_flight for s in stats) == 2
    assert leftover == {} and all(s.used_blocks == 0 for s in stats)


def test_the_token_after_a_stop_is_never_streamed(tiny_model):
    """Every intermediate output is a prefix of the final one, which equals the synchronous output: the token
    sampled by the step planned after the stop never reaches a listener, its usage or its finish reason."""
    reference, _, _ = generate(tiny_model, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    stops = [o.outputs[0].token_ids[3] for o in reference]
    params = [SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[s]) for s in stops]
    seen: dict[int, list] = {}
    sync, _, _ = generate(tiny_model, params, async_scheduling=False)
    ours, _, leftover = generate(tiny_model, params, async_scheduling=True,
                                 on_output=lambda i, o: seen.setdefault(i, []).append(o))
    assert summary(ours) == summary(sync)
    for i, outs in seen.items():
        final = ours[i].outputs[0].token_ids
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
        for o in outs:
            assert final[: len(o.outputs[0].token_ids)] == o.outputs[0].token_ids
        assert outs[-1].outputs[0].token_ids == final and final[-1] == stops[i]
    assert leftover == {}


def test_stop_strings_apply_one_step_late_with_the_same_output(tmp_path_factory):
    model = tiny_with_tokenizer(tmp_path_factory)
    reference, _, _ = generate(model, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    text = reference[0].outputs[0].text
    stop = text[len(text) // 3: len(text) // 3 + 2] or text[:1]
    params = SamplingParams(temperature=0, max_tokens=16, stop=[stop], ignore_eos=True)
    sync, _, _ = generate(model, params, async_scheduling=False)
    ours, stats, leftover = generate(model, params, async_scheduling=True)
    assert summary(ours) == summary(sync) and sync[0].outputs[0].finish_reason == "stop"
    assert sum(s.num_planned_ahead for s in stats) > 0 and leftover == {}


def test_penalized_requests_make_steps_synchronous(tiny_model):
    """A penalty needs the tokens on the host: while a penalized request runs nothing is planned ahead (the
    others would otherwise leave it every other step), and the outputs still equal the synchronous ones."""
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.5)] + \
        [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * 4
    sync, _, _ = generate(tiny_model, params, async_scheduling=False)
    ours, stats, leftover = generate(tiny_model, params, async_scheduling=True)
    assert summary(ours) == summary(sync)
    assert sum(s.num_planned_ahead for s in stats) == 0 and leftover == {}


@pytest.mark.parametrize("kwargs", [dict(num_kv_blocks=24, max_model_len=64), dict(num_virtual_engines=2)],
                         ids=["preemption", "two-virtual-engines"])
def test_preemption_and_virtual_engines(tiny_model, kwargs):
    """A pool too small for every request preempts requests with steps planned ahead in flight (their results
    are dropped and they recompute); two virtual engines at PP=1 share one stage and its kept ids."""
    prompts = [list(range(10 + i, 22 + i)) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    sync, sync_stats, _ = generate(tiny_model, params, prompts, async_scheduling=False, **kwargs)
    ours, stats, leftover = generate(tiny_model, params, prompts, async_scheduling=True, **kwargs)
    assert summary(ours) == summary(sync)
    assert sum(s.num_planned_ahead for s in stats) > 0 and leftover == {}
    assert len(stats) == kwargs.get("num_virtual_engines", 1)
    if "num_kv_blocks" in kwargs:
        assert sum(s.num_preemptions for s in stats) > 0 and sum(s.num_preemptions for s in sync_stats) > 0


def _engine(model: str, async_scheduling: bool, offload: bool = False):
    config = EngineArgs(model, **ENGINE, async_scheduling=async_scheduling).create_engine_config()
    return build_async_engine(config, offload=offload)


async def _arrival_and_abort(engine) -> tuple[list[int], list[int], int]:
    """A streams; B arrives after A's third token; A is aborted after its eighth. (B's tokens, A's tokens,
    decodes planned ahead while A and B ran.)"""
    greedy = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    async with engine.running():
        a = engine.add_request(PROMPTS[0], greedy)
        b_stream, a_tokens = None, []
        async for out in a:
            a_tokens = out.outputs[0].token_ids
            if len(a_tokens) >= 3 and b_stream is None:
                b_stream = engine.add_request(PROMPTS[1], greedy)
            if len(a_tokens) >= 8:
                planned = sum(s.num_planned_ahead for s in engine.stats())
                engine.abort(a.request_id)
                break
        b_tokens = []
        async for out in b_stream:
            b_tokens = out.outputs[0].token_ids
    return b_tokens, a_tokens, planned


@pytest.mark.parametrize("offload", [False, True], ids=["inline", "thread"])
def test_arrival_mid_stream_and_abort(tiny_model, offload):
    """The server's executor issues steps from a thread (`offload`), offline generation inline."""
    results = {}
    for async_scheduling in (False, True):
        engine = _engine(tiny_model, async_scheduling, offload)
        try:
            results[async_scheduling] = asyncio.run(_arrival_and_abort(engine))
            assert leftover_bookkeeping(engine) == {}
            assert all(s.used_blocks == 0 and s.running == 0 for s in engine.stats())
        finally:
            engine.shutdown()
    (b_sync, a_sync, _), (b_async, a_async, planned) = results[False], results[True]
    assert b_async == b_sync and len(b_sync) == 14
    shorter, longer = sorted((a_sync, a_async), key=len)  # streams may hand over several tokens at once
    assert longer[: len(shorter)] == shorter and len(shorter) >= 8
    assert planned > 0


class _LateTokens(PendingStep):
    """A step whose tokens reach the host late, as a GPU's do: not before the next step is issued (or 0.2 s
    have passed, when none is). Notes when they are read."""

    def __init__(self, pending: PendingStep, step_id: int, events: list, issued: dict):
        self.pending, self.step_id, self.events, self.issued = pending, step_id, events, issued

    def ready(self) -> bool:
        return False

    def result(self):
        self.issued.setdefault(self.step_id + 1, threading.Event()).wait(0.2)
        self.events.append(("result", self.step_id))
        return self.pending.result()


def test_the_next_step_is_issued_while_the_previous_tokens_are_on_their_way(tiny_model):
    """The overlap itself: with tokens that come back late (the executor waits for them in its waiter thread),
    step k + 1 is issued before step k's tokens are read; the outputs still equal the synchronous ones."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    events, outputs = [], {}
    for async_scheduling in (False, True):
        engine = _engine(tiny_model, async_scheduling)
        issued: dict[int, threading.Event] = {}
        run_step = engine.executor.worker.run_step

        def issue(sched, generation=0, defer=False, run_step=run_step, issued=issued):
            events.append(("issue", sched.step_id))
            issued.setdefault(sched.step_id, threading.Event()).set()
            out = run_step(sched, generation, defer)
            return _LateTokens(out, sched.step_id, events, issued) if isinstance(out, PendingStep) else out

        engine.executor.worker.run_step = issue
        events.clear()

        async def one(engine=engine):
            async with engine.running():
                async for out in engine.add_request(PROMPTS[0], params):
                    final = out
            return final.outputs[0].token_ids

        try:
            outputs[async_scheduling] = asyncio.run(one())
        finally:
            engine.shutdown()
    assert outputs[True] == outputs[False] and len(outputs[True]) == 12
    order = {event: i for i, event in enumerate(events)}
    overlapped = [k for kind, k in events if kind == "result" and ("issue", k + 1) in order
                  and order[("issue", k + 1)] < order[("result", k)]]
    assert len(overlapped) >= 9, str(events)  # every decode step but the last (the prefill's token is awaited)


def test_placeholders_need_an_executor_that_keeps_ids(tiny_model):
    """Only an executor whose stage keeps the sampled ids on the device plans ahead."""
    on = _engine(tiny_model, True)
    off = _engine(tiny_model, False)
    try:
        assert isinstance(on.executor, UniProcExecutor) and on.executor.holds_sampled_ids and on.plans_ahead
        assert not off.executor.holds_sampled_ids and not off.plans_ahead
        assert on.steps_in_flight_per_ve == 2 and off.steps_in_flight_per_ve == 1
    finally:
        on.shutdown()
        off.shutdown()


@pytest.mark.parametrize("static", [False, True])
def test_a_deferred_step_brings_its_ids_to_the_host_once_when_asked(tiny_model, monkeypatch, static):
    """Issuing a step with placeholders reads nothing back; its result is the step's one transfer, and equals
    the tokens of the same step run with the real ids."""
    runners = make_runners(tiny_model, 1, static=static)
    _, scenario = run_scenario(runners, execute=True)
    runner, states, sched, expected = placeholder_step(runners, scenario, "cpu")
    with torch.inference_mode():
        counter = HostTransfers(monkeypatch)
        pending = runner.execute(sched, None, states.batch, defer=True)
        issued = list(counter.calls)
        step = pending.result()
        monkeypatch.undo()
    assert isinstance(pending, PendingStep) and issued == [] and counter.calls == ["tolist"]
    assert step.sampled == expected


def test_flag_and_device_defaults(tiny_model):
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    assert engine_kwargs(parser.parse_args(["--async-scheduling"]))["async_scheduling"] is True
    assert engine_kwargs(parser.parse_args(["--no-async-scheduling"]))["async_scheduling"] is False
    assert engine_kwargs(parser.parse_args([]))["async_scheduling"] is None
    args = EngineArgs()
    assert args.scheduler_config(128, 1, "cpu").async_scheduling is False  # CPU outputs stay as they were
    assert args.scheduler_config(128, 1, "cuda").async_scheduling is True
    assert EngineArgs(async_scheduling=False).scheduler_config(128, 1, "cuda").async_scheduling is False


@pytest.mark.slow
def test_pipeline_parallel_outputs_equal_sync(tiny_model):
    """At PP=2 the last stage's ids return to the engine, so decodes wait for them whatever the flag says."""
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reference, _, _ = generate(tiny_model, plain)
    params = params_mix(reference[1].outputs[0].token_ids[4])
    sync, _, _ = generate(tiny_model, params)
    ours, stats, leftover = generate(tiny_model, params, async_scheduling=True, pipeline_parallel_size=2,
                                     threads_per_worker=1)
    assert summary(ours) == summary(sync)
    assert sum(s.num_planned_ahead for s in stats) == 0 and leftover == {}


def test_server_streams_and_counts_no_extra_token(tiny_model):
    """The server (steps issued from a thread): a stream that ends on a stop token one step late reports the
    synchronous engine's text, finish reason and usage."""
    from fastapi.testclient import TestClient

    from pipeserve.entrypoints.openai.api_server import ServeSettings, build_app
    from pipeserve.entrypoints.openai.launcher import build_engine

    reference, _, _ = generate(tiny_model, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                               [PROMPTS[1]], async_scheduling=False)
    stop = reference[0].outputs[0].token_ids[3]
    want = reference[0].outputs[0].token_ids[: reference[0].outputs[0].token_ids.index(stop) + 1]
    engine = build_engine(EngineArgs(tiny_model, **ENGINE, async_scheduling=True))
    body = {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "stop_token_ids": [stop], "stream": True,
            "stream_options": {"include_usage": True}}
    with TestClient(build_app(engine, ServeSettings(served_model_names=["tiny"]))) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == len(want)
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
        assert sum(s.num_planned_ahead for s in engine.stats()) > 0
        for _ in range(500):  # the step planned after the stop may still be in flight: its result is dropped
            if not leftover_bookkeeping(engine):
                break
            time.sleep(0.01)
        assert leftover_bookkeeping(engine) == {}
