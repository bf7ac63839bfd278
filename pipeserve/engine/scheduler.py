"""Continuous batching with chunked prefill and preemption by recompute, for one virtual engine.

Every step: running requests first (their decode token, or the next chunk of their prompt), then waiting
requests in arrival order, all under one token budget (`max_num_batched_tokens`) and `max_num_seqs`.
When the KV pool runs dry, the most recently admitted running request is preempted: its blocks are freed
and it goes back to the front of the queue, to recompute prompt + outputs later. It loses no tokens.

Several steps may be in flight at once (chunked pipeline prefill): a request whose planned tokens do not reach
a sample yet (a prefill chunk that is not its last) can have its next chunk planned before the first one
returns, so chunk k+1 enters stage 0 while chunk k is in stage 1. That is safe because every stage runs a
virtual engine's steps in the order they were planned, and chunk k+1 needs on each stage only the KV that the
same stage wrote for chunks 1..k. A request that waits for a sampled token is not planned again until that
token arrives, unless async scheduling plans its next decode ahead (plan_ahead.py). Results are applied in
planning order. A request preempted or aborted while its steps are in flight bumps its `epoch`, so their late
results are dropped (the KV they wrote is overwritten before anything reads it: every later step on those
blocks is planned, hence run, after them).

A stage failure is handled much the same way (`recompute_all`): every running request computes its tokens
again, keeping its blocks, but only on the stages up to the last replaced one: the stages after it still
hold that KV, so those chunks skip them (`ScheduledRequest.last_stage`). The requests of a step lost to a
failure become suspects: a step carries at most one suspect, so a request that crashes a stage is caught
alone, and one lost in MAX_FAILED_STEPS steps in a row is failed on its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pipeserve.config import SchedulerConfig
from pipeserve.engine.block_manager import BlockManager
from pipeserve.engine.plan_ahead import PlanAhead, can_plan_ahead
from pipeserve.engine.request import Request, RequestStatus
from pipeserve.types import PLACEHOLDER, SchedulerOutput, StepOutput

MAX_FAILED_STEPS = 2  # a request in this many failed steps in a row is taken to be what crashes the stage


class Scheduler:
    """Plans one step at a time; `update` applies the step's sampled tokens. Needs no model to test."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, eos_token_ids: tuple[int, ...] = (),
                 virtual_engine: int = 0, plan_ahead: bool = False):
        self.config = config
        self.plan_ahead = PlanAhead(plan_ahead)  # async scheduling: decodes planned before their token is back
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.virtual_engine = virtual_engine
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # step id -> {req_id: (request, tokens planned, its epoch when planned)}, for every step in flight
        self._in_flight: dict[int, dict[str, tuple[Request, int, int]]] = {}
        self._next_step = 0
        self._finished_ids: list[str] = []  # requests the stages hold state for that ended: sent with the next step
        self._held: list[Request] = []  # choices waiting for a sibling to compute their shared prompt
        self.max_steps_in_flight = 0  # the most steps this VE has had in flight at once (tests, benchmarks)
        self.num_preemptions = 0
        self.num_recomputed = 0  # requests sent back to recompute by stage failures
        self.num_recomputed_tokens = 0  # tokens whose KV they had, computed again
        # Prefix caching, counted in tokens as vLLM does: looked up at admission, and found cached.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queue ---------------------------------------------------------------------------------------

    def add_request(self, req: Request, after: Request | None = None) -> None:
        """Queue a request. `after`: a sibling with the same prompt (another choice of an n > 1 request); with
        prefix caching this one waits until the sibling has computed the prompt, then reuses its full blocks."""
        self.requests[req.request_id] = req
        # What update checks per token, with `length_limit`: the ids that may stop it.
        params = req.sampling_params
        req.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        self.plan_ahead.added(req)
        if after is not None and self.block_manager.enable_prefix_caching and \
                len(req.prompt_token_ids) > self.block_manager.block_size:
            req.held_for = after
            self._held.append(req)
            return
        self.waiting.append(req)

    def _release_held(self) -> None:
        """Queue (at the front: they arrived with their sibling) the held choices whose sibling has computed
        its prompt, or ended."""
        ready = [r for r in self._held if r.held_for.status.finished or
                 r.held_for.num_computed_tokens >= len(r.held_for.prompt_token_ids)]
        for req in reversed(ready):
            self._held.remove(req)
            req.held_for = None
            self.waiting.appendleft(req)

    def abort(self, req_id: str) -> Request | None:
        """Finish a request now and free its blocks (a no-op for unknown or finished ids)."""
        req = self.requests.get(req_id)
        if req is None:
            return None
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._held)

    def bookkeeping(self) -> dict[str, int]:
        """Entries held per request or step, this VE's and its block manager's (all zero when it is idle)."""
        return {"waiting": len(self.waiting), "running": len(self.running), "requests": len(self.requests),
                "steps_in_flight": len(self._in_flight), "ended_unreleased": len(self._finished_ids),
                "held_choices": len(self._held), **self.block_manager.bookkeeping()}

    @property
    def owes_release(self) -> bool:
        """Requests ended whose state the stages still hold, and no step in flight will carry their ids."""
        return bool(self._finished_ids) and not self._in_flight

    # ---- planning ------------------------------------------------------------------------------------

    @property
    def num_steps_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def num_planned_ahead(self) -> int:
        return self.plan_ahead.num_planned_ahead

    def schedule(self) -> SchedulerOutput:
        """Plan the next step from what can run now, whether or not earlier steps are still in flight. An
        empty plan (nothing can run before a result arrives) takes no step id.

        With nothing to run, a step with no requests still goes out when the stages hold the state of ended
        requests (`owes_release`): an idle engine keeps nothing anywhere for the requests it served."""
        if self._held:
            self._release_held()
        out = SchedulerOutput(step_id=self._next_step, virtual_engine=self.virtual_engine)
        in_flight: dict[str, tuple[Request, int, int]] = {}  # request id -> (request, tokens, its epoch)
        budget = self._schedule_running(self.config.max_num_batched_tokens, out, in_flight)
        self._schedule_waiting(budget, out, in_flight)
        if not in_flight and not self.owes_release:
            return out
        self._next_step += 1
        out.finished_req_ids, self._finished_ids = self._finished_ids, []
        self._in_flight[out.step_id] = in_flight
        self.max_steps_in_flight = max(self.max_steps_in_flight, len(self._in_flight))
        return out

    def _schedule_running(self, budget: int, out: SchedulerOutput, in_flight: dict) -> int:
        i, running = 0, self.running
        tables, block_size = self.block_manager.block_tables, self.block_manager.block_size
        d = out.decodes
        plan_ahead = self.plan_ahead.active
        ids, tokens, starts, num_outputs, new_blocks = d.req_ids, d.token_ids, d.start_pos, d.num_output_tokens, \
            d.new_blocks
        while i < len(running) and budget > 0:
            req = running[i]
            start = req.num_computed_tokens + req.num_inflight_tokens
            ahead = start == req.num_tokens and plan_ahead and can_plan_ahead(req)
            if (start >= req.num_tokens and not ahead) or (req.num_failed_steps and _has_suspect(in_flight)):
                i += 1  # waiting for its sampled token, or a suspect where the step already has one
                continue
            if ahead or (start == req.num_tokens - 1 and req.blocks_sent is not None and req.output_token_ids
                         and not req.kv_held_tokens):
                # The common case, a decode of a request the stages know: a row of the columnar decodes, planned
                # here without a call per request (this loop is most of the engine's work per step). Planned
                # ahead, its token is the one the step in flight samples: the stage fills it in on the device.
                req_id, table = req.request_id, tables[req.request_id]
                if start >= len(table) * block_size and not self._grow(req, start + 1):
                    continue  # the pool was short and it was the newest: preempted
                ids.append(req_id)
                tokens.append(PLACEHOLDER if ahead else req.output_token_ids[-1])
                starts.append(start)
                num_outputs.append(len(req.output_token_ids) + ahead)
                self.plan_ahead.num_planned_ahead += ahead
                blocks = req.take_unsent_blocks(table)
                if blocks:
                    new_blocks[req_id] = blocks
                req.num_inflight_tokens += 1
                in_flight[req_id] = (req, 1, req.epoch)
                budget -= 1
                i += 1
                continue
            n = min(req.num_tokens - start, budget)
            if start < req.kv_held_tokens:  # a catch-up chunk never runs past the held KV
                n = min(n, req.kv_held_tokens - start)
            if self._grow(req, start + n):
                self._plan_entry(out, in_flight, req, n, start)
                budget -= n
                i += 1
        return budget

    def _plan_entry(self, out: SchedulerOutput, in_flight: dict, req: Request, n: int, start: int) -> None:
        out.requests.append(req.plan_entry(n, start, self.block_manager.block_tables[req.request_id]))
        req.num_inflight_tokens += n
        in_flight[req.request_id] = (req, n, req.epoch)

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Give a running request blocks for `num_tokens`, preempting the newest running requests while the
        pool is short (never one already planned in this step: those come first); False if that preempted
        the request itself."""
        while not self.block_manager.allocate(req.request_id, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _schedule_waiting(self, budget: int, out: SchedulerOutput, in_flight: dict) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_failed_steps and _has_suspect(in_flight):
                break  # one suspect per step: it gets the next one
            cached = self._take_cached_prefix(req)
            n = req.num_tokens - cached
            if n > budget and not self.config.enable_chunked_prefill:
                self.block_manager.free(req.request_id)
                break  # without chunking a prompt runs whole, in a later step with more room
            n = min(n, budget)
            if not self.block_manager.allocate(req.request_id, cached + n):
                self.block_manager.free(req.request_id)
                break
            self._admitted(req, cached)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._plan_entry(out, in_flight, req, n, cached)
            budget -= n

    def _take_cached_prefix(self, req: Request) -> int:
        """With prefix caching, start the request's blocks with the longest cached prefix of its tokens (all
        but the last: the last is always computed, for its logits); returns the tokens that covers."""
        if not self.block_manager.enable_prefix_caching or req.sampling_params.prompt_logprobs is not None:
            return 0  # (cached blocks hold KV, not the logits prompt logprobs need)
        limit = req.num_tokens - 1
        hashes = req.full_block_hashes(limit, self.block_manager.block_size)
        return self.block_manager.take_cached_prefix(req.request_id, hashes, limit)

    def _admitted(self, req: Request, cached: int) -> None:
        req.num_computed_tokens = cached
        if req.num_cached_tokens is None:  # as vLLM reports it: what the cache gave at first admission
            req.num_cached_tokens = cached
        if self.block_manager.enable_prefix_caching:
            self.prefix_cache_queries += req.num_tokens
            self.prefix_cache_hits += cached

    def _cache_computed_blocks(self, req: Request) -> None:
        """Register the request's blocks that are now full and computed on every stage."""
        bm = self.block_manager
        full = req.num_computed_tokens // bm.block_size
        if full > bm.num_registered_blocks(req.request_id):
            bm.cache_full_blocks(req.request_id, req.full_block_hashes(full * bm.block_size, bm.block_size)[:full])

    def reset_prefix_cache(self) -> None:
        """Stages lost their KV: no cached prefix may be reused (blocks in use register again as their
        requests recompute them)."""
        self.block_manager.reset_prefix_cache()

    def _preempt(self, req: Request) -> None:
        self._send_back(req)
        req.num_preemptions += 1
        self.num_preemptions += 1

    def _send_back(self, req: Request) -> None:
        """Free the request's KV and put it at the front of the queue, to recompute prompt + outputs."""
        self.running.remove(req)
        self.block_manager.free(req.request_id)
        self._stages_forget(req)
        req.forget_in_flight()  # results of its steps in flight no longer count
        req.num_computed_tokens = 0
        req.stop_catching_up()  # its blocks are gone: every stage recomputes it
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    # ---- stage failures ------------------------------------------------------------------------------

    def abandon_steps(self, lost: bool = True) -> list[Request]:
        """The steps in flight will never return. If they ran (`lost`), their requests become suspects (once
        per failure, however many of its steps were in flight); returns those lost MAX_FAILED_STEPS times
        in a row, which the caller fails on their own."""
        crashed = []
        in_flight = {req_id for step in self._in_flight.values() for req_id in step}
        self._in_flight.clear()
        for req_id in in_flight:
            req = self.requests.get(req_id)
            if req is None:  # finished or aborted since
                continue
            req.forget_in_flight()
            if not lost:
                continue
            req.num_failed_steps += 1
            if req.num_failed_steps >= MAX_FAILED_STEPS:
                crashed.append(req)
        for req in crashed:
            self._finish(req, RequestStatus.FINISHED_ABORTED)
        return crashed

    def recompute_all(self, last_stage: int | None) -> int:
        """After a recovery that replaced pipeline stages up to `last_stage`: every running request computes
        its tokens again on stages 0..last_stage (the replaced stage lost its KV and needs the activations of
        those before it); later stages keep theirs. None: every stage recomputes, as one prefill that runs on
        to the next sampled token. Blocks stay. Returns how many requests recompute."""
        assert not self._in_flight, "abandon the steps in flight first"
        catching_up = [r for r in self.running if r.num_computed_tokens or r.kv_held_tokens]
        for req in catching_up:
            # A request still catching up from an earlier recovery: the later stages' KV reaches as far as
            # before, and every stage up to either replaced one recomputes.
            held = max(req.kv_held_tokens, req.num_computed_tokens)
            self.num_recomputed_tokens += held
            if last_stage is None:
                req.stop_catching_up()
            else:
                stage = last_stage if req.catch_up_stage is None else max(req.catch_up_stage, last_stage)
                req.kv_held_tokens, req.catch_up_stage = held, stage
            req.num_computed_tokens = 0
        self.num_recomputed += len(catching_up)
        return len(catching_up)

    def _stages_forget(self, req: Request) -> None:
        """Its blocks are freed: the stages drop their copy with the next step."""
        if req.blocks_sent is not None:
            self._finished_ids.append(req.request_id)
            req.blocks_sent = None

    def forget_stage_state(self, group_changed: bool = True) -> None:
        """Make every request's next entry whole. In a new generation of the group the stages keep nothing of
        the old one; otherwise (steps were cancelled, perhaps before they reached the stages) a whole entry
        simply replaces what the stages hold, and the ids that ended must still reach them."""
        for req in self.requests.values():
            req.blocks_sent = None
        if group_changed:
            self._finished_ids.clear()

    # ---- results -------------------------------------------------------------------------------------

    def update(self, step: StepOutput, find_stop_string: Callable[[Request], str | None] | None = None
               ) -> list[Request]:
        """Advance the requests of a step in flight (steps are applied in planning order); returns those
        that received a new token. `find_stop_string(request)`: the stop string its text ends with now, if
        any (the output side's answer; needed once a request has stop strings)."""
        assert step.step_id == min(self._in_flight), "step results are applied in the order they were planned"
        advanced = []
        caching, block_size = self.block_manager.enable_prefix_caching, self.block_manager.block_size
        sampled_tokens, logprobs, prompt_logprobs = step.sampled, step.logprobs, step.prompt_logprobs
        running = RequestStatus.RUNNING
        for req_id, (req, n, epoch) in self._in_flight.pop(step.step_id).items():
            if req.epoch != epoch or req.status is not running:
                continue  # aborted, or preempted (and perhaps planned afresh) while this step was in flight
            req.num_inflight_tokens -= n
            computed = req.num_computed_tokens = req.num_computed_tokens + n
            if req.num_failed_steps:
                req.num_failed_steps = 0
            if req.kv_held_tokens and computed >= req.kv_held_tokens:
                req.stop_catching_up()
            if caching and (n > 1 or computed % block_size == 0):  # a block may have filled up
                self._cache_computed_blocks(req)
            if prompt_logprobs:
                req.record_prompt_logprobs(prompt_logprobs.get(req_id))
            token = sampled_tokens.get(req_id)
            if token is None:
                continue
            req.append_output(token)
            if logprobs:  # kept only when asked: one object per token adds up
                lp = logprobs.get(req_id)
                if lp is not None:
                    req.output_logprobs.append(lp)
            if token in req.stop_ids or req.num_tokens >= req.length_limit or req.stop_strings:
                self._check_stop(req, token, find_stop_string)
            advanced.append(req)
        return advanced

    def _check_stop(self, req: Request, token: int, find_stop_string: Callable[[Request], str | None] | None
                    ) -> None:
        """The token may end the request: a stop token (once past min_tokens; it adds no text), else a stop
        string its text now ends with, else the length limit. Update calls this only when one may apply."""
        params = req.sampling_params
        if token in req.stop_ids and req.num_tokens - len(req.prompt_token_ids) >= params.min_tokens:
            reason = token if token in params.stop_token_ids else None  # None: an EOS token
            return self._finish(req, RequestStatus.FINISHED_STOPPED, reason)
        if req.stop_strings:
            stop = find_stop_string(req)
            if stop is not None:
                return self._finish(req, RequestStatus.FINISHED_STOPPED, stop)
        if req.num_tokens >= req.length_limit:
            self._finish(req, RequestStatus.FINISHED_LENGTH)

    def _finish(self, req: Request, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        if req.status.finished:
            return
        req.finish(status, stop_reason)
        req.forget_in_flight()
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self._held:
            self._held.remove(req)
        self.block_manager.free(req.request_id)
        self._stages_forget(req)
        if self.requests.pop(req.request_id, None) is not None:
            self.plan_ahead.ended(req)


def _has_suspect(in_flight: dict[str, tuple[Request, int, int]]) -> bool:
    return any(req.num_failed_steps for req, _, _ in in_flight.values())
