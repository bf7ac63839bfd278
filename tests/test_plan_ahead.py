"""Which decodes the scheduler plans ahead (engine/plan_ahead.py), without a model: a penalized request keeps
every step synchronous only while it is here, and a decode whose token ends the request by length has no
step planned after it."""

from __future__ import annotations

from helpers import fake_step

from pipeserve import SamplingParams
from pipeserve.config import SchedulerConfig
from pipeserve.engine.block_manager import BlockManager
from pipeserve.engine.request import Request
from pipeserve.engine.scheduler import Scheduler
from pipeserve.types import PLACEHOLDER


def decoding(s: Scheduler, req_id: str, params: SamplingParams) -> Request:
    """A request added to `s` whose prompt has been computed and its first token sampled."""
    req = Request(req_id, [1, 2, 3], params, 10)
    s.add_request(req)
    s.update(fake_step(s.schedule(), 5))
    return req


def test_a_penalized_request_stops_planning_ahead_until_it_ends():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_model_len=64), BlockManager(32, 4),
                  plan_ahead=True)
    decoding(s, "plain", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    penalized = decoding(s, "penalized", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                        repetition_penalty=1.2))
    first = s.schedule()
    assert first.decodes.req_ids == ["plain", "penalized"] and s.schedule().is_empty
    s.update(fake_step(first, 6))
    s.abort(penalized.request_id)
    s.schedule()  # the plain request's decode, its token known
    ahead = s.schedule()
    assert ahead.decodes.req_ids == ["plain"] and ahead.decodes.token_ids == [PLACEHOLDER]
    assert s.num_planned_ahead == 1 and s.plan_ahead.active


def test_no_decode_is_planned_after_one_that_ends_the_request_by_length():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_model_len=64), BlockManager(16, 4),
                  plan_ahead=True)
    req = decoding(s, "r", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    s.schedule()  # samples output 2
    assert s.schedule().decodes.token_ids == [PLACEHOLDER]  # samples output 3, the last
    assert s.schedule().is_empty and s.num_planned_ahead == 1 and req.num_inflight_tokens == 2


def test_planning_ahead_off_plans_nothing_ahead():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_model_len=64), BlockManager(16, 4))
    decoding(s, "r", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert s.schedule().decodes.token_ids == [5]
    assert s.schedule().is_empty and s.num_planned_ahead == 0 and not s.plan_ahead.active
