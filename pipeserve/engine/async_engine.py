"""The engine: virtual engines driven concurrently by asyncio over one executor.

Each virtual engine (VE) is a Scheduler over its own KV pool. A VE loop plans steps, awaits the
executor, applies the sampled tokens in planning order, and publishes outputs. A VE keeps up to P steps
in flight (P pipeline stages) when it has work that needs no pending result: the chunks of a long prompt
flow through all stages at once. Decodes wait for their previous token, so with P VEs of decodes about P
steps are in flight, one per VE, which is what keeps every pipeline stage busy.

When a stage fails and the executor recovers, each VE's step in flight is interrupted; the VE waits for
the new generation of the group and has every running request compute its prompt and outputs again on the
stages up to the last replaced one (later stages still hold that KV). Streams only see a pause. A failure
that cannot be recovered fails every request with an error naming the stage.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from pipeserve.config import EngineConfig
from pipeserve.engine.block_manager import BlockManager
from pipeserve.engine.output_processor import OutputProcessor
from pipeserve.engine.placement import choose_virtual_engine
from pipeserve.engine.request import Request, RequestStatus
from pipeserve.engine.request_stream import RequestStream
from pipeserve.engine.scheduler import Scheduler
from pipeserve.engine.stats import VirtualEngineStats
from pipeserve.engine.validation import validate_request
from pipeserve.executor.base import Executor, StepInterrupted
from pipeserve.sampling_params import SamplingParams
from pipeserve.timeline import BusyClock, Span, StepRecord, stage_records, write_trace
from pipeserve.types import SchedulerOutput, StepOutput

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    """Engine-side state of an engine request (one choice): where it runs and who listens."""

    virtual_engine: int
    stream: RequestStream


class AsyncEngine:
    """Accepts requests, assigns each to the least-loaded virtual engine, and streams RequestOutputs."""

    def __init__(self, config: EngineConfig, executor: Executor, tokenizer: Any | None):
        self.config, self.executor, self.tokenizer = config, executor, tokenizer
        # Async scheduling: decodes planned before their previous token reached the host (see Scheduler).
        self.plans_ahead = config.scheduler.async_scheduling and executor.holds_sampled_ids
        self._schedulers = [
            Scheduler(config.scheduler, BlockManager(config.num_blocks_per_ve, config.cache.block_size,
                                                     config.cache.enable_prefix_caching),
                      config.model.eos_token_ids, virtual_engine=i, plan_ahead=self.plans_ahead)
            for i in range(config.num_virtual_engines)
        ]
        self._tracked: dict[str, _Tracked] = {}  # engine request id -> where it runs, who listens
        self._streams: dict[str, RequestStream] = {}  # submitted request id -> its stream (all its choices)
        self.outputs = OutputProcessor(tokenizer)
        self._ids = itertools.count()
        self._wakeups: list[asyncio.Event] = []
        self._error: BaseException | None = None
        self.busy_clock = BusyClock()
        self._shut_down = False

    # ---- requests ------------------------------------------------------------------------------------

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None,
                    request_id: str | None = None, final_only: bool = False,
                    cache_salt: str | None = None) -> RequestStream:
        """Check the request against the engine's limits (`validate_request`: a ValueError names what is wrong,
        and nothing is queued), then queue it on a virtual engine (`choose_virtual_engine`); iterate the result
        (`final_only`: only the finished output, as offline generation needs). Requests with different
        `cache_salt`s never share cached KV."""
        max_tokens = validate_request(self.config, prompt_token_ids, params, cache_salt)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        children = [Request(child_id, prompt_token_ids, child_params, max_tokens, prompt, cache_salt)
                    for child_id, child_params in _choices(request_id, params)]
        ve = choose_virtual_engine(self._schedulers, children[0])  # the choices share the prompt: one VE
        stream = RequestStream(request_id, children, self.outputs.output, self.abort, final_only)
        self._streams[request_id] = stream
        leader = children[0]
        for req in children:
            self._tracked[req.request_id] = _Tracked(ve, stream)
            self.outputs.add(req)
            self._schedulers[ve].add_request(req, after=None if req is leader else leader)
        if self._wakeups:
            self._wakeups[ve].set()
        return stream

    def abort(self, request_id: str) -> None:
        """End a submitted request (every choice): its caller or client is done with it. Frees everything it
        holds at once; a no-op once it has ended."""
        self._end(request_id)

    def _end(self, request_id: str, error: BaseException | None = None) -> None:
        """The one place a submitted request ends, however it ends: its listener has read the last output, it
        was aborted, its client went away, or it failed (`error`, raised to its listener). Finishes every choice
        still running (freeing its KV blocks; the stages drop theirs with the VE's next step) and forgets
        everything the engine holds for it."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        for req in stream.children:
            tracked = self._tracked.pop(req.request_id)
            self.outputs.remove(req.request_id)
            self._schedulers[tracked.virtual_engine].abort(req.request_id)
            if self._wakeups:  # an idle VE wakes to tell the stages (see Scheduler.owes_release)
                self._wakeups[tracked.virtual_engine].set()
        if error is not None:
            stream.fail(error)

    # ---- the loops -----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[AsyncEngine]:
        """Run the virtual-engine loops in the current event loop for the duration of the block."""
        self._wakeups = [asyncio.Event() for _ in self._schedulers]
        for ve, event in enumerate(self._wakeups):
            if self._schedulers[ve].has_work():
                event.set()
        tasks = [asyncio.create_task(self._ve_loop(ve)) for ve in range(len(self._schedulers))]
        try:
            yield self
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException:
            await self._settle(tasks)  # the caller failed and aborted its requests: release them too
            raise
        else:
            await self._settle(tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._wakeups = []

    async def _settle(self, tasks: list[asyncio.Task]) -> None:
        """With every request ended, let the loops apply the steps still in flight and tell the stages which
        requests ended (`Scheduler.owes_release`), so an engine that stops running (offline `generate`
        returning) holds nothing for them anywhere. Skipped while requests still run (a server shutting down);
        bounded by the step deadline, and cut short by a failed loop, so it never hangs."""
        deadline = time.monotonic() + self.config.parallel.step_timeout_s
        while (not any(s.has_work() for s in self._schedulers)
               and any(s.num_steps_in_flight or s.owes_release for s in self._schedulers)
               and not any(t.done() for t in tasks) and time.monotonic() < deadline):
            await asyncio.sleep(0.001)

    async def _ve_loop(self, ve: int) -> None:
        scheduler, wakeup = self._schedulers[ve], self._wakeups[ve]
        in_flight: collections.deque[asyncio.Task] = collections.deque()  # this VE's steps, in planning order
        generation = self.executor.generation
        try:
            while True:
                try:
                    if not in_flight:
                        if not scheduler.has_work() and not scheduler.owes_release:
                            wakeup.clear()
                            await wakeup.wait()
                            continue
                        if generation != self.executor.generation or self.executor.recovering:
                            generation = await self._catch_up(scheduler, generation)
                    wakeup.clear()  # an arrival from here on wakes the wait below
                    self._plan_steps(scheduler, in_flight, generation)
                    if not in_flight:
                        await asyncio.sleep(0)  # nothing can run yet (no free KV): let the others go on
                        continue
                    if len(in_flight) < self.steps_in_flight_per_ve and not in_flight[0].done():
                        # Room for another step: an arrival may be planned before the oldest returns.
                        arrival = asyncio.ensure_future(wakeup.wait())
                        await asyncio.wait([in_flight[0], arrival], return_when=asyncio.FIRST_COMPLETED)
                        arrival.cancel()
                        if not in_flight[0].done():
                            continue
                    step = await in_flight.popleft()
                    self._publish(scheduler.update(step, self.outputs.find_stop_string))
                except StepInterrupted as exc:  # a stage failed; the executor is recovering
                    lost = exc.lost or any(await _interruptions(in_flight))
                    for req in scheduler.abandon_steps(lost=lost):
                        self._fail_request(req, RuntimeError(
                            f"request {req.request_id} was in {req.num_failed_steps} steps in a row that a stage "
                            f"failure lost ({exc}); it is failed on its own so the others can go on"))
                    continue
                except Exception as exc:  # a failure that cannot be recovered: fail every listener, never hang
                    self._fail_all(exc)
                    raise
        finally:  # the loops stop (generation ended early): steps still in flight will never be applied
            for task in in_flight:
                task.cancel()
            scheduler.abandon_steps(lost=False)
            scheduler.forget_stage_state(group_changed=False)  # a cancelled plan may never have been sent

    @property
    def steps_in_flight_per_ve(self) -> int:
        """By default one per pipeline stage: a long prompt's chunks fill the pipeline. Planning decodes ahead
        needs room for two: the step on the device and the next one, issued behind it."""
        configured = self.config.scheduler.max_steps_in_flight_per_ve
        return max(configured, 2) if self.plans_ahead else configured

    def _plan_steps(self, scheduler: Scheduler, in_flight: collections.deque, generation: int) -> None:
        """Plan and issue steps while this VE has room and something can run without waiting for a result.

        Measured and not adopted: planning a VE's chunk ahead only while fewer chunk steps are in flight than
        stages, so that with every VE computing prompts each keeps one step, its decodes riding along. The
        bubbles that left (step lengths differ between VEs) cost more than the decode-only steps it saved:
        0.92x this schedule on 32 x 1k-in/128-out at PP=2 (`results/pipeline_chunk_cap.md`)."""
        while len(in_flight) < self.steps_in_flight_per_ve and generation == self.executor.generation:
            sched = scheduler.schedule()
            if sched.is_empty and not sched.finished_req_ids:
                return
            in_flight.append(asyncio.ensure_future(self._run_step(sched, generation)))

    async def _run_step(self, sched: SchedulerOutput, generation: int) -> StepOutput:
        self.busy_clock.step_started()
        try:
            return await self.executor.execute(sched, generation)
        finally:
            self.busy_clock.step_ended()

    async def _catch_up(self, scheduler: Scheduler, generation: int) -> int:
        """After a recovery: wait for the new generation; recompute what replaced stages lost."""
        ready = await self.executor.wait_ready()
        scheduler.forget_stage_state()  # the stages start the new generation knowing no request
        lost = self.executor.kv_lost_through(generation)
        if lost is not None:  # replaced stages lost their KV: catch up on stages 0..lost
            scheduler.reset_prefix_cache()  # no cached prefix is whole on every stage any more
            scheduler.recompute_all(None if lost == self.config.parallel.pipeline_parallel_size - 1 else lost)
        return ready

    def _publish(self, advanced: list[Request]) -> None:
        """Tell the listeners of requests that got a token. Nothing is detokenized or built here (the stream
        does it when its listener reads); a `final_only` listener (offline generation) hears only of the end."""
        tracked_of, running = self._tracked, RequestStatus.RUNNING
        for req in advanced:
            tracked_of[req.request_id].stream.wake(req.status is not running)

    def _fail_request(self, req: Request, exc: BaseException) -> None:
        """A request the scheduler gave up on (it was in too many failed steps): its listener gets `exc`, and
        its other choices end with it."""
        logger.error("%s", exc)
        tracked = self._tracked.get(req.request_id)
        if tracked is not None:  # (None: a choice failed with it in the same step and ended the request)
            self._end(tracked.stream.request_id, exc)

    def _fail_all(self, exc: BaseException) -> None:
        self._error = exc
        for request_id in list(self._streams):
            self._end(request_id, exc)

    # ---- state ---------------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return any(s.has_work() for s in self._schedulers)

    def stats(self) -> list[VirtualEngineStats]:
        """Per virtual engine: requests running and waiting, KV blocks in use, and its counters since start
        (cheap: no stage is asked)."""
        return [VirtualEngineStats(len(s.running), len(s.waiting), s.block_manager.num_used_blocks,
                                   s.block_manager.num_blocks, s.block_manager.num_evictable_cached_blocks,
                                   s.prefix_cache_queries, s.prefix_cache_hits, s.num_preemptions,
                                   s.max_steps_in_flight, s.num_recomputed, s.num_recomputed_tokens,
                                   num_planned_ahead=s.num_planned_ahead)
                for s in self._schedulers]

    def check_health(self) -> None:
        """Raise if the engine can no longer run steps: a stage failed and could not be recovered."""
        if self._error is not None:
            raise self._error
        self.executor.check_health()

    @property
    def recovering(self) -> bool:
        """True while a failed stage is being replaced (requests wait; nothing is lost)."""
        return self.executor.recovering

    def num_recomputed(self) -> int:
        """Requests sent back to recompute by stage failures, over the engine's life."""
        return sum(s.num_recomputed for s in self._schedulers)

    def bookkeeping(self, stages: bool = False) -> dict[str, int]:
        """How many entries every per-request (and per-step) structure holds, summed over virtual engines:
        the engine's, the schedulers' and block managers', the executor's and, with `stages`, the request
        state each stage process keeps (asks them: call while no step is in flight). All zero once every
        request has ended, however it ended: nothing grows with the number of requests served."""
        counts = {"tracked": len(self._tracked), "streams": len(self._streams), **self.outputs.bookkeeping(),
                  "executor_steps_pending": self.executor.num_steps_pending()}
        for scheduler in self._schedulers:
            for name, n in scheduler.bookkeeping().items():
                counts[name] = counts.get(name, 0) + n
        if stages:
            counts["stage_requests_held"] = sum(s["requests_held"] for s in self.executor.collect_stats())
        return counts

    def step_records(self) -> list[StepRecord]:
        """Every stage's step records so far (call while no step is in flight)."""
        return stage_records(self.executor.collect_stats())

    def recovery_spans(self) -> list[Span]:
        """Every recovery from a stage failure so far, for timelines."""
        log = self.executor.recoveries
        return [Span(s.start, s.end, s.cause) for s in log.spans] if log is not None else []

    @property
    def is_shut_down(self) -> bool:
        """Whether `shutdown` has stopped the stages."""
        return self._shut_down

    def shutdown(self) -> None:
        """Write the trace if one was asked for, then stop the stages; safe to call twice."""
        if self._shut_down:
            return
        self._shut_down = True
        try:
            if self.config.trace_file and self.executor.failure is None:
                png = write_trace(self.step_records(), self.config.trace_file, self.recovery_spans())
                logger.info("wrote %s and %s", self.config.trace_file, png)
        finally:
            self.executor.shutdown()


async def _interruptions(in_flight: collections.deque) -> list[bool]:
    """Wait out a VE's other steps in flight after one was interrupted; whether each was lost (it ran)."""
    lost = []
    while in_flight:
        try:
            await in_flight.popleft()
            lost.append(False)  # it finished before the failure; its tokens are recomputed with the rest
        except StepInterrupted as exc:
            lost.append(exc.lost)
        except Exception:  # noqa: BLE001 - the recovery decides what a failed generation means
            lost.append(True)
    return lost


def _choices(request_id: str, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
    """(engine request id, params) of each of the `n` choices. As in vLLM, choice i of a seeded request uses
    seed + i, so the choices differ from each other and each is still independent of the batch."""
    if params.n == 1:
        return [(request_id, params)]
    return [(f"{i}_{request_id}", replace(params, n=1, seed=None if params.seed is None else params.seed + i,
                                          prompt_logprobs=params.prompt_logprobs if i == 0 else None))
            for i in range(params.n)]  # (the prompt's logprobs are the same for every choice: scored once)
